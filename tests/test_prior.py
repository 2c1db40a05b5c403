"""Diffusion prior: shapes, training objective, guidance, sampler configuration, checkpoints,
and loading diffusers-format PriorTransformer weights (diffusers is the reference)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer
from torch.nn import functional as F

from models import checkpoint
from models.objective import BatchError
from models.prior import SIZES, DiffusionPrior, PriorConfig, best_of, make_scheduler, row_groups, training_loss
from models.sizes import config_for

TINY = SIZES["tiny"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (diffusers zero-initialises some parameters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _data(n: int, config: PriorConfig = TINY, tokens: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or config.text_len
    return {
        "image_emb": F.normalize(torch.randn(n, config.embed_dim, generator=g), dim=-1),
        "text_emb": F.normalize(torch.randn(n, config.embed_dim, generator=g), dim=-1),
        "text_states": torch.randn(n, tokens, config.text_dim, generator=g),
    }


def test_shapes_and_input_errors():
    torch.manual_seed(0)
    model = DiffusionPrior(replace(TINY, text_dim=24))  # text width != embed width goes through text_in
    d = _data(3, model.config, tokens=5)  # fewer tokens than text_len: padded and masked
    x = torch.randn(3, TINY.embed_dim)
    assert model(x, torch.tensor([0, 10, 999]), d["text_emb"], d["text_states"]).shape == (3, TINY.embed_dim)
    loss, metrics = training_loss(model, d)
    assert set(metrics) == {"loss", "mse"} and not metrics["loss"].requires_grad
    assert loss.ndim == 0 and torch.isfinite(loss)
    z = model.sample(d["text_emb"], d["text_states"], steps=3, candidates=2, guidance_scale=2.0)
    assert z.shape == (3, TINY.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="text_states"):
        model(x, 0, d["text_emb"], torch.randn(3, TINY.text_len + 1, 24))
    with pytest.raises(ValueError, match="x_t"):
        model(torch.randn(3, 7), 0, d["text_emb"], d["text_states"])
    with pytest.raises(BatchError, match="text_states"):
        training_loss(model, {"image_emb": d["image_emb"], "text_emb": d["text_emb"]})
    with pytest.raises(ValueError, match="sampler"):
        model.sample(d["text_emb"], d["text_states"], sampler="euler")
    with pytest.raises(ValueError, match="text_drop_prob"):
        PriorConfig(text_drop_prob=1.5)
    with pytest.raises(ValueError, match="unknown prior size"):
        config_for("prior", "huge")
    assert set(SIZES) >= {"tiny", "small", "base", "paper"}


def test_causal_mask_is_applied():
    """diffusers applies its causal mask only when attention_mask is passed; we always pass one,
    so earlier tokens never see later ones: the text-token outputs ignore the noised z_i."""
    torch.manual_seed(0)
    model = DiffusionPrior(TINY).eval()
    _perturb(model)
    d = _data(2)
    seen, out = [], []
    # the last block's input is normed at every position (its query is the final one only)
    hook = model.transformer.transformer_blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    out.append(model(torch.randn(2, TINY.embed_dim), 5, d["text_emb"], d["text_states"]))
    out.append(model(torch.randn(2, TINY.embed_dim), 5, d["text_emb"], d["text_states"]))
    hook.remove()
    L = TINY.text_len
    torch.testing.assert_close(seen[0][:, : L + 2], seen[1][:, : L + 2])  # text, z_t, time: unchanged
    assert not torch.allclose(seen[0][:, L + 2], seen[1][:, L + 2])  # z_i's own position changes
    assert not torch.allclose(out[0], out[1])  # the final query sees z_i


def test_row_groups():
    assert row_groups([8, 8, 8]) == [([0, 1, 2], 8)]
    assert row_groups([8, 1, 8, 3, 8]) == [([1, 3], 3), ([0, 2, 4], 8)]
    assert row_groups([1] + [77] * 63) == [(list(range(64)), 77)]  # saves < 5%: one group
    assert row_groups([5]) == [([0], 5)]


def test_forward_equals_full_diffusers_computation():
    """Our forward skips work (rows run in groups by caption length, the last block computes the
    final query only, causal-only attention for groups without padding): outputs and gradients
    must equal diffusers' PriorTransformer.forward, which computes everything."""
    torch.manual_seed(0)
    model = DiffusionPrior(TINY).train()
    _perturb(model)
    d = _data(5)
    lengths = torch.tensor([8, 1, 8, 3, 8])  # groups {1, 3} (padded, float mask) and {8, 8, 8} (causal only)
    assert len(row_groups(lengths.tolist())) == 2
    mask = torch.arange(TINY.text_len) < lengths[:, None]
    x, t = torch.randn(5, TINY.embed_dim), torch.tensor([0, 10, 999, 500, 3])
    w = torch.randn(5, TINY.embed_dim)
    grads = []
    for forward in (
        lambda: model(x, t, d["text_emb"], d["text_states"], mask),
        lambda: model.transformer(x, t, proj_embedding=d["text_emb"], encoder_hidden_states=d["text_states"], attention_mask=mask).predicted_image_embedding,
    ):
        model.zero_grad()
        out = forward()
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None}))
    (ours, ours_grad), (ref, ref_grad) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_grad.keys() == ref_grad.keys()
    for name in ref_grad:
        torch.testing.assert_close(ours_grad[name], ref_grad[name], rtol=1e-5, atol=1e-5, msg=name)


def test_null_condition_from_an_encoded_empty_caption():
    """set_null_condition: the unconditional branch becomes the given (short) caption encoding."""
    torch.manual_seed(0)
    model = DiffusionPrior(TINY).eval()
    _perturb(model)
    empty = _data(1, tokens=2)
    model.set_null_condition(empty["text_emb"][0], empty["text_states"][0])
    assert model.null_text_mask.tolist() == [True, True] + [False] * (TINY.text_len - 2)
    d, x, t = _data(2), torch.randn(2, TINY.embed_dim), torch.tensor([10, 900])
    with torch.no_grad():
        uncond = model.model_fn(d["text_emb"], d["text_states"], None)(x, t, False)
        expected = model(x, t, empty["text_emb"].expand(2, -1), empty["text_states"].expand(2, -1, -1))
    torch.testing.assert_close(uncond, expected)


def test_overfits_32_pairs():
    torch.manual_seed(0)
    model = DiffusionPrior(TINY)
    d = _data(32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        loss, _ = training_loss(model, d, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.2 * sum(losses[:20])
    model.eval()
    z = model.sample(d["text_emb"], d["text_states"], steps=16, candidates=1, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(z, d["image_emb"], dim=-1)
    assert cos.mean() > 0.95, cos


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_text_dropout_rate(p):
    """Count the rows whose conditioning reaching the transformer is the null condition."""
    torch.manual_seed(0)
    model = DiffusionPrior(replace(TINY, text_drop_prob=p))
    with torch.no_grad():
        model.null_text_emb.fill_(7.0)
        model.null_text_states.fill_(-3.0)
    seen = []
    seen_states = []
    model.transformer.embedding_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.transformer.encoder_hidden_states_proj.register_forward_pre_hook(lambda m, a: seen_states.append(a[0]))
    d = _data(2048)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            training_loss(model, d, generator=g)
    emb = torch.cat(seen)
    # per call: rows are run in groups of different caption lengths (dropped rows: one token)
    states_dropped = torch.cat([(states == -3.0).all(-1).all(-1) for states in seen_states])
    dropped = (emb == 7.0).all(-1)
    assert torch.equal(dropped, states_dropped)  # embedding and tokens dropped together
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_guidance_combination():
    torch.manual_seed(0)
    model = DiffusionPrior(TINY).eval()
    _perturb(model)
    d = _data(3, tokens=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x, t = torch.randn(3, TINY.embed_dim), torch.tensor(321)
    with torch.no_grad():
        cond = model(x, t, d["text_emb"], d["text_states"], mask)
        uncond = model(x, t, model.null_text_emb.expand(3, -1), model.null_text_states.expand(3, -1, -1), model.null_text_mask.expand(3, -1))
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(model.guided_x0(x, t, d["text_emb"], d["text_states"], mask, 1.0), cond)
        for s in (0.0, 2.5, 4.0):
            guided = model.guided_x0(x, t, d["text_emb"], d["text_states"], mask, s)
            torch.testing.assert_close(guided, uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(guided, cond + (s - 1) * (cond - uncond), rtol=1e-5, atol=1e-5)


def _cosine_betas(T: int) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, written out independently of diffusers."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float32)


def test_scheduler_configuration_pinned():
    config = TINY
    for sampler, cls in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)):
        ours = make_scheduler(config, sampler)
        assert type(ours) is cls
        assert ours.config.prediction_type == "sample"
        assert ours.config.clip_sample is False
        assert ours.config.timestep_spacing == "trailing"
        torch.testing.assert_close(ours.betas, _cosine_betas(1000), rtol=1e-4, atol=1e-6)
        ours.set_timesteps(4)
        assert ours.timesteps.tolist() == [999, 749, 499, 249]  # first step is the noisiest one
    assert make_scheduler(config, "ddpm").config.variance_type == "fixed_small"
    assert make_scheduler(config, "ddim").config.set_alpha_to_one is True
    clipped = make_scheduler(replace(config, clip_sample=5.0), "ddim")
    assert clipped.config.clip_sample is True and clipped.config.clip_sample_range == 5.0

    # One DDIM (eta=0) step with an x0 prediction, by hand from the schedule.
    ddim = make_scheduler(config, "ddim")
    ddim.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x_t, x0 = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    abar = torch.cumprod(1 - _cosine_betas(1000).double(), 0)
    a_t, a_prev = abar[749], abar[499]
    eps = (x_t.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ddim.step(x0, 749, x_t).prev_sample.double(), expected, rtol=1e-4, atol=1e-5)


def test_candidates_keep_highest_dot():
    zt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.2, 0.9], [0.8, 0.1]], [[0.9, 0.3], [0.1, 0.5]]])
    assert torch.equal(best_of(cands, zt), torch.tensor([[0.8, 0.1], [0.1, 0.5]]))

    # Integration: candidates=2 picks, per caption, the better of the two draws that
    # candidates=1 on the caption repeated twice produces from the same noise.
    torch.manual_seed(0)
    model = DiffusionPrior(TINY).eval()
    _perturb(model)
    d = _data(4)
    both = model.sample(
        d["text_emb"].repeat_interleave(2, 0), d["text_states"].repeat_interleave(2, 0),
        steps=4, candidates=1, generator=torch.Generator().manual_seed(3),
    ).view(4, 2, -1)
    best = model.sample(d["text_emb"], d["text_states"], steps=4, candidates=2, generator=torch.Generator().manual_seed(3))
    dots = (both * d["text_emb"][:, None]).sum(-1)
    assert not torch.allclose(both[:, 0], both[:, 1])
    torch.testing.assert_close(best, both[torch.arange(4), dots.argmax(1)])
    assert ((best * d["text_emb"]).sum(-1) >= dots.min(1).values).all()


def test_checkpoint_round_trip_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = DiffusionPrior(replace(TINY, text_dim=24, clip_sample=5.0)).eval()
    _perturb(model)
    checkpoint.save(model, tmp_path / "prior")
    loaded = checkpoint.load(tmp_path / "prior").eval()
    assert isinstance(loaded, DiffusionPrior) and loaded.config == model.config
    d = _data(3, model.config)
    x = torch.randn(3, TINY.embed_dim)
    with torch.no_grad():
        assert torch.equal(model(x, 17, d["text_emb"], d["text_states"]), loaded(x, 17, d["text_emb"], d["text_states"]))
    kw = dict(steps=5, sampler="ddpm", guidance_scale=3.0)
    a = model.sample(d["text_emb"], d["text_states"], generator=torch.Generator().manual_seed(1), **kw)
    b = loaded.sample(d["text_emb"], d["text_states"], generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_old_format_config_migrates(tmp_path):
    torch.manual_seed(0)
    model = DiffusionPrior(TINY)
    checkpoint.save(model, tmp_path)
    header = json.loads((tmp_path / checkpoint.CONFIG_NAME).read_text())
    old = dict(header["config"])
    old["clip_dim"] = old.pop("embed_dim")  # format 0 spelling
    del old["text_drop_prob"]
    (tmp_path / checkpoint.CONFIG_NAME).write_text(json.dumps({"class": header["class"], "format_version": 0, "config": old}))
    loaded = checkpoint.load(tmp_path)
    assert loaded.config == TINY
    assert asdict(loaded.config)["text_drop_prob"] == 0.1


def test_loads_diffusers_save_pretrained(tmp_path):
    torch.manual_seed(0)
    reference = PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=6, additional_embeddings=4
    ).eval()
    _perturb(reference)
    reference.save_pretrained(tmp_path / "prior")
    ours = DiffusionPrior.from_diffusers(tmp_path / "prior").eval()
    assert (ours.config.embed_dim, ours.config.text_len, ours.config.num_layers) == (16, 6, 2)
    g = torch.Generator().manual_seed(0)
    x, emb, states = torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        # second mask: padding shared by both rows, which our forward cuts off before the blocks
        for mask in ([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]):
            mask = torch.tensor(mask, dtype=torch.bool)
            expected = reference(x, t, proj_embedding=emb, encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
            torch.testing.assert_close(ours(x, t, emb, states, mask), expected, rtol=1e-5, atol=1e-5)
            # padding values do not matter, and neither does how much of it is passed
            n = int(mask.sum(1).max())
            torch.testing.assert_close(ours(x, t, emb, states[:, :n], mask[:, :n]), expected, rtol=1e-5, atol=1e-5)
        # The scaling is diffusers' post_process_latents (the perturbed clip_mean/std were loaded).
        torch.testing.assert_close(ours.from_latent(x), reference.post_process_latents(x))
        torch.testing.assert_close(ours.to_latent(ours.from_latent(x)), x, rtol=1e-4, atol=1e-4)
    # and it trains and saves like one of ours
    training_loss(ours.train(), {"image_emb": emb, "text_emb": emb, "text_states": states})[0].backward()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    checkpoint.save(ours, tmp_path / "ours")
    again = checkpoint.load(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, emb, states, mask), ours.eval()(x, t, emb, states, mask))

    bad = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16, num_embeddings=6, additional_embeddings=3)
    with pytest.raises(ValueError, match="additional_embeddings"):
        DiffusionPrior.from_diffusers(bad)


def test_karlo_layout_samples_as_diffusers_unclip_pipeline(tmp_path):
    """A Karlo-style directory pair (prior/ + prior_scheduler/, tiny, written by diffusers'
    save_pretrained): our guided DDPM sampling equals the prior half of diffusers'
    UnCLIPPipeline written out with diffusers' own components (PriorTransformer.forward with the
    empty caption's encoding as the unconditional branch, UnCLIPScheduler.step with its +-5 x0
    clamp, post_process_latents, no L2 normalisation), on the same timesteps and noise draws."""
    from diffusers import UnCLIPScheduler

    torch.manual_seed(0)
    D, L = 16, 6
    reference = PriorTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=D,
                                 num_embeddings=L, additional_embeddings=4).eval()
    _perturb(reference)
    with torch.no_grad():  # latents beyond +-5, so that the clamp matters
        reference.proj_to_clip_embeddings.weight.mul_(40.0)
        reference.clip_std.copy_(0.2 + torch.rand(D))
    reference.save_pretrained(tmp_path / "prior")
    karlo = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                            clip_sample_range=5.0)  # Karlo's prior scheduler (diffusers' conversion script)
    karlo.save_pretrained(tmp_path / "prior_scheduler")
    ours = DiffusionPrior.from_diffusers(tmp_path / "prior", scheduler=tmp_path / "prior_scheduler").eval()
    assert ours.config.clip_sample == 5.0 and ours.config.normalize is False

    g = torch.Generator().manual_seed(1)
    emb, states = 3 * torch.randn(2, D, generator=g), torch.randn(2, L, D, generator=g)  # unnormalised, as CLIP's projections
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    empty_emb, empty_states = 3 * torch.randn(D, generator=g), torch.randn(L, D, generator=g)
    empty_mask = torch.arange(L) < 2  # "" is [start, end]
    ours.set_null_condition(empty_emb, empty_states, empty_mask)
    steps, scale = 5, 4.0

    def diffusers_prior(clip: bool) -> torch.Tensor:
        scheduler = UnCLIPScheduler.from_config(karlo.config, clip_sample=clip)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2, D, generator=gen)  # prepare_latents (init_noise_sigma = 1)
        ts = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]  # our (trailing) timesteps
        both_emb = torch.cat([empty_emb.expand(2, -1), emb])
        both_states = torch.cat([empty_states.expand(2, -1, -1), states])
        both_mask = torch.cat([empty_mask.expand(2, -1), mask])
        with torch.no_grad():
            for i, t in enumerate(ts):
                pred = reference(torch.cat([x, x]), timestep=t, proj_embedding=both_emb, encoder_hidden_states=both_states,
                                 attention_mask=both_mask).predicted_image_embedding
                uncond, cond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)
                prev = ts[i + 1] if i + 1 < len(ts) else -1  # -1: abar = 1 (diffusers: t - 1 when t = 0)
                x = scheduler.step(pred, timestep=t, sample=x, prev_timestep=prev, generator=gen).prev_sample
            return reference.post_process_latents(x)

    expected = diffusers_prior(clip=True)
    assert not torch.allclose(expected, diffusers_prior(clip=False), atol=1e-3)  # the clamp acted
    z = ours.sample(emb, states, mask, steps=steps, sampler="ddpm", guidance_scale=scale, candidates=1,
                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
    assert (z.norm(dim=-1) - 1).abs().min() > 0.1  # not projected onto the unit sphere

    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionPrior.from_diffusers(tmp_path / "prior", scheduler=UnCLIPScheduler(prediction_type="epsilon"))
