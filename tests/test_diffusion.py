"""models/diffusion.py against independent references: hand-written DDIM (Song et al. eq. 12),
the GLIDE cosine schedule formula, and an analytic denoiser for Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from models import diffusion as D


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cosine_betas(T: int) -> torch.Tensor:
    """GLIDE (Nichol & Dhariwal 2021) cosine schedule, written from the paper's formula."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=torch.float64)


class GaussianData:
    """Data x0 ~ N(mu, s^2) per coordinate: the exact posterior mean E[x0 | x_t] is linear in x_t,
    so this is an ideal denoiser for any prediction type (an independent 'trained model')."""

    def __init__(self, scheduler, mu, s: float):
        self.abar = scheduler.alphas_cumprod.double()
        self.mu, self.s, self.kind = mu, s, scheduler.config.prediction_type

    def __call__(self, x, t, conditional=True):
        a = self.abar[t].view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        mu = self.mu if conditional else torch.zeros_like(self.mu)
        x0 = mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (x - a.sqrt() * mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        if self.kind == "epsilon":
            return eps
        if self.kind == "sample":
            return x0
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def psnr(a, b, data_range=2.0):
    return 10 * math.log10(data_range**2 / torch.mean((a - b) ** 2).item())


def test_pinned_configuration():
    T = 1000
    ddim = D.make_scheduler("ddim", schedule="cosine", clip_sample=1.0)
    assert ddim.config.num_train_timesteps == T and ddim.config.prediction_type == "epsilon"
    torch.testing.assert_close(ddim.betas.double(), cosine_betas(T), atol=1e-6, rtol=1e-4)
    lin = D.make_scheduler("ddpm", schedule="linear")
    torch.testing.assert_close(lin.betas, torch.linspace(1e-4, 0.02, T))
    # Trailing spacing: the first step is pure noise (t = T-1), steps are evenly spaced.
    for sched in (ddim, lin):
        sched.set_timesteps(10)
        assert sched.timesteps.tolist() == list(range(999, 0, -100))
    inv = D.make_scheduler("ddim_inverse")
    inv.set_timesteps(10)
    assert inv.timesteps.tolist() == list(range(99, 1000, 100))
    assert not inv.config.clip_sample
    # Clipping: with clip_sample=1 the predicted x0 is clamped, without it not.
    x, eps = torch.full((1, 1), 5.0), torch.zeros(1, 1)
    ddim.set_timesteps(10)
    assert ddim.step(eps, 999, x).pred_original_sample.abs().max() <= 1.0
    free = D.make_scheduler("ddim", clip_sample=None)
    free.set_timesteps(10)
    assert free.step(eps, 999, x).pred_original_sample.abs().max() > 1.0


@pytest.mark.parametrize("bad", [dict(sampler="euler"), dict(schedule="sigmoid"), dict(prediction_type="x0")])
def test_bad_config_names_the_argument(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        D.make_scheduler(**bad)


def trailing_timesteps(T: int, steps: int) -> list[int]:
    """'Trailing' spacing (Lin et al. 2024, table 2) from its definition: round(T - i T/n) - 1."""
    return [round(T - i * T / steps) - 1 for i in range(steps)]


def ddim_reference(model, abar, x, ts, eta=0.0, gen=None, kind="epsilon"):
    """DDIM, Song et al. eq. 12, in float64, through timesteps `ts`; the chain ends at abar = 1."""
    x = x.double()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        out = model(x, torch.full((x.shape[0],), t)).double()
        if kind == "epsilon":
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        elif kind == "sample":
            x0 = out
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        else:
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
    return x


@pytest.mark.parametrize("steps", [8, 64, 27])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_ddim_matches_handwritten_reference(kind, steps):
    """Our loop equals DDIM eq. 12 written out here, step for step, incl. eta>0, also for step
    counts that do not divide T (64 and 27 of 1000: diffusers' DDIMScheduler.step would pair the
    timesteps wrongly and stop at abar_0)."""
    sched = D.make_scheduler("ddim", prediction_type=kind, clip_sample=None)
    model = GaussianData(sched, mu=torch.tensor(0.3), s=0.5)
    eta = 0.7
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    ours = D.sample(model, sched, x_T, steps, eta=eta, generator=torch.Generator().manual_seed(1))
    ts = trailing_timesteps(1000, steps)
    assert D.sampling_timesteps(sched, steps) == ts
    ref = ddim_reference(model, sched.alphas_cumprod.double(), x_T, ts, eta, torch.Generator().manual_seed(1), kind)
    torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4)
    # eta = 0: the last step returns the clean x0 prediction (no sigma ~ 0.01 of noise left)
    model_t = lambda x, t, conditional=True: model(x, t)
    seen = []
    spy = lambda x, t, conditional=True: (seen.append(x), model(x, t))[1]
    last = D.sample(spy, sched, x_T, steps)
    x_last, t_last = seen[-1].double(), ts[-1]
    a = sched.alphas_cumprod.double()[t_last]
    out = model_t(x_last, torch.full((64,), t_last)).double()
    x0 = {"epsilon": (x_last - (1 - a).sqrt() * out) / a.sqrt(), "sample": out,
          "v_prediction": a.sqrt() * x_last - (1 - a).sqrt() * out}[kind]
    torch.testing.assert_close(last.double(), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_follow_the_data_distribution(sampler):
    """With the exact denoiser and the full 1000-step chain, samples have the data mean and std
    (short chains shrink the std: discretisation error, not a bug, hence T steps here)."""
    sched = D.make_scheduler(sampler)
    model = GaussianData(sched, mu=torch.tensor(0.5), s=0.2)
    x_T = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    eta = 1.0 if sampler == "ddim" else 0.0
    x = D.sample(model, sched, x_T, 1000, eta=eta, generator=torch.Generator().manual_seed(2))
    assert abs(x.mean().item() - 0.5) < 0.01
    assert abs(x.std().item() - 0.2) < 0.01


@pytest.mark.parametrize("steps", [20, 27, 7])
def test_ddim_eta_one_is_ddpm(steps):
    """DDIM with eta=1 uses DDPM's posterior variance (fixed_small): same noise, same samples.
    diffusers' DDPMScheduler looks each previous timestep up in its list, an independent check of
    our pairing when `steps` does not divide T."""
    ddim, ddpm = D.make_scheduler("ddim"), D.make_scheduler("ddpm")
    model = GaussianData(ddim, mu=torch.tensor(0.1), s=0.4)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    a = D.sample(model, ddim, x_T, steps, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = D.sample(model, ddpm, x_T, steps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ddpm_last_step_lands_on_the_clean_mean():
    """The last step goes to abar = 1, where the posterior has no variance: no noise is added
    there, even by a learned variance asking for the most (v = 1; diffusers' DDPMScheduler adds
    noise whenever t > 0, and trailing spacing's last t is T/steps - 1)."""
    sched = D.make_scheduler("ddpm", learned_variance=True)
    seen = []

    def model(x, t, conditional=True):  # eps = 0, v = 1
        seen.append((x, int(t[0])))
        return torch.cat([torch.zeros_like(x), torch.ones_like(x)], 1)

    out = D.sample(model, sched, (4, 2), 3, generator=torch.Generator().manual_seed(0))
    x_last, t_last = seen[-1]
    assert t_last == 332
    torch.testing.assert_close(out, x_last / sched.alphas_cumprod[t_last].sqrt())


def test_guidance_scale_one_is_conditional_and_combination_form():
    calls = []

    def model(x, t, conditional=True):
        calls.append(conditional)
        return x + (1.0 if conditional else -2.0)

    x, t = torch.randn(3, 2), torch.zeros(3, dtype=torch.long)
    assert torch.equal(D.guided(model, 1.0)(x, t), x + 1.0)
    assert calls == [True]  # no wasted unconditional pass
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for s in (0.0, 1.0, 3.0, 8.0):
        torch.testing.assert_close(D.guidance_combine(cond, uncond, s), cond + (s - 1) * (cond - uncond))
    torch.testing.assert_close(D.guided(model, 4.0)(x, t), (x - 2.0) + 4.0 * 3.0)
    # Learned variance: only the mean half is guided, variance comes from the conditional pass.
    lv = lambda x, t, c: torch.cat([x + (1.0 if c else 0.0), torch.full_like(x, 7.0 if c else -7.0)], 1)
    out = D.guided(lv, 3.0, channels=2)(x, t)
    torch.testing.assert_close(out, torch.cat([x + 3.0, torch.full_like(x, 7.0)], 1))


def test_ddim_inversion_then_sampling_reconstructs():
    """x0 -> x_T -> x0 with eta=0 and a fixed conditional model: PSNR >= 30 dB."""
    inv, fwd = D.make_scheduler("ddim_inverse"), D.make_scheduler("ddim", clip_sample=1.0)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(1, 3, 8, 8, generator=g) - 0.5
    model = GaussianData(fwd, mu=mu, s=0.3)
    x0 = (mu + 0.3 * torch.randn(2, 3, 8, 8, generator=g)).clamp(-1, 1)
    x_T = D.ddim_invert(model, inv, x0, 100)
    assert x_T.std() > 0.5  # it really went to noise level
    rec = D.sample(model, fwd, x_T, 100)
    assert psnr(rec, x0) >= 30.0


def time_only_noise(x, t, conditional=True):
    """An epsilon network whose output depends on t only: DDIM inversion of it is exact, so a
    round trip tests that inversion and sampling visit the same noise levels, end to end."""
    pattern = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return (torch.sin(t.double() / 97.0).view(-1, 1, 1, 1) * pattern + 0.1 * pattern**2).to(x.dtype)


@pytest.mark.parametrize("steps", [64, 27, 15, 7, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddim_inversion_round_trip_is_exact(steps, dtype):
    inv, fwd = D.make_scheduler("ddim_inverse"), D.make_scheduler("ddim")
    x0 = (torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1).to(dtype)
    x_T = D.ddim_invert(time_only_noise, inv, x0, steps)
    # reference: eq. 12 with eta = 0 backwards, from abar = 1 up through the trailing timesteps
    abar, x, a_prev = fwd.alphas_cumprod.double(), x0.double(), torch.tensor(1.0, dtype=torch.float64)
    for t in trailing_timesteps(1000, steps)[::-1]:
        eps = time_only_noise(x, torch.full((2,), t))
        x = abar[t].sqrt() * (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - abar[t]).sqrt() * eps
        a_prev = abar[t]
    torch.testing.assert_close(x_T.double(), x, atol=1e-5, rtol=1e-5)
    rec = D.sample(time_only_noise, fwd, x_T, steps)
    # float32: x_T holds x0 only with weight sqrt(abar_999) ~ 5e-5, so its 6e-8 resolution limits
    # the round trip to ~1e-3; float64 shows the chain itself is exact
    assert (rec - x0).abs().max() < (1e-10 if dtype == torch.float64 else 5e-3)


def test_ddim_inversion_refuses_x0_prediction():
    with pytest.raises(ValueError, match="sample"):
        D.ddim_invert(lambda x, t, c=True: x, D.make_scheduler("ddim_inverse", prediction_type="sample"), torch.zeros(1, 1, 1, 1), 4)


def test_eta_controls_randomness():
    sched = D.make_scheduler("ddim")
    model = GaussianData(sched, mu=torch.tensor(0.0), s=0.5)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    run = lambda eta, seed: D.sample(model, sched, x_T, 10, eta=eta, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert torch.equal(run(0.5, 1), run(0.5, 1))
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))
    # a shape instead of noise draws x_T from the generator first
    from_shape = D.sample(model, sched, (8, 4), 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_shape, run(0.0, 5))
    with pytest.raises(ValueError, match="eta"):
        D.sample(model, D.make_scheduler("ddpm"), x_T, 10, eta=0.5)


def test_training_targets():
    sched = D.make_scheduler("ddpm", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = D.sample_timesteps(6, sched, generator=g)
    assert t.min() >= 0 and t.max() < 1000
    a = sched.alphas_cumprod[t].view(-1, 1)
    torch.testing.assert_close(D.add_noise(sched, x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(D.training_target(sched, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    sched = D.make_scheduler("ddpm", prediction_type="sample")
    assert torch.equal(D.training_target(sched, x0, noise, t), x0)


def test_logit_normal_timesteps_follow_scipys_distribution():
    """logit(t / T) of the drawn timesteps is N(mean, std^2), checked by scipy's KS test (the
    integer floor shifts t / T by < 1 / T, so the cell's midpoint is tested)."""
    from scipy import stats

    sched = D.make_scheduler("ddpm")
    g = torch.Generator().manual_seed(0)
    t = D.sample_timesteps(20000, sched, generator=g, logit_mean=0.5, logit_std=0.8)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 1000
    u = (t.double() + 0.5) / 1000
    assert stats.kstest(torch.logit(u).numpy(), stats.norm(0.5, 0.8).cdf).pvalue > 0.01
    uniform = D.sample_timesteps(20000, sched, generator=g)
    assert stats.kstest((uniform.double() + 0.5).numpy() / 1000, stats.uniform().cdf).pvalue > 0.01
    # the same draw is not also uniform: the test can tell the two apart
    assert stats.kstest(u.numpy(), stats.uniform().cdf).pvalue < 1e-6


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_diffusers_training_scripts(kind):
    """diffusers' text-to-image script: min(SNR, gamma), divided by SNR for epsilon and by SNR + 1
    for v-prediction, SNR from diffusers.training_utils.compute_snr."""
    from diffusers.training_utils import compute_snr

    sched = D.make_scheduler("ddpm", prediction_type=kind)
    t = torch.tensor([0, 1, 50, 300, 700, 999])
    snr = compute_snr(sched, t)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = expected / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
    torch.testing.assert_close(D.min_snr_weight(sched, t, 5.0), expected.float(), rtol=1e-5, atol=1e-7)
