"""models/unclip.py: latent arithmetic, the composed sampler, and section-3/4 manipulations
with fixed random tiny networks (a v-prediction decoder: well conditioned at both ends of the
cosine schedule, so DDIM inversion of an untrained net is a fair test)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models import decoder as dec
from models import prior as prior_mod
from models import upsampler as ups
from models.pca import PcaBasis
from models.sizes import config_for
from models.unclip import Stage, TextCondition, UnCLIP, pca_reconstruct, slerp, slerp_images, text_diff
from tests.model_helpers import perturb

DEC = dataclasses.replace(dec.SIZES["tiny"], image_size=16, attention_resolutions=[8], prediction_type="v_prediction")
UP = ups.SIZES["tiny"]  # 16 -> 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakePrior:
    """Deterministic stand-in for models.prior: z_i = norm(z_t + noise), records its kwargs."""

    def __init__(self):
        self.calls = []

    def sample(self, text_emb, text_states, text_mask=None, *, generator=None, **kwargs):
        self.calls.append(dict(kwargs, text_emb=text_emb, text_states=text_states))
        return F.normalize(text_emb + 0.5 * torch.randn(text_emb.shape, generator=generator), dim=-1)


def fake_text_encoder(captions):
    rows = [torch.Generator().manual_seed(sum(map(ord, c))) for c in captions]
    emb = torch.stack([F.normalize(torch.randn(DEC.embed_dim, generator=g), dim=0) for g in rows])
    states = torch.stack([torch.randn(6, DEC.text_dim, generator=g) for g in rows])
    mask = torch.ones(len(captions), 6, dtype=torch.bool)
    mask[:, 4:] = False
    return TextCondition(emb, states, mask)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnCLIP(perturb(dec.Decoder(DEC), scale=0.02).eval(), FakePrior(), [perturb(ups.Upsampler(UP), scale=0.02).eval()], fake_text_encoder)


def images(B=2):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    pics = [torch.stack([xx, -xx, yy]), torch.stack([yy * 0 + 0.5, xx * yy, -yy])]
    return 0.8 * torch.stack(pics[:B])


def unit(B, D=DEC.embed_dim, seed=0):
    return F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def angle(a, b):
    return torch.acos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1))


def psnr(a, b):
    return 10 * math.log10(4.0 / torch.mean((a - b) ** 2).item())


# ---------------------------------------------------------------------------------------------


def test_slerp_endpoints_norm_and_constant_angular_speed():
    a, b = unit(3, seed=1), unit(3, seed=2)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    omega = angle(a, b)
    for th in (0.1, 0.25, 0.5, 0.9):
        z = slerp(a, b, th)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(angle(a, z), th * omega, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(angle(z, b), (1 - th) * omega, atol=1e-5, rtol=1e-4)
    # per-row thetas, and x_T's keep their scale
    torch.testing.assert_close(slerp(a, b, torch.tensor([0.0, 1.0, 0.0])), torch.stack([a[0], b[1], a[2]]))
    xa, xb = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(slerp_images(xa, xb, 0.0), xa)
    mid = slerp_images(xa, xb, 0.5)
    assert mid.shape == xa.shape
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), (xa.flatten(1).norm(dim=1) + xb.flatten(1).norm(dim=1)) / 2)


def test_text_diff():
    z_i, z_t, z_t0 = unit(2, seed=1), unit(2, seed=2), unit(2, seed=3)
    torch.testing.assert_close(text_diff(z_i, z_t, z_t0, 0.0), z_i)
    z_d = F.normalize(z_t - z_t0, dim=-1)
    torch.testing.assert_close(text_diff(z_i, z_t, z_t0, 1.0), z_d)
    torch.testing.assert_close(angle(z_i, text_diff(z_i, z_t, z_t0, 0.3)), 0.3 * angle(z_i, z_d), atol=1e-5, rtol=1e-4)


def test_pca_reconstruct():
    D = 16
    g = torch.Generator().manual_seed(0)
    comps, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    comps, mean = comps.T, 0.1 * torch.randn(D, generator=g)
    basis = PcaBasis(mean, comps, torch.ones(D))
    z = unit(4, D=D)
    torch.testing.assert_close(pca_reconstruct(z, basis, D), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pca_reconstruct(z, basis, 0), F.normalize(mean, dim=0).expand(4, D))
    errs = [(pca_reconstruct(z, basis, k, normalize=False) - z).norm().item() for k in range(D + 1)]
    assert all(e1 <= e0 + 1e-6 for e0, e1 in zip(errs, errs[1:]))  # more dims, closer
    # against the projector written out: mean + (z - mean) C_k^T C_k
    C = comps[:5]
    torch.testing.assert_close(pca_reconstruct(z, basis, 5, normalize=False), mean + (z - mean) @ C.T @ C)
    with pytest.raises(ValueError, match="k="):
        pca_reconstruct(z, basis, D + 1)


def test_composed_sampler_runs_every_stage_with_its_settings(model):
    calls = {"decoder": [], "upsampler": []}  # rows of each forward
    h1 = model.decoder.unet.register_forward_hook(lambda m, args, out: calls["decoder"].append(len(args[0])))
    h2 = model.upsamplers[0].unet.register_forward_hook(lambda m, args, out: calls["upsampler"].append(len(args[0])))
    try:
        run = lambda seed: model.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(seed),
                                        prior=dict(steps=3, guidance_scale=2.0), decoder=Stage(steps=2, guidance_scale=3.0),
                                        upsamplers=[Stage(steps=3)], return_image_emb=True)
        image, z_i = run(0)
    finally:
        h1.remove()
        h2.remove()
    assert image.shape == (2, 3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert calls == {"decoder": [2 * 2] * 2, "upsampler": [2] * 3}  # guided decoder: cond + uncond rows, one forward a step
    last = model.prior.calls[-1]
    assert last["steps"] == 3 and last["guidance_scale"] == 2.0
    torch.testing.assert_close(last["text_emb"], fake_text_encoder(["a red circle", "a blue square"]).emb)
    again, _ = run(0)
    assert torch.equal(image, again)  # one generator seeds every stage
    assert not torch.equal(image, run(1)[0])
    assert z_i.shape == (2, DEC.embed_dim)


def test_decode_from_text_embedding_and_reconstruction(model):
    seen = []
    orig = model.decoder.forward

    def spy(x, t, image_emb, *args, **kw):
        seen.append(image_emb)
        return orig(x, t, image_emb, *args, **kw)

    model.decoder.forward = spy
    try:
        text = fake_text_encoder(["a green triangle"])
        out = model.sample_from_text_emb(text, decoder=Stage(steps=1), upsamplers=[Stage(steps=1)])
        assert torch.equal(seen[-1], text.emb)  # z_t stands in for z_i (section 5.1)
        z = unit(1, seed=5)
        rec = model.reconstruct(z, decoder=Stage(steps=1), upsample=False)
        assert torch.equal(seen[-1], z) and rec.shape == (1, 3, 16, 16)
    finally:
        del model.decoder.forward
    assert out.shape == (1, 3, 32, 32)


def test_stage_chain_is_checked():
    d = dec.Decoder(DEC)
    with pytest.raises(ValueError, match="upsamplers\\[0\\]"):
        UnCLIP(d, upsamplers=[ups.Upsampler(dataclasses.replace(UP, image_size=64, low_res_size=32))])
    with pytest.raises(ValueError, match="prior"):
        UnCLIP(d).sample(fake_text_encoder(["x"]))


def test_inversion_reconstructs_and_variations_vary(model):
    x0, z_i = images(), unit(2, seed=7)
    x_T = model.invert(x0, z_i, steps=40)
    assert x_T.shape == x0.shape
    # decode with the right z_i and, in the same batch, with other z_i's
    both = model.decode(torch.cat([z_i, unit(2, seed=8)]), decoder=Stage(steps=40, clip_sample=None),
                        x_T=torch.cat([x_T, x_T]), upsample=False)
    rec, wrong = both[:2], both[2:]
    assert psnr(rec, x0) >= 30.0
    assert psnr(wrong, x0) < psnr(rec, x0) - 3  # z_i matters: it is half of the latent
    # variations: eta > 0 differs per seed; eta = 0 is the reconstruction, n times
    var = lambda eta, seed: model.variations(z_i[:1], x_T[:1], n=2, eta=eta, steps=10, upsample=False,
                                             generator=torch.Generator().manual_seed(seed))
    v1, v2 = var(1.0, 1), var(1.0, 2)
    assert v1.shape == (2, 3, 16, 16)
    assert not torch.allclose(v1, v2) and not torch.allclose(v1[0], v1[1])
    torch.testing.assert_close(var(0.0, 1), var(0.0, 2))


def test_interpolation_endpoints_and_fixed_noise(model):
    za, zb = unit(1, seed=1), unit(1, seed=2)
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    frames = model.interpolate(za, zb, [0.0, 0.5, 1.0], x_T_a=xa, x_T_b=xb, steps=4, upsample=False)
    exact = Stage(steps=4, clip_sample=None, guidance_scale=1.0)
    torch.testing.assert_close(frames[0:1], model.decode(za, decoder=exact, x_T=xa, upsample=False), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(frames[2:3], model.decode(zb, decoder=exact, x_T=xb, upsample=False), atol=1e-5, rtol=1e-4)
    seen = []
    orig = model.decoder.sample
    model.decoder.sample = lambda *a, **kw: (seen.append(kw["x_T"]), orig(*a, **kw))[1]
    try:
        fixed = model.interpolate(za, zb, [0.0, 0.3, 1.0], steps=2, upsample=False, generator=torch.Generator().manual_seed(3))
    finally:
        del model.decoder.sample
    assert fixed.shape == (3, 3, 16, 16)
    assert all(torch.equal(seen[-1][0], seen[-1][i]) for i in range(3))  # one x_T for the trajectory
    with pytest.raises(ValueError, match="x_T_a"):
        model.interpolate(za, zb, [0.5], x_T_a=xa)


def test_text_diff_frames_and_pca_probe(model):
    z_i, x_T = unit(1, seed=4), torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    text, base = fake_text_encoder(["a red square"]), fake_text_encoder(["a red circle"])
    frames = model.text_diff(z_i, x_T, text, base, [0.0, 0.25], steps=3, upsample=False)
    first = model.decode(z_i, decoder=Stage(steps=3, clip_sample=None), x_T=x_T, upsample=False)
    torch.testing.assert_close(frames[:1], first, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(frames[0], frames[1])
    # PCA probe: every k decoded from the same seed; k = D (full basis) is the embedding itself
    D = DEC.embed_dim
    comps, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    mean = torch.zeros(D)
    probe = model.pca_probe(z_i, PcaBasis(mean, comps.T, torch.ones(D)), [D, 2, D], seed=5, steps=3, upsample=False)
    torch.testing.assert_close(probe[0], probe[2])
    assert not torch.allclose(probe[0], probe[1])
    x5 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(probe[:1], model.decode(z_i, decoder=Stage(steps=3, guidance_scale=1.0), x_T=x5, upsample=False),
                               atol=1e-5, rtol=1e-4)


def real_prior(normalize=True):
    torch.manual_seed(0)
    return perturb(prior_mod.DiffusionPrior(config_for("prior", "tiny", embed_dim=DEC.embed_dim, text_dim=DEC.text_dim, normalize=normalize)), scale=0.02).eval()


def test_with_the_real_diffusion_prior(model):
    """Real tiny prior, decoder and upsampler: the composed sampler is the three stages run one
    after the other with one generator (each stage called through its own API here)."""
    prior = real_prior()
    unclip = UnCLIP(model.decoder, prior, model.upsamplers, fake_text_encoder)
    kwargs = dict(prior=dict(steps=3, guidance_scale=2.0, candidates=2), decoder=Stage(steps=2, guidance_scale=3.0),
                  upsamplers=[Stage(steps=2)])
    image, z_i = unclip.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0),
                               return_image_emb=True, **kwargs)
    assert image.shape == (2, 3, 32, 32) and torch.isfinite(image).all()
    torch.testing.assert_close(z_i.norm(dim=-1), torch.ones(2))

    g = torch.Generator().manual_seed(0)
    text = fake_text_encoder(["a red circle", "a blue square"])
    z = prior.sample(text.emb, text.states, text.mask, steps=3, guidance_scale=2.0, candidates=2, generator=g)
    low = model.decoder.sample(z, text.emb, text.states, text.mask, steps=2, guidance_scale=3.0, generator=g)
    expected = model.upsamplers[0].sample(low, steps=2, generator=g)
    assert torch.equal(z, z_i) and torch.equal(image, expected)


def test_with_the_real_ar_prior(model):
    from models.ar_prior import ARPrior
    from models.pca import fit_pca

    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(64, DEC.embed_dim, generator=g), dim=-1)
    zt = F.normalize(torch.randn(64, DEC.embed_dim, generator=g), dim=-1)
    basis = fit_pca(zs, 4, 8, (zs * zt).sum(-1), 4)
    torch.manual_seed(0)
    prior = ARPrior.from_basis(basis, text_dim=DEC.text_dim, text_len=6, width=32, num_heads=2, num_layers=1).eval()
    unclip = UnCLIP(model.decoder, prior, model.upsamplers, fake_text_encoder)
    image, z_i = unclip.sample(["a red circle"], generator=torch.Generator().manual_seed(0), prior=dict(temperature=0.5),
                               decoder=Stage(steps=2), upsamplers=[Stage(steps=1)], return_image_emb=True)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    torch.testing.assert_close(z_i.norm(dim=-1), torch.ones(1))


def test_karlo_conventions_unnormalised_embeddings_and_empty_caption_null(model):
    """With Karlo-convention stages (a prior that does not normalise, as from_diffusers builds
    it), z_t and z_i reach the decoder unnormalised, and use_empty_caption_as_null makes both
    stages' unconditional branch the encoded empty caption."""
    def raw_text_encoder(captions):  # unnormalised z_t, as CLIP's text projection
        text = fake_text_encoder(captions)
        return TextCondition(3.0 * text.emb, text.states, text.mask)

    decoder = dec.Decoder(DEC)
    decoder.load_state_dict(model.decoder.state_dict())
    prior = real_prior(normalize=False)
    unclip = UnCLIP(decoder.eval(), prior, [], raw_text_encoder)
    unclip.use_empty_caption_as_null()
    empty = raw_text_encoder([""])
    visible = int(empty.mask.sum())
    assert decoder.config.null_text_len == visible
    torch.testing.assert_close(decoder.null_text_states, empty.states[0, :visible])
    torch.testing.assert_close(decoder.null_text_emb, empty.emb[0])
    torch.testing.assert_close(prior.null_text_emb, empty.emb[0])
    assert prior.null_text_mask.tolist() == empty.mask[0].tolist() + [False] * (prior.config.text_len - 6)

    seen = []
    orig = decoder.forward
    decoder.forward = lambda x, t, image_emb, text_emb=None, *a, **kw: (seen.append((image_emb, text_emb)), orig(x, t, image_emb, text_emb, *a, **kw))[1]
    try:
        _, z_i = unclip.sample(["a red circle"], generator=torch.Generator().manual_seed(0), prior=dict(steps=2, candidates=1),
                               decoder=Stage(steps=1, guidance_scale=2.0), return_image_emb=True)
    finally:
        del decoder.forward
    assert abs(z_i.norm().item() - 1) > 0.1  # not projected onto the unit sphere
    # guidance stacks the conditional row and its unconditional copy in one forward: row 0 is the condition
    assert torch.equal(seen[0][0][:1], z_i) and torch.equal(seen[0][1][:1], raw_text_encoder(["a red circle"]).emb)
