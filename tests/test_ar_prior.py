"""AR prior: PCA tokenisation, shapes, causal masking, training objective, guidance,
dot-product conditioning and checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from models import checkpoint
from models.ar_prior import SIZES, ARPrior, ARPriorConfig, KVCache, training_loss
from models.objective import BatchError
from models.pca import fit_pca
from models.sizes import config_for
from tests.model_helpers import perturb

TINY = SIZES["tiny"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _embeddings(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors with a decaying spectrum, like CLIP embeddings (a few dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, d)
    return F.normalize(torch.randn(n, d, generator=g) * scales + 0.3, dim=-1)


def _model(config: ARPriorConfig = TINY, n: int = 2048, seed: int = 0) -> tuple[ARPrior, dict]:
    torch.manual_seed(seed)
    z_i = _embeddings(n, config.embed_dim, seed)
    z_t = F.normalize(z_i + 0.5 * _embeddings(n, config.embed_dim, seed + 1), dim=-1)
    basis = fit_pca(z_i, config.kept_dims, config.num_buckets, (z_i * z_t).sum(-1), config.similarity_buckets)
    g = torch.Generator().manual_seed(seed)
    data = {"image_emb": z_i, "text_emb": z_t, "text_states": torch.randn(n, config.text_len, config.text_dim, generator=g)}
    return ARPrior(config, basis), data


def test_tokenize_detokenize_within_half_bucket():
    model, data = _model()
    z = data["image_emb"]
    tokens = model.tokenize(z)
    c = TINY
    assert tokens.shape == (len(z), c.kept_dims) and tokens.min() >= 0 and tokens.max() < c.num_buckets
    coef = (z - model.pca_mean) @ model.pca_components.T
    centres = model.basis.bucket_centres.gather(1, tokens.T).T
    lo = model.bucket_edges.gather(1, tokens.T).T
    hi = model.bucket_edges.gather(1, tokens.T + 1).T
    assert ((coef >= lo - 1e-6) & (coef <= hi + 1e-6)).all()  # each value lies in its bucket
    assert ((centres - coef).abs() <= (hi - lo) / 2 + 1e-6).all()
    # quantile buckets: each bucket holds about 1/n_buckets of the fitting data
    counts = F.one_hot(tokens, c.num_buckets).sum(0).float()
    assert counts.min() >= 0.5 * len(z) / c.num_buckets
    # detokenize is bucket centres through the inverse PCA
    torch.testing.assert_close(model.detokenize(tokens, normalize=False), centres @ model.pca_components + model.pca_mean)
    # out-of-range values land in the end buckets
    far = model.tokenize(model.pca_mean + 100 * model.pca_components[:1])
    assert far[0, 0] == c.num_buckets - 1
    # with all dims kept and fine buckets the round trip is close to the identity
    full = config_for("ar_prior", "tiny", kept_dims=32, num_buckets=256)
    m = ARPrior(full, fit_pca(z, 32, 256))
    assert F.cosine_similarity(m.detokenize(m.tokenize(z)), z).min() > 0.99


def test_shapes_errors_and_causality():
    model, data = _model()
    model.eval()
    c, b = TINY, 3
    tokens = model.tokenize(data["image_emb"][:b])
    dot = model.dot_tokens(data["image_emb"][:b], data["text_emb"][:b])
    states, mask = data["text_states"][:b, :5], torch.tensor([[1, 1, 1, 0, 0]] * b, dtype=torch.bool)
    logits = model(tokens[:, :-1], dot, data["text_emb"][:b], states, mask)
    assert logits.shape == (b, c.kept_dims, c.num_buckets)
    # causal: changing token j changes no logits at positions <= j (which predict tokens <= j)
    changed = tokens[:, :-1].clone()
    changed[:, 6] = (changed[:, 6] + 5) % c.num_buckets
    logits2 = model(changed, dot, data["text_emb"][:b], states, mask)
    torch.testing.assert_close(logits[:, :7], logits2[:, :7])
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])
    # padded text tokens are ignored
    junk = states.clone()
    junk[:, 3:] = 100.0
    torch.testing.assert_close(model(tokens[:, :-1], dot, data["text_emb"][:b], junk, mask), logits)
    z = model.sample(data["text_emb"][:b], states, mask, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert z.shape == (b, c.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(b))
    with pytest.raises(ValueError, match="dot_bucket"):
        model.sample(data["text_emb"][:b], states, dot_bucket=c.similarity_buckets)
    with pytest.raises(ValueError, match="text_states"):
        model(tokens[:, :-1], dot, data["text_emb"][:b], torch.randn(b, c.text_len + 1, c.text_dim))
    with pytest.raises(ValueError, match="PcaBasis"):
        ARPrior(TINY, fit_pca(data["image_emb"], 4, TINY.num_buckets))
    with pytest.raises(RuntimeError, match="no PCA basis"):
        ARPrior(TINY).tokenize(data["image_emb"])
    with pytest.raises(BatchError, match="text_states"):
        training_loss(model, {"image_emb": data["image_emb"], "text_emb": data["text_emb"]})
    with pytest.raises(ValueError, match="unknown ar_prior size"):
        config_for("ar_prior", "huge")
    assert set(SIZES) >= {"tiny", "small", "base", "paper"}


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_text_dropout_rate(p):
    model, data = _model(replace(TINY, text_drop_prob=p), n=2048)
    with torch.no_grad():
        model.null_text_emb.fill_(7.0)
        model.null_text_states.fill_(-3.0)
    seen = []
    model.text_emb_in.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.text_states_in.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4):
            training_loss(model, data, generator=g)
    emb = torch.cat(seen[0::2])
    states = torch.cat(seen[1::2])
    dropped = (emb == 7.0).all(-1)
    assert torch.equal(dropped, (states == -3.0).all(-1).all(-1))
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / dropped.numel())


def test_guidance_combination():
    model, data = _model()
    model.eval()
    with torch.no_grad():
        for prm in (model.null_text_emb, model.null_text_states, model.null_dot):
            prm.normal_()
    b = 4
    tokens = model.tokenize(data["image_emb"][:b])[:, :5]
    dot = torch.tensor([0, 3, 5, 7])
    args = (data["text_emb"][:b], data["text_states"][:b], None)
    with torch.no_grad():
        cond = model(tokens, dot, *args)[:, -1]
        drop = torch.ones(b, dtype=torch.bool)
        uncond = model(tokens, dot, *args, drop_text=drop)[:, -1]
        # the unconditional prediction ignores the condition it replaces, and uses the null dot
        other = (data["text_emb"][b : 2 * b], data["text_states"][b : 2 * b, :3], None)
        torch.testing.assert_close(model(tokens, dot.flip(0), *other, drop_text=drop)[:, -1], uncond)
        model.null_dot.add_(1.0)
        assert not torch.allclose(model(tokens, dot, *args, drop_text=drop)[:, -1], uncond)
        model.null_dot.sub_(1.0)
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(model.guided_logits(tokens, dot, *args, 1.0), cond)
        for s in (0.0, 3.0):
            torch.testing.assert_close(model.guided_logits(tokens, dot, *args, s), cond + (s - 1) * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_trains_and_respects_dot_bucket():
    """Synthetic data where z_i.z_t varies a lot for the same caption: after brief training,
    sampling with a requested dot bucket lands in or near it."""
    torch.manual_seed(0)
    c = config_for("ar_prior", "tiny", embed_dim=8, text_dim=8, text_len=2, kept_dims=8, num_buckets=16, similarity_buckets=4, width=64, num_layers=2)
    n = 4096
    g = torch.Generator().manual_seed(0)
    captions = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    which = torch.randint(0, 4, (n,), generator=g)
    z_t = captions[which]
    a = torch.rand(n, generator=g) * 1.8 - 0.9  # the dot product z_i.z_t
    u = torch.randn(n, 8, generator=g)
    u = F.normalize(u - (u * z_t).sum(-1, keepdim=True) * z_t, dim=-1)
    z_i = a[:, None] * z_t + (1 - a[:, None] ** 2).sqrt() * u
    data = {"image_emb": z_i, "text_emb": z_t, "text_states": torch.stack([z_t, -z_t], 1)}
    model = ARPrior(c, fit_pca(z_i, 8, 16, (z_i * z_t).sum(-1), 4))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(250):
        idx = torch.randint(0, n, (128,), generator=g)
        loss, _ = training_loss(model, {k: v[idx] for k, v in data.items()}, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.95 * sum(losses[:20])  # most of each token is noise (u)
    model.eval()
    edges = model.dot_edges
    m = 64
    zt, states = captions.repeat(m // 4, 1), torch.stack([captions, -captions], 1).repeat(m // 4, 1, 1)
    means = []
    for bucket in (0, c.similarity_buckets - 1):
        z = model.sample(zt, states, dot_bucket=bucket, generator=torch.Generator().manual_seed(bucket))
        dots = (z * zt).sum(-1)
        hit = ((dots >= edges[bucket] - 0.1) & (dots <= edges[bucket + 1] + 0.1)).float().mean()
        assert hit > 0.6, (bucket, hit, dots)
        means.append(dots.mean())
    assert means[1] - means[0] > 0.8
    # default: the top half of the dot distribution
    default = model.default_dot_buckets(1000, torch.Generator().manual_seed(0))
    assert default.min() == c.similarity_buckets // 2 and default.max() == c.similarity_buckets - 1
    z = model.sample(zt, states, generator=torch.Generator().manual_seed(5))
    assert (z * zt).sum(-1).mean() > edges[c.similarity_buckets // 2] - 0.1


def test_checkpoint_round_trip_bit_identical(tmp_path):
    model, data = _model()
    model.eval()
    checkpoint.save(model, tmp_path / "ar")
    loaded = checkpoint.load(tmp_path / "ar").eval()
    assert isinstance(loaded, ARPrior) and loaded.config == model.config
    for name in ("pca_mean", "pca_components", "bucket_edges", "dot_edges"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    kw = dict(temperature=0.8, guidance_scale=2.0)
    args = (data["text_emb"][:3], data["text_states"][:3])
    a = model.sample(*args, generator=torch.Generator().manual_seed(1), **kw)
    b = loaded.sample(*args, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


def test_format_1_config_migrates(tmp_path):
    """Format 1 spelt the token sizes pca_dims / n_buckets / n_dot_buckets."""
    model, _ = _model()
    checkpoint.save(model, tmp_path)
    path = tmp_path / checkpoint.CONFIG_NAME
    header = json.loads(path.read_text())
    assert header["format_version"] == 2
    config = header["config"]
    for new, old in (("kept_dims", "pca_dims"), ("num_buckets", "n_buckets"), ("similarity_buckets", "n_dot_buckets")):
        config[old] = config.pop(new)
    path.write_text(json.dumps({**header, "format_version": 1, "config": config}))
    loaded = checkpoint.load(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.bucket_edges, model.bucket_edges)


def test_loads_the_pca_stage_artifact(tmp_path):
    """The pca stage's artifact, as written to disk and loaded by tasks.schema, sizes and feeds the
    model; its tokens are numpy's searchsorted on the stage's edges."""
    import numpy as np

    from tasks.context import StageContext
    from tasks.pca import PcaConfig, run
    from tasks.schema import embedding_file, embedding_schema, embedding_table, load_pca, write_embeddings

    n, d = 600, 32
    z = _embeddings(n, d)
    z_t = F.normalize(z + 0.5 * _embeddings(n, d, 1), dim=-1)
    (tmp_path / "embed").mkdir()
    columns = {"key": [f"{i:05d}" for i in range(n)], "caption": ["x"] * n, "shard": ["00000"] * n, "split": ["train"] * n,
               "image_emb": z.numpy(), "text_emb": z_t.numpy(), "text_tokens": np.zeros((n, 4), np.int32),
               "similarity": (z * z_t).sum(-1).numpy()}
    write_embeddings(embedding_table(columns, embedding_schema(d, 4, "float32")), embedding_file(tmp_path / "embed", "00000"))
    ctx = StageContext("pca", tmp_path, tmp_path / "pca", {"embed": tmp_path / "embed"}, show_progress=False)
    ctx.out_dir.mkdir()
    run(PcaConfig(kept_dims=12, num_buckets=32, similarity_buckets=8), ctx)
    artifact = load_pca(ctx.out_dir)
    model = ARPrior.from_basis(artifact, "tiny")
    c = model.config
    assert (c.embed_dim, c.kept_dims, c.num_buckets, c.similarity_buckets) == (32, 12, 32, 8)
    coords = ((z - artifact.mean) @ artifact.components[:12].T).numpy()
    edges = artifact.bucket_edges.numpy()
    expected = np.stack([np.searchsorted(edges[j, 1:-1], coords[:, j], side="right") for j in range(12)], 1)
    np.testing.assert_array_equal(model.tokenize(z).numpy(), expected)
    dot = (z * z_t).sum(-1)
    np.testing.assert_array_equal(model.dot_tokens(z, z_t).numpy(), np.searchsorted(artifact.dot_edges.numpy()[1:-1], dot.numpy(), side="right"))
    # the top half of the dot buckets is the top half of the training pairs' z_i.z_t
    assert (model.dot_tokens(z, z_t) >= c.similarity_buckets // 2).float().mean() == 0.5
    torch.testing.assert_close(model.detokenize(model.tokenize(z)), artifact.dequantize(artifact.quantize(z)))
    g = torch.Generator().manual_seed(0)
    assert model.sample(z_t[:2], torch.randn(2, c.text_len, c.text_dim), generator=g).shape == (2, 32)
    with pytest.raises(TypeError, match="not a models.pca.PcaBasis"):
        ARPrior.from_basis(object())


def test_refuses_to_train_or_sample_without_dot_edges(tmp_path):
    """Without fitted z_i.z_t edges the dot token means nothing (no silent uniform fallback)."""
    model, data = _model()
    no_dot = fit_pca(data["image_emb"], TINY.kept_dims, TINY.num_buckets)  # fitted without text
    bare = ARPrior.from_basis(no_dot, "tiny")
    args = (data["text_emb"][:2], data["text_states"][:2])
    for call in (lambda: bare.sample(*args), lambda: bare.sample(*args, dot_bucket=3), lambda: training_loss(bare, data),
                 lambda: bare.default_dot_buckets(2)):
        with pytest.raises(RuntimeError, match=r"no dot-product bucket edges.*fit_pca\(image_emb, \.\.\., similarity=.*pca stage"):
            call()
    assert bare.tokenize(data["image_emb"][:2]).shape == (2, TINY.kept_dims)  # the rest of the basis works
    # the refusal survives a checkpoint, and loading fitted weights lifts it
    checkpoint.save(bare, tmp_path / "bare")
    with pytest.raises(RuntimeError, match="dot-product bucket edges"):
        checkpoint.load(tmp_path / "bare").sample(*args)
    bare.load_state_dict(model.state_dict())
    assert bare.sample(*args, generator=torch.Generator().manual_seed(0)).shape == (2, TINY.embed_dim)
    model.set_basis(no_dot)
    with pytest.raises(RuntimeError, match="dot-product bucket edges"):
        model.sample(*args)


def test_kv_cache_step_logits_match_the_full_sequence():
    """Running the prefix once and then one position at a time against the cache gives, at every
    position, the logits of nn.TransformerEncoder run over the whole sequence (padding, null rows)."""
    model, data = _model()
    perturb(model, scale=0.05).eval()
    b, c = 4, TINY
    tokens = model.tokenize(data["image_emb"][:b])
    dot = model.dot_tokens(data["image_emb"][:b], data["text_emb"][:b])
    states, mask = data["text_states"][:b, :6], torch.ones(b, 6, dtype=torch.bool)
    mask[1:, 4:] = False
    mask[2, 1:] = False
    drop = torch.tensor([False, True, False, True])
    with torch.no_grad():
        full = model(tokens[:, :-1], dot, data["text_emb"][:b], states, mask, drop)
        prefix, pad = model._prefix(dot, data["text_emb"][:b], states, mask, drop)
        cache = KVCache.for_model(model, b, prefix.dtype, prefix.device)
        outs = [model.extend(prefix, pad, cache)[:, -1:]]
        for j in range(c.kept_dims - 1):
            outs.append(model.extend(model.token_embed(tokens[:, j : j + 1]), torch.zeros(b, 1, dtype=torch.bool), cache))
        stepped = model.head(model.norm_out(torch.cat(outs, 1)))
    assert cache.length == model.seq_len
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance_scale, temperature", [(1.0, 1.0), (3.0, 1.0), (3.0, 0.0)])
def test_cached_sampling_draws_what_the_uncached_path_draws(guidance_scale, temperature):
    model, data = _model()
    perturb(model, scale=0.05).eval()
    b = 6
    states, mask = data["text_states"][:b, :5], torch.ones(b, 5, dtype=torch.bool)
    mask[::2, 3:] = False
    draws = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        draws.append(model.sample(data["text_emb"][:b], states, mask, guidance_scale=guidance_scale, temperature=temperature,
                                  generator=g, return_tokens=True, use_cache=use_cache))
    (z_cached, t_cached), (z_plain, t_plain) = draws
    assert torch.equal(t_cached, t_plain)
    torch.testing.assert_close(z_cached, z_plain)
    assert len(set(map(tuple, t_cached.tolist()))) == b  # the draws are not all the same
