"""Diffusion plumbing shared by the prior, decoder and upsamplers: schedules, guidance, samplers.

We build on diffusers' schedulers (the noise schedules, their timestep spacing, DDPM's step)
rather than writing them ourselves: they are well tested and it keeps our checkpoints usable with
diffusers pipelines. What is ours is the configuration we pin (`make_scheduler`), the training-side
helpers (noising, targets), classifier-free guidance, DDIM's update (see `ddim_step` for why), and
the sampling loops, written as plain functions over `(model_fn, scheduler, x, steps)` in the style
of k-diffusion.

A `model_fn(x, t, conditional)` returns the network prediction for a batch `x` at integer
timesteps `t` (a 1-D long tensor, one per row); `conditional=False` asks for the unconditional
(null-conditioned) prediction used by classifier-free guidance. A model_fn marked
`takes_row_mask = True` also takes `conditional` as a bool tensor, one per row, for a batch that
stacks copies of its conditions: guidance then runs both branches as one forward of 2B rows (fewer,
larger matmuls; diffusers' pipelines do the same). The network wrapper that turns conditioning
into such a function lives with each model (decoder.py, prior.py); the network and the denoiser
stay separate.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLERS = ("ddpm", "ddim", "ddim_inverse")
# "trailing" spacing starts sampling at t = T-1 (pure noise); diffusers' default "leading" never
# visits the last timestep, which wastes the first step of a short DDIM schedule.
TIMESTEP_SPACING = "trailing"


def make_scheduler(
    sampler: Literal["ddpm", "ddim", "ddim_inverse"] = "ddim",
    *,
    schedule: Literal["cosine", "linear"] = "cosine",
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
    num_train_timesteps: int = 1000,
    clip_sample: float | None = None,
    learned_variance: bool = False,
):
    """A diffusers scheduler with the configuration this project relies on.

    schedule: "cosine" (GLIDE/unCLIP, diffusers' "squaredcos_cap_v2") or "linear" (DDPM's
    1e-4..0.02, the paper's choice for the last upsampler). clip_sample: clamp predicted x0 to
    [-c, c] at each step (1.0 for images in [-1, 1]; None for embeddings). learned_variance: the
    network outputs 2x channels (mean part, variance interpolation); only DDPM uses the second half.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; allowed: {SAMPLERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}; allowed: {tuple(SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}; allowed: {PREDICTION_TYPES}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 1")
    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=SCHEDULES[schedule],
        prediction_type=prediction_type,
        clip_sample=clip_sample is not None,
        clip_sample_range=float(clip_sample) if clip_sample is not None else 1.0,
        timestep_spacing=TIMESTEP_SPACING,
    )
    if sampler == "ddpm":
        variance = "learned_range" if learned_variance else "fixed_small"
        return DDPMScheduler(variance_type=variance, **common)
    if sampler == "ddim":
        return DDIMScheduler(set_alpha_to_one=True, **common)
    # Inversion must be the exact reverse of the deterministic DDIM path: clipping x0 would make it
    # non-invertible, so it is always off here.
    common.update(clip_sample=False)
    return DDIMInverseScheduler(set_alpha_to_one=True, **common)


# ---------------------------------------------------------------------------------------------
# Training side


def sample_timesteps(batch: int, scheduler, generator: torch.Generator | None = None, device=None,
                     logit_mean: float | None = None, logit_std: float = 1.0) -> torch.Tensor:
    """Integer timesteps in [0, T): uniform, or with `logit_mean` logit-normal in t / T (Esser et al.
    2024, SD3): logit(t / T) ~ N(logit_mean, logit_std**2), which spends the steps near
    t / T = sigmoid(logit_mean) rather than evenly."""
    T = scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else "cpu"
    if logit_mean is None:
        t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
    else:
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator, device=gen_device))
        t = (u * T).long().clamp(max=T - 1)
    return t.to(device or gen_device)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return scheduler.add_noise(x0, noise, t)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses on for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type={kind!r}; allowed: {PREDICTION_TYPES}")


def min_snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weight (B,) of the MSE on the scheduler's target that makes it Min-SNR-gamma
    weighting (Hang et al. 2023): the x0 loss weighted by min(SNR_t, gamma), so the nearly clean
    timesteps, whose fine detail is cheap, stop outweighing the noisy ones where layout forms.
    The epsilon loss is SNR times the x0 loss, the v loss (SNR + 1) times."""
    ab = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    snr = ab / (1 - ab)
    kind = scheduler.config.prediction_type
    scale = {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}.get(kind)
    if scale is None:
        raise ValueError(f"prediction_type={kind!r}; allowed: {PREDICTION_TYPES}")
    return (snr.clamp(max=gamma) / scale).float()


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log p(x0) per element (nats) for 8-bit data scaled to [-1, 1] under N(mean, exp(log_var))
    integrated over x0's bin of width 2/255, the outermost bins open-ended (DDPM's decoder, Ho
    et al. 2020, eq. 13)."""
    std = torch.exp(0.5 * log_var)
    upper = torch.where(x0 > 1 - 1e-3, torch.ones_like(x0), torch.special.ndtr((x0 + 1 / 255 - mean) / std))
    lower = torch.where(x0 < -1 + 1e-3, torch.zeros_like(x0), torch.special.ndtr((x0 - 1 / 255 - mean) / std))
    return -torch.log((upper - lower).clamp(min=1e-12))


def vlb_terms(scheduler, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample term L_t of the variational bound in bits per dimension (B,), for a network that
    outputs [mean part, v] with p's log-variance v-interpolated between log beta_t (v = 1) and the
    clipped log beta~_t (v = -1) (Improved DDPM's learned range; diffusers' "learned_range"):
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretized decoder NLL for t = 0.
    The mean part is detached (only the variance learns from L_vlb, as in the hybrid loss) and its
    x0 is not clamped. At a uniform t, T * L_t estimates L_vlb = sum_t L_t."""
    C = x0.shape[1]
    mean_out, v = out[:, :C].detach(), out[:, C:]
    ab = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float64)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / ab_prev
    post_var = beta * (1 - ab_prev) / (1 - ab)
    log_post = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # beta~_0 = 0: use beta~_1 ("clipped")
    coef_x0, coef_xt = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
    per_row = lambda a: a[t].to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))  # noqa: E731
    ab_t, beta_t, log_post_t, c0, ct = map(per_row, (ab, beta, log_post, coef_x0, coef_xt))
    x0_hat, _ = predicted_x0_and_eps(scheduler.config.prediction_type, mean_out, x_t, ab_t)
    frac = (v + 1) / 2
    log_var = frac * torch.log(beta_t) + (1 - frac) * log_post_t
    # posterior mean - model mean: the x_t parts are equal, the x0 parts differ by c0 (x0 - x0_hat)
    diff = c0 * (x0 - x0_hat)
    kl = 0.5 * (-1 + log_var - log_post_t + torch.exp(log_post_t - log_var) + diff**2 * torch.exp(-log_var))
    nll = discretized_gaussian_nll(x0, c0 * x0_hat + ct * x_t, log_var)
    per_dim = lambda a: a.flatten(1).mean(1) / math.log(2.0)  # noqa: E731  nats -> bits, mean over dims
    return torch.where(t == 0, per_dim(nll), per_dim(kl))


# ---------------------------------------------------------------------------------------------
# Guidance


def guidance_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + s (cond - uncond) = cond + (s - 1)(cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guided(model_fn: ModelFn, scale: float, channels: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Turn model_fn(x, t, conditional) into f(x, t) with classifier-free guidance at `scale`.

    With a learned-variance output (2x `channels`), only the mean part is guided and the variance
    part comes from the conditional pass (as in GLIDE/unCLIP).
    """
    if scale == 1.0:
        return lambda x, t: model_fn(x, t, True)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if getattr(model_fn, "takes_row_mask", False):
            rows = torch.arange(2 * x.shape[0], device=x.device) < x.shape[0]  # conditional first
            cond, uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), rows).chunk(2)
        else:
            cond, uncond = model_fn(x, t, True), model_fn(x, t, False)
        c = channels if channels is not None else x.shape[1]
        if cond.shape[1] == 2 * c:
            mean = guidance_combine(cond[:, :c], uncond[:, :c], scale)
            return torch.cat([mean, cond[:, c:]], dim=1)
        return guidance_combine(cond, uncond, scale)

    return fn


# ---------------------------------------------------------------------------------------------
# Samplers
#
# DDIM's update is written here, not taken from diffusers: `DDIMScheduler.step` (and the inverse
# scheduler's) takes the neighbouring timestep to be t -/+ T // steps (diffusers 0.42), which is
# wrong whenever `steps` does not divide T: with the prior's default 64 of 1000 the trailing
# timesteps are 15.625 apart, so most steps land on the wrong noise level and the last one stops at
# abar_0 instead of abar = 1, leaving sigma ~ 0.01 of noise and making inversion inexact. Which
# timesteps to visit still comes from diffusers (`set_timesteps`, "trailing" spacing), and so do
# the schedule (`alphas_cumprod`) and DDPM's step (`DDPMScheduler` looks the previous timestep up).


def sampling_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps a `steps`-step chain visits, from noisy to clean (diffusers' set_timesteps)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    scheduler.set_timesteps(steps)  # on the CPU: reading them back is not a device sync
    return sorted(scheduler.timesteps.tolist(), reverse=True)


def _alpha_bar(scheduler, t: int) -> float:
    """abar_t; t = -1 is the clean end of the chain, abar = 1 (the set_alpha_to_one convention)."""
    return float(scheduler.alphas_cumprod[t]) if t >= 0 else 1.0


def predicted_x0_and_eps(prediction_type: str, out: torch.Tensor, x: torch.Tensor, abar: float | torch.Tensor):
    """(x0, eps) implied by a network output at noise level abar (a float, or a tensor that
    broadcasts against x), x = sqrt(abar) x0 + sqrt(1-abar) eps."""
    a, s = (abar.sqrt(), (1 - abar).sqrt()) if isinstance(abar, torch.Tensor) else (math.sqrt(abar), math.sqrt(1 - abar))
    if prediction_type == "epsilon":
        return (x - s * out) / a, out
    if prediction_type == "sample":
        return out, (x - a * out) / s
    if prediction_type == "v_prediction":
        return a * x - s * out, a * out + s * x
    raise ValueError(f"prediction_type={prediction_type!r}; allowed: {PREDICTION_TYPES}")


def ddim_step(scheduler, out: torch.Tensor, t: int, t_next: int, x: torch.Tensor, *, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, eq. 12) of x at timestep t to timestep t_next: lower when
    sampling, higher when inverting, -1 for the clean end (abar = 1). x0 is clamped as the
    scheduler's config says (clip_sample, clip_sample_range); eta scales the fresh noise
    (eq. 16: 0 deterministic, 1 DDPM's posterior variance)."""
    cfg = scheduler.config
    a_t, a_next = _alpha_bar(scheduler, t), _alpha_bar(scheduler, t_next)
    x0, eps = predicted_x0_and_eps(cfg.prediction_type, out, x, a_t)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    sigma = eta * math.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)) if eta > 0 else 0.0
    x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_next = x_next + sigma * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x_next


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    scheduler,
    x_T: torch.Tensor | tuple[int, ...],
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run the reverse process from x_T with a DDPM or DDIM scheduler; returns x_0.

    x_T: the start noise, or a shape to draw it from `generator`. eta (DDIM only): 0 is the
    deterministic ODE path, 1 matches DDPM's posterior noise. The chain visits the scheduler's
    "trailing" timesteps (the first is T-1) and its last step lands on abar = 1.
    """
    if not isinstance(x_T, torch.Tensor):
        x_T = randn(tuple(x_T), generator)
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if not is_ddim and not isinstance(scheduler, DDPMScheduler):
        raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    if not is_ddim and eta != 0.0:
        raise ValueError(f"eta={eta} applies to DDIM only; DDPM always samples its posterior")
    timesteps = sampling_timesteps(scheduler, steps)
    fn = guided(model_fn, guidance_scale, channels=x_T.shape[1])
    x = x_T
    for i, t in enumerate(timesteps):
        out = fn(x, _timestep_batch(t, x))
        if is_ddim:
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x = ddim_step(scheduler, out[:, : x.shape[1]], t, t_next, x, eta=eta, generator=generator)  # no use for a learned variance
        elif i + 1 < len(timesteps):
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        else:
            # the last step lands on abar = 1, where the posterior has no variance: its mean is the
            # predicted x0. DDPMScheduler adds noise whenever t > 0 (it expects to end at t = 0, not
            # at trailing spacing's t = T/steps - 1), and a learned variance would make it large.
            x = scheduler.step(out, t, x, generator=generator).pred_original_sample
    return x


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    scheduler: DDIMInverseScheduler | DDIMScheduler,
    x0: torch.Tensor,
    steps: int,
    *,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (section 3: the x_T half of the bipartite latent).

    The exact reverse of `sample(..., make_scheduler("ddim", same schedule), steps, eta=0)` through
    the same timesteps, up to the network's dependence on x within one step: each step evaluates
    the network at the current (less noisy) x with the next timestep's label, where sampling sees
    the noisier x with that label (the usual approximation, exact for a network whose output does
    not depend on x). Never clips x0.
    """
    if not isinstance(scheduler, (DDIMInverseScheduler, DDIMScheduler)):
        raise TypeError(f"scheduler must be a DDIMInverseScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.config.prediction_type == "sample":
        # the last sampling step maps every x_t to the predicted x0: nothing to invert
        raise ValueError("DDIM inversion needs an epsilon or v_prediction network; prediction_type='sample' is not invertible")
    timesteps = sampling_timesteps(scheduler, steps)[::-1]  # clean to noisy
    fn = guided(model_fn, guidance_scale, channels=x0.shape[1])
    x = x0
    for t_prev, t in zip([-1] + timesteps[:-1], timesteps):
        out = fn(x, _timestep_batch(t, x))[:, : x.shape[1]]
        x0_hat, eps = predicted_x0_and_eps(scheduler.config.prediction_type, out, x, _alpha_bar(scheduler, t_prev))
        a = _alpha_bar(scheduler, t)
        x = math.sqrt(a) * x0_hat + math.sqrt(1 - a) * eps
    return x


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise drawn on the generator's device then moved, so a CPU seed gives the same x_T anywhere."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)
