"""models/decoder.py: shapes, CFG dropout, overfitting, checkpoints, diffusers interop."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from models import checkpoint, diffusion
from models.decoder import SIZES, Decoder, DecoderConfig, TextProj, training_loss
from tests.model_helpers import perturb

TINY = dataclasses.replace(SIZES["tiny"], image_size=16, attention_resolutions=[8])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    return Decoder(cfg).eval()


def batch(B=3, L=5, cfg=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return x, torch.randn(B, cfg.embed_dim, generator=g), torch.randn(B, cfg.embed_dim, generator=g), torch.randn(B, L, cfg.text_dim, generator=g)


def test_shapes_and_optional_caption():
    m = make()
    x, zi, zt, states = batch()
    t = torch.tensor([0, 500, 999])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert m(x, t, zi, zt, states, mask).shape == x.shape
    assert m(x, t, zi).shape == x.shape  # caption optional
    lv = make(dataclasses.replace(TINY, learned_variance=True))
    assert lv(x, t, zi).shape == (3, 6, 16, 16)
    with pytest.raises(ValueError, match="image_emb"):
        m(x, t, zi[:, :10])
    with pytest.raises(ValueError, match="text_states"):
        m(x, t, zi, zt, states[..., :7])


def test_patches_fold_into_channels():
    """patch_size 2: the U-Net runs at half the resolution on 4x the channels; the decoder still
    maps images to images (and learned variance to twice the channels)."""
    cfg = dataclasses.replace(TINY, patch_size=2)
    x, zi, zt, states = batch()
    t = torch.tensor([0, 500, 999])
    m = make(cfg)
    assert (m.unet.config.sample_size, m.unet.config.in_channels) == (8, 12)
    assert m(x, t, zi, zt, states).shape == x.shape
    assert make(dataclasses.replace(cfg, learned_variance=True))(x, t, zi).shape == (3, 6, 16, 16)
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(TINY, patch_size=3)


def test_a_caption_as_long_as_the_image_is_masked_right():
    """The mid block attends at 8x8 = 64 positions; a context of 64 tokens (4 from z_i + a 60-token
    caption) once crashed diffusers' mask padding. Padding tokens, masked out, change nothing."""
    m = make()
    x, zi, zt, states = batch(L=60)
    t = torch.tensor([0, 500, 999])
    mask = torch.ones(3, 60, dtype=torch.bool)
    mask[0, 30:] = False
    padded_states, padded_mask = torch.nn.functional.pad(states, (0, 0, 0, 1)), torch.nn.functional.pad(mask, (0, 1))
    torch.testing.assert_close(m(x, t, zi, zt, states, mask), m(x, t, zi, zt, padded_states, padded_mask))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="attention_resolutions"):
        DecoderConfig(image_size=32, block_out_channels=[32, 64], attention_resolutions=[4], norm_num_groups=8)
    with pytest.raises(ValueError, match="prediction_type"):
        dataclasses.replace(TINY, prediction_type="x0")
    with pytest.raises(ValueError, match="text_drop_prob"):
        dataclasses.replace(TINY, text_drop_prob=1.5)


def test_sizes_and_attention_placement():
    counts = {}
    for name, cfg in SIZES.items():
        with torch.device("meta"):  # no memory: count parameters of even the paper size
            m = Decoder(cfg)
        counts[name] = sum(p.numel() for p in m.parameters())
        # attention exactly at the configured resolutions (+ the mid block)
        attn_blocks = [i for i, b in enumerate(m.unet.down_blocks) if hasattr(b, "attentions")]
        assert [cfg.block_resolutions()[i] for i in attn_blocks] == sorted(cfg.attention_resolutions, reverse=True)
        assert m.unet.config.class_embed_type == "identity"
        assert m.text_proj.clip_image_embeddings_project_to_time_embeddings.out_features == 4 * cfg.block_out_channels[0]
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["paper"]
    assert 0.8e9 < counts["base"] < 1.0e9  # Karlo's decoder is ~900M


def test_text_proj_matches_diffusers_reference():
    import diffusers.pipelines.deprecated.unclip.text_proj as mod  # diffusers is pinned: no skip
    ref = mod.UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=24, time_embed_dim=32, cross_attention_dim=16)
    ours = TextProj(24, 32, 16, 4)
    perturb(ref)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    g = torch.Generator().manual_seed(0)
    zi, zt, states = torch.randn(2, 24, generator=g), torch.randn(2, 24, generator=g), torch.randn(2, 6, 24, generator=g)
    ctx_ref, time_ref = ref(image_embeddings=zi, prompt_embeds=zt, text_encoder_hidden_states=states, do_classifier_free_guidance=False)
    ctx, time_add = ours(zi, zt, states)
    torch.testing.assert_close(ctx, ctx_ref)
    torch.testing.assert_close(time_add, time_ref)
    assert ctx.shape == (2, 4 + 6, 16)


def test_dropout_rates_within_tolerance():
    cfg = dataclasses.replace(TINY, image_drop_prob=0.1, text_drop_prob=0.5)
    m = make(cfg)
    seen = {"image": [], "text": []}

    def spy(x, t, zi, zt, states, mask, drop_image, drop_text):  # replaces the U-Net pass
        seen["image"].append(drop_image)
        seen["text"].append(drop_text)
        return torch.zeros_like(x, requires_grad=True)

    m.forward = spy
    x, zi, zt, states = batch(B=200)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        training_loss(m, {"image": x, "image_emb": zi, "text_emb": zt, "text_states": states}, generator=g)
    di, dt = torch.cat(seen["image"]).float(), torch.cat(seen["text"]).float()
    n = di.numel()
    for rate, p in ((di.mean(), 0.1), (dt.mean(), 0.5), ((di * dt).mean(), 0.05)):  # independent draws
        assert abs(rate.item() - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_dropped_rows_use_the_learned_nulls():
    m = perturb(make())
    x, zi, zt, states = batch()
    t = torch.tensor([10, 400, 900])
    yes, no = torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)
    null_i = m.text_proj.learned_classifier_free_guidance_embeddings.expand(3, -1)
    dropped = m(x, t, zi, zt, states, drop_image=yes, drop_text=no)
    torch.testing.assert_close(dropped, m(x, t, null_i, zt, states))
    both = m(x, t, zi, zt, states, drop_image=yes, drop_text=yes)
    nulls = m(x, t, null_i, m.null_text_emb.expand(3, -1), m.null_text_states.expand(3, -1, -1))
    torch.testing.assert_close(both, nulls)
    torch.testing.assert_close(both, m(x, t, null_i))  # dropped caption == no caption
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)  # padding does not change the null branch
    torch.testing.assert_close(m(x, t, zi, zt, states, mask, drop_image=yes, drop_text=yes), both)
    # only the selected rows change
    some = torch.tensor([True, False, False])
    part = m(x, t, zi, zt, states, drop_image=some, drop_text=some)
    full = m(x, t, zi, zt, states)
    torch.testing.assert_close(part[1:], full[1:])
    assert not torch.allclose(part[:1], full[:1])
    # the unconditional branch of the denoiser is the fully-dropped network
    fn = m.model_fn(zi, zt, states)
    torch.testing.assert_close(fn(x, t, False), both)
    torch.testing.assert_close(fn(x, t, True), full)
    # guidance runs both branches as one batch of 2B rows; the same as the two passes above
    for scale in (0.0, 3.0):
        torch.testing.assert_close(diffusion.guided(fn, scale)(x, t), both + scale * (full - both), rtol=1e-5, atol=1e-5)


def test_guidance_one_equals_conditional_sample():
    m = perturb(make())
    _, zi, zt, states = batch()
    a = m.sample(zi, zt, states, steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, m.sample(zi, zt, states, steps=4, x_T=x_T))
    b = m.sample(zi, zt, states, steps=4, guidance_scale=3.0, x_T=x_T)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("patch_size", [1, 2])
def test_loss_falls_and_overfits_four_images(patch_size):
    """x0-prediction decoder, no dropout: 150 steps make a DDIM sample reproduce each training
    image from its z_i (and not the others), on pixels or on 2x2 patches."""
    cfg = dataclasses.replace(TINY, prediction_type="sample", image_drop_prob=0.0, text_drop_prob=0.0, patch_size=patch_size)
    m = make(cfg).train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    imgs = torch.stack([
        torch.stack([xx, -xx, yy]), torch.stack([yy * 0 + 0.8, xx * yy, -yy]),
        torch.stack([(xx**2 + yy**2 < 0.5).float() * 2 - 1] * 3), torch.stack([xx.sign(), yy.sign(), (xx * yy).sign()]),
    ])
    g = torch.Generator().manual_seed(0)
    zi = torch.nn.functional.normalize(torch.randn(4, cfg.embed_dim, generator=g), dim=-1) * 8
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss, _ = training_loss(m, {"image": imgs, "image_emb": zi}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])
    m.eval()
    out = m.sample(zi, steps=20, generator=torch.Generator().manual_seed(1))
    mse = ((out - imgs) ** 2).mean(dim=(1, 2, 3))
    other = ((out - imgs.roll(1, 0)) ** 2).mean(dim=(1, 2, 3))
    assert mse.max() < 0.05, mse
    assert other.min() > 10 * mse.max()


def test_learned_variance_loss_is_finite_and_trains_variance_head():
    m = make(dataclasses.replace(TINY, learned_variance=True)).train()
    x, zi, zt, states = batch()
    loss, metrics = training_loss(m, {"image": x, "image_emb": zi, "text_emb": zt, "text_states": states},
                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(metrics) == {"loss", "mse", "vlb"}
    loss.backward()
    assert m.unet.conv_out.weight.grad[3:].abs().sum() > 0  # the variance channels get gradient
    m.eval()
    out = m.sample(zi, steps=3, sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def improved_ddpm_vlb_bits(sched, out, x0, x_t, t):
    """Reference L_t in bits/dim per sample, float64, from the papers' formulas (DDPM eqs. 6-7 and
    13, Improved DDPM section 3.1 with the clipped beta~ at t = 0), with torch.distributions for
    the KL and the Gaussian CDF, and diffusers' DDPMScheduler for the learned-range variance (t > 0)."""
    from torch.distributions import Normal, kl_divergence

    abar = sched.alphas_cumprod.double()
    C = x0.shape[1]
    rows = []
    for i, ti in enumerate(t.tolist()):
        a_t, a_prev = abar[ti], abar[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a_t / a_prev
        x, xt, m, v = x0[i].double(), x_t[i].double(), out[i, :C].double(), out[i, C:].double()
        x0_hat = {"epsilon": (xt - (1 - a_t).sqrt() * m) / a_t.sqrt(), "sample": m,
                  "v_prediction": a_t.sqrt() * xt - (1 - a_t).sqrt() * m}[sched.config.prediction_type]
        mean = lambda z: a_prev.sqrt() * beta / (1 - a_t) * z + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * xt
        if ti > 0:
            log_var = sched._get_variance(ti, predicted_variance=v.float()).double()  # diffusers' learned_range
            post = Normal(mean(x), ((1 - a_prev) / (1 - a_t) * beta).sqrt())
            nats = kl_divergence(post, Normal(mean(x0_hat), (0.5 * log_var).exp())).mean()
        else:
            beta1 = 1 - abar[1] / abar[0]
            clipped = (1 - abar[0]) / (1 - abar[1]) * beta1  # beta~_1
            frac = (v + 1) / 2
            p = Normal(mean(x0_hat), (0.5 * (frac * beta.log() + (1 - frac) * clipped.log())).exp())
            hi = torch.where(x > 0.999, torch.ones_like(x), p.cdf(x + 1 / 255))
            lo = torch.where(x < -0.999, torch.zeros_like(x), p.cdf(x - 1 / 255))
            nats = -(hi - lo).log().mean()
        rows.append(nats / math.log(2))
    return torch.stack(rows)


def vlb_case(kind, B=6, seed=0):
    from models import diffusion

    sched = diffusion.make_scheduler("ddpm", prediction_type=kind, learned_variance=True)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (B, 3, 4, 4), generator=g).float() / 127.5 - 1  # 8-bit data, incl. the end bins
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0
    t = torch.tensor([0, 0, 1, 37, 600, 999])[:B]
    x_t = diffusion.add_noise(sched, x0, torch.randn(x0.shape, generator=g), t)
    out = torch.cat([torch.randn(x0.shape, generator=g), 1.5 * (torch.rand(x0.shape, generator=g) * 2 - 1)], 1)
    out[:2, :3] = x0[:2] + 0.01 * torch.randn(2, 3, 4, 4, generator=g) if kind == "sample" else out[:2, :3]
    return sched, out, x0, x_t, t


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_vlb_terms_match_the_papers_formulas(kind):
    """Per-sample L_t (bits/dim) against an independent float64 computation; the predicted x0 is
    not clamped (large x0 predictions at high t would change the KL if it were)."""
    from models import diffusion

    sched, out, x0, x_t, t = vlb_case(kind)
    ours = diffusion.vlb_terms(sched, out, x0, x_t, t)
    torch.testing.assert_close(ours.double(), improved_ddpm_vlb_bits(sched, out, x0, x_t, t), rtol=2e-4, atol=1e-5)


def test_hybrid_loss_weight_is_improved_ddpms():
    """L_hybrid = L_simple + lambda L_vlb with lambda = 0.001 and L_vlb = sum over all T
    timesteps in bits/dim (Improved DDPM: the bits/dim term of one uniform t times T/1000)."""
    cfg = dataclasses.replace(TINY, learned_variance=True)
    m = make(cfg).train()
    assert cfg.vlb_weight == 0.001
    sched, _, x0, _, _ = vlb_case("epsilon", B=4)
    x0 = torch.nn.functional.interpolate(x0, size=cfg.image_size, mode="nearest")
    g = torch.Generator().manual_seed(1)
    out = torch.randn(4, 6, cfg.image_size, cfg.image_size, generator=g)
    t, noise = torch.tensor([0, 3, 400, 999]), torch.randn(x0.shape, generator=g)
    m.forward = lambda *args: out.clone().requires_grad_()  # a fixed network output
    _, zi, _, _ = batch(B=4)
    loss, metrics = training_loss(m, {"image": x0, "image_emb": zi, "t": t, "noise": noise})
    a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    simple = ((out[:, :3].double() - noise.double()) ** 2).mean()
    expected = simple + 0.001 * 1000 * improved_ddpm_vlb_bits(sched, out, x0, x_t.float(), t).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=1e-6)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    m = perturb(make())
    checkpoint.save(m, tmp_path / "dec")
    loaded = checkpoint.load(tmp_path / "dec").eval()
    assert isinstance(loaded, Decoder) and loaded.config == m.config
    x, zi, zt, states = batch()
    t = torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(m(x, t, zi, zt, states), loaded(x, t, zi, zt, states))


def test_diffusers_directory_loads_with_same_forward(tmp_path):
    from diffusers import UNet2DConditionModel

    from models.decoder import unet_kwargs

    import diffusers.pipelines.deprecated.unclip.text_proj as mod  # diffusers is pinned: no skip
    torch.manual_seed(3)
    unet = perturb(UNet2DConditionModel(**unet_kwargs(TINY))).eval()
    proj = perturb(mod.UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=TINY.embed_dim,
                                           time_embed_dim=TINY.time_embed_dim, cross_attention_dim=TINY.cross_attention_dim))
    unet.save_pretrained(tmp_path / "decoder")
    proj.save_pretrained(tmp_path / "text_proj")
    m = Decoder.from_diffusers(tmp_path / "decoder", tmp_path / "text_proj").eval()
    assert m.config.image_size == 16 and m.config.attention_resolutions == [8]
    x, zi, zt, states = batch()
    t = torch.tensor([5, 50, 500])
    with torch.no_grad():
        ctx, add = proj(image_embeddings=zi, prompt_embeds=zt, text_encoder_hidden_states=states, do_classifier_free_guidance=False)
        ref = unet(x, t, encoder_hidden_states=ctx, class_labels=add).sample
        torch.testing.assert_close(m(x, t, zi, zt, states), ref)
        # identical weights; the forward is diffusers' up to reassociation (models.decoder.fast_blocks)
        assert all(torch.equal(p, unet.state_dict()[k]) for k, p in m.unet.state_dict().items())
        torch.testing.assert_close(m.unet(x, t, encoder_hidden_states=ctx, class_labels=add).sample, ref)


def test_attention_head_dim_is_head_width_for_simple_cross_attention():
    """diffusers' SimpleCrossAttn blocks split channels into channels // attention_head_dim heads
    (unlike its transformer blocks, where the argument counts heads)."""
    m = make()
    attn = m.unet.down_blocks[1].attentions[0]
    assert attn.heads == TINY.block_out_channels[1] // TINY.attention_head_dim


def test_training_loss_under_bf16_autocast():
    m = make(dataclasses.replace(TINY, learned_variance=True)).train()
    x, zi, zt, states = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = training_loss(m, {"image": x, "image_emb": zi, "text_emb": zt, "text_states": states},
                                generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_format_1_config_migrates(tmp_path):
    """Format 1 spelt the CLIP width clip_dim and the dropout rates image_emb_dropout/text_dropout."""
    m = make()
    checkpoint.save(m, tmp_path)
    path = tmp_path / checkpoint.CONFIG_NAME
    header = json.loads(path.read_text())
    assert header["format_version"] == 2
    config = header["config"]
    for new, old in (("embed_dim", "clip_dim"), ("image_drop_prob", "image_emb_dropout"), ("text_drop_prob", "text_dropout")):
        config[old] = config.pop(new)
    path.write_text(json.dumps({**header, "format_version": 1, "config": config}))
    assert checkpoint.load(tmp_path).config == m.config


def test_diffusers_directory_with_unsupported_settings_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from models.decoder import unet_kwargs

    UNet2DConditionModel(**{**unet_kwargs(TINY), "resnet_out_scale_factor": 2.0}).save_pretrained(tmp_path / "d")
    with pytest.raises(checkpoint.CheckpointError, match="resnet_out_scale_factor"):
        Decoder.from_diffusers(tmp_path / "d")


def test_upsample_conv3x3_matches_upsample_then_conv():
    from models.decoder import upsample_conv3x3

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    torch.testing.assert_close(upsample_conv3x3(x, w, b), ref)
    torch.testing.assert_close(upsample_conv3x3(x, w, None), ref - b[:, None, None])


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, block_out_channels=[32, 48, 64], image_size=16, attention_resolutions=[4])])
def test_fast_blocks_match_diffusers_forward_and_gradients(cfg):
    """The swapped-in block implementations compute what diffusers' blocks compute (values and
    parameter gradients), in float64 so that only reassociation can differ."""
    from diffusers import UNet2DConditionModel

    from models.decoder import _ResnetBlock, unet_kwargs

    m = perturb(make(cfg)).double().train()
    assert sum(type(b) is _ResnetBlock for b in m.unet.modules()) >= 6  # incl. the up/down resampling blocks
    ref = UNet2DConditionModel(**unet_kwargs(cfg)).double().train()
    ref.load_state_dict(m.unet.state_dict())
    x, zi, zt, states = (a.double() for a in batch(cfg=cfg))
    t = torch.tensor([3, 300, 900])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ctx, add = m.text_proj(zi, zt, states)
    amask = torch.nn.functional.pad(mask, (4, 0), value=True)
    outs = []
    for net in (m.unet, ref):
        out = net(x, t, encoder_hidden_states=ctx.detach(), class_labels=add.detach(), attention_mask=amask).sample
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    grads = dict(ref.named_parameters())
    for name, p in m.unet.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_karlo_layout_samples_as_diffusers_unclip_pipeline(tmp_path):
    """Karlo-style decoder/ + text_proj/ directories (tiny, diffusers' save_pretrained) with the
    empty caption's encoding as the null caption: our guided DDPM sampling equals the decoder half
    of diffusers' UnCLIPPipeline written out with diffusers' components (UnCLIPTextProjModel with
    classifier-free guidance, UNet2DConditionModel, UnCLIPScheduler with learned_range), on the
    same timesteps and noise draws."""
    from diffusers import UNet2DConditionModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from models.decoder import unet_kwargs

    cfg = dataclasses.replace(TINY, learned_variance=True)
    torch.manual_seed(3)
    unet = perturb(UNet2DConditionModel(**unet_kwargs(cfg))).eval()
    proj = perturb(UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=cfg.embed_dim,
                                       time_embed_dim=cfg.time_embed_dim, cross_attention_dim=cfg.cross_attention_dim)).eval()
    unet.save_pretrained(tmp_path / "decoder")
    proj.save_pretrained(tmp_path / "text_proj")
    m = Decoder.from_diffusers(tmp_path / "decoder", tmp_path / "text_proj").eval()
    _, zi, zt, states = batch(B=2, L=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    empty_emb, empty_states, empty_mask = torch.randn(cfg.embed_dim, generator=g), torch.randn(6, cfg.text_dim, generator=g), torch.arange(6) < 2
    m.set_null_condition(empty_emb, empty_states, empty_mask)
    assert m.config.null_text_len == 2
    steps, scale = 3, 3.0

    karlo = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000)
    # in float64: at t = 999 its alpha = 1 - beta loses all float32 digits (beta ~ 1 - 1e-8)
    karlo.alphas_cumprod, karlo.one = karlo.alphas_cumprod.double(), karlo.one.double()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen)
    with torch.no_grad():
        ctx, add = proj(image_embeddings=zi, prompt_embeds=torch.cat([empty_emb.expand(2, -1), zt]),
                        text_encoder_hidden_states=torch.cat([empty_states.expand(2, -1, -1), states]),
                        do_classifier_free_guidance=True)
        attn = torch.nn.functional.pad(torch.cat([empty_mask.expand(2, -1), mask]), (4, 0), value=True)
        ts = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]
        for i, t in enumerate(ts):
            uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx, class_labels=add, attention_mask=attn).sample.chunk(2)
            eps = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            step = karlo.step(torch.cat([eps, cond[:, 3:]], 1), t, x, prev_timestep=prev, generator=gen)
            # diffusers' pipeline ends at t = 0, where UnCLIPScheduler adds no noise; here the last
            # step is at t > 0 and lands on abar = 1, whose noise-free mean is the clamped x0
            x = step.prev_sample if prev >= 0 else step.pred_original_sample
    expected = x.float().clamp(-1, 1)
    ours = m.sample(zi, zt, states, mask, steps=steps, sampler="ddpm", guidance_scale=scale, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)

    # the null caption travels with the checkpoint; one written before null_text_len existed loads too
    checkpoint.save(m, tmp_path / "ours")
    again = checkpoint.load(tmp_path / "ours").eval()
    assert again.config.null_text_len == 2 and torch.equal(again.null_text_states, m.null_text_states)
    old = make()
    state = {k: (v[0] if k == "null_text_states" else v) for k, v in perturb(make()).state_dict().items()}
    old.load_state_dict(state)
    assert torch.equal(old.null_text_states[0], state["null_text_states"])


def test_min_snr_loss_weights_each_rows_mse():
    """The weighted loss is the mean over rows of min_snr_weight times that row's plain MSE (each
    row's plain loss taken alone, with the same t and noise)."""
    weighted = make(dataclasses.replace(TINY, prediction_type="v_prediction", min_snr_gamma=5.0)).train()
    plain = make(dataclasses.replace(TINY, prediction_type="v_prediction")).train()
    x, zi, zt, states = batch(B=4)
    g = torch.Generator().manual_seed(2)
    t, noise = torch.tensor([2, 200, 600, 990]), torch.randn(x.shape, generator=g)
    rows = {"image": x, "image_emb": zi, "text_emb": zt, "text_states": states, "t": t, "noise": noise,
            "drop_image": torch.zeros(4, dtype=torch.bool), "drop_text": torch.zeros(4, dtype=torch.bool)}
    loss, _ = training_loss(weighted, rows)
    per_row = torch.stack([training_loss(plain, {k: v[i:i + 1] for k, v in rows.items()})[0] for i in range(4)])
    w = diffusion.min_snr_weight(plain.training_scheduler, t, 5.0)
    assert w[0] < 0.01 and w[-1] < 1.0  # nearly clean rows count little
    torch.testing.assert_close(loss, (w * per_row).mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DecoderConfig(min_snr_gamma=0.0)


def test_decoder_draws_its_training_timesteps_from_its_config():
    """timestep_logit_mean moves the decoder's training timesteps: the same generator gives
    other t (seen through the loss, all else fixed) and a bad std is refused."""
    x, zi, zt, states = batch(B=4)
    rows = {"image": x, "image_emb": zi, "text_emb": zt, "text_states": states, "noise": torch.randn(x.shape),
            "drop_image": torch.zeros(4, dtype=torch.bool), "drop_text": torch.zeros(4, dtype=torch.bool)}
    shifted = make(dataclasses.replace(TINY, timestep_logit_mean=2.0, timestep_logit_std=0.1)).train()
    loss, _ = training_loss(shifted, rows, torch.Generator().manual_seed(3))
    # logit 2 +- 0.1: every t is within [845, 909] (4 sigma), so the loss is that of those fixed timesteps
    t = diffusion.sample_timesteps(4, shifted.training_scheduler, torch.Generator().manual_seed(3),
                                   logit_mean=2.0, logit_std=0.1)
    assert ((t >= 845) & (t <= 909)).all()
    fixed, _ = training_loss(shifted, {**rows, "t": t})
    torch.testing.assert_close(loss, fixed)
    with pytest.raises(ValueError, match="timestep_logit_std"):
        DecoderConfig(timestep_logit_std=0.0)
