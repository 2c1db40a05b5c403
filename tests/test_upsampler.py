"""models/upsampler.py: conv-only, crop training / full-size inference, checkpoints, diffusers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from models import checkpoint
from models.upsampler import SIZES, Upsampler, crop_windows, downsample_to, training_loss, unet_kwargs
from tests.model_helpers import perturb

TINY = SIZES["tiny"]  # 16 -> 32 px, training crops 8 px


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return Upsampler(cfg)


def smooth_images(B=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(B, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_no_attention_anywhere_for_all_sizes():
    for name, cfg in SIZES.items():
        with torch.device("meta"):
            m = Upsampler(cfg)
        assert not [n for n, mod in m.named_modules() if isinstance(mod, Attention)], name
        assert not any("Attn" in b for b in m.unet.config.down_block_types + m.unet.config.up_block_types)
    with torch.device("meta"):
        counts = {k: sum(p.numel() for p in Upsampler(c).parameters()) for k, c in SIZES.items()}
    assert counts["tiny"] < counts["small"] < counts["paper"] < counts["base"]
    assert 0.6e9 < counts["base"] < 0.8e9  # Karlo's 64->256 is ~700M
    assert 0.25e9 < counts["paper"] < 0.35e9  # paper's 256->1024 is 300M


def test_trains_on_crops_and_samples_at_full_size():
    m = make()
    seen = []
    m.unet.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    hi = smooth_images()
    loss, _ = training_loss(m, {"image": hi}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert seen[-1] == (4, 6, 8, 8)  # a quarter of the side, target + conditioning channels
    m.eval()
    low = downsample_to(hi, 16)
    out = m.sample(low, steps=2, generator=torch.Generator().manual_seed(0))
    assert seen[-1] == (4, 6, 32, 32) and out.shape == (4, 3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    big = m.sample(low, steps=1, size=64, generator=torch.Generator().manual_seed(0))  # any size works
    assert big.shape == (4, 3, 64, 64)


def test_loss_falls():
    m = make().train()
    hi = smooth_images()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = training_loss(m, {"image": hi}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])


def test_conditioning_is_corrupted_per_config():
    hi = smooth_images(B=2)
    low = downsample_to(hi, 16) + 0.3 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = make(dataclasses.replace(TINY, degradation="none")).condition(low)
    blurred = make(dataclasses.replace(TINY, degradation="blur")).condition(low)
    bsr = make(dataclasses.replace(TINY, degradation="bsr"))
    assert plain.shape == blurred.shape == (2, 3, 32, 32)
    assert not torch.allclose(plain, blurred)
    a = bsr.condition(low, torch.Generator().manual_seed(1))
    assert torch.equal(a, bsr.condition(low, torch.Generator().manual_seed(1)))
    assert torch.equal(plain, bsr.condition(low, corrupt=False))


def test_noise_conditioning_augmentation():
    m = make(dataclasses.replace(TINY, noise_aug_max=0.5))
    assert m.unet.config.class_embed_type == "timestep"
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args))
    B = 500
    zero = {"image": torch.zeros(B, 3, 32, 32), "crop": torch.zeros(B, 2, dtype=torch.long)}
    with torch.no_grad():
        training_loss(m, zero, generator=torch.Generator().manual_seed(0))
    _, _, noisy, s = seen[-1]  # the conditioning of a zero image is pure augmentation noise
    assert s.min() >= 0 and s.max() <= 499 and s.float().std() > 100  # random levels up to 0.5 T
    abar = m.training_scheduler.alphas_cumprod[s]
    torch.testing.assert_close(noisy.pow(2).mean((1, 2, 3)).mean(), (1 - abar).mean(), rtol=0.1, atol=0)
    training_loss(m, {"image": smooth_images(B=2)}, generator=torch.Generator().manual_seed(0))[0].backward()
    out = m.sample(downsample_to(smooth_images(B=2), 16), steps=2, aug_level=100, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="aug_level"):
        make()(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="block_type"):
        dataclasses.replace(TINY, block_type="attn")
    with pytest.raises(ValueError, match="degradation"):
        dataclasses.replace(TINY, degradation="jpeg")
    with pytest.raises(ValueError, match="crop_size"):
        dataclasses.replace(TINY, crop_size=7)


def test_eta_gives_different_samples_per_seed():
    m = perturb(make()).eval()
    low = downsample_to(smooth_images(B=1), 16)
    x_T = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    run = lambda eta, seed: m.sample(low, steps=3, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.equal(run(1.0, 1), run(1.0, 2))


def test_checkpoint_round_trip_and_old_format_migration(tmp_path):
    m = perturb(make(dataclasses.replace(TINY, noise_aug_max=0.25))).eval()
    checkpoint.save(m, tmp_path / "up")
    loaded = checkpoint.load(tmp_path / "up").eval()
    x, c = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    t, s = torch.tensor([3, 700]), torch.tensor([0, 100])
    with torch.no_grad():
        assert torch.equal(m(x, t, c, s), loaded(x, t, c, s))
    # rewrite the config as format 1 (noise_aug: bool) and load it through the migration
    path = tmp_path / "up" / "config.json"
    header = json.loads(path.read_text())
    assert header["format_version"] == 2
    cfg = header["config"]
    cfg["noise_aug"] = cfg.pop("noise_aug_max") > 0
    header.update(format_version=1, config=cfg)
    path.write_text(json.dumps(header))
    old = checkpoint.load(tmp_path / "up").eval()
    assert old.config.noise_aug_max == 0.25 and old.config == m.config
    with torch.no_grad():
        assert torch.equal(old(x, t, c, s), m(x, t, c, s))


@pytest.mark.parametrize("block_type", ["plain", "resnet_updown"])
def test_diffusers_directory_loads_with_same_forward(tmp_path, block_type):
    cfg = dataclasses.replace(TINY, block_type=block_type)
    torch.manual_seed(0)
    ref = perturb(UNet2DModel(**unet_kwargs(cfg))).eval()
    ref.save_pretrained(tmp_path / "super_res_first")
    m = Upsampler.from_diffusers(tmp_path / "super_res_first", low_res_size=16).eval()
    assert m.config.block_type == block_type
    x, c, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(m(x, t, c), ref(torch.cat([x, c], 1), t).sample)
    bad = UNet2DModel(**{**unet_kwargs(cfg), "add_attention": True})
    bad.save_pretrained(tmp_path / "attn")
    with pytest.raises(checkpoint.CheckpointError, match="add_attention"):
        Upsampler.from_diffusers(tmp_path / "attn")


def test_training_loss_under_bf16_autocast():
    m = make(dataclasses.replace(TINY, degradation="bsr", noise_aug_max=0.3)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = training_loss(m, {"image": smooth_images(B=2)}, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_crops_are_the_windows_at_the_given_corners():
    x = torch.randn(3, 2, 10, 12, generator=torch.Generator().manual_seed(0))
    corners = torch.tensor([[0, 0], [6, 8], [2, 5]])
    expected = torch.stack([x[i, :, y:y + 4, z:z + 4] for i, (y, z) in enumerate(corners.tolist())])
    assert torch.equal(crop_windows(x, corners, 4), expected)


def test_a_given_low_res_batch_is_used_as_is():
    """`low` comes from the data path already degraded: with it, the config's degradation is not
    applied again (here: "bsr" with low given equals "none" on the same low-res images)."""
    hi = smooth_images(B=2)
    low = downsample_to(hi, 16) + 0.1
    fixed = {"crop": torch.tensor([[0, 8], [16, 4]]), "t": torch.tensor([10, 600]),
             "noise": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    plain, bsr = make(dataclasses.replace(TINY, degradation="none")), make(dataclasses.replace(TINY, degradation="bsr"))
    a, _ = training_loss(plain, {"image": hi, "low": low, **fixed})
    b, _ = training_loss(bsr, {"image": hi, "low": low, **fixed}, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c, _ = training_loss(plain, {"image": hi, **fixed})  # default: the image downsampled
    assert not torch.equal(a, c)
