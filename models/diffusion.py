"""Diffusion plumbing shared by the prior, decoder and upsamplers: schedules, guidance, samplers.

We build on diffusers' schedulers (DDPM, DDIM with eta, DDIM inverse) rather than writing the
steps ourselves: they are well tested and it keeps our checkpoints usable with diffusers
pipelines. What is ours is the configuration we pin (`make_scheduler`), the training-side helpers
(noising, targets), classifier-free guidance, and the sampling loops, written as plain functions
over `(model_fn, scheduler, x, steps)` in the style of k-diffusion.

A `model_fn(x, t, conditional)` returns the network prediction for a batch `x` at integer
timesteps `t` (a 1-D long tensor, one per row); `conditional=False` asks for the unconditional
(null-conditioned) prediction used by classifier-free guidance. The network wrapper that turns
conditioning into such a function lives with each model (decoder.py, prior.py); the network and
the denoiser stay separate.
"""

from __future__ import annotations

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


def sample_timesteps(batch: int, scheduler, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform integer timesteps in [0, T)."""
    T = scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randint(0, T, (batch,), generator=generator, device=gen_device).to(device or gen_device)


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
        cond, uncond = model_fn(x, t, True), model_fn(x, t, False)
        c = channels if channels is not None else x.shape[1]
        if cond.shape[1] == 2 * c:
            mean = guidance_combine(cond[:, :c], uncond[:, :c], scale)
            return torch.cat([mean, cond[:, c:]], dim=1)
        return guidance_combine(cond, uncond, scale)

    return fn


# ---------------------------------------------------------------------------------------------
# Samplers


def _timestep_batch(t, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


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
    deterministic ODE path, 1 matches DDPM's posterior noise. The scheduler is re-configured for
    `steps` (it is stateful in diffusers).
    """
    if not isinstance(x_T, torch.Tensor):
        x_T = randn(tuple(x_T), generator)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if not is_ddim and not isinstance(scheduler, DDPMScheduler):
        raise TypeError(f"scheduler must be a DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    if not is_ddim and eta != 0.0:
        raise ValueError(f"eta={eta} applies to DDIM only; DDPM always samples its posterior")
    scheduler.set_timesteps(steps, device=x_T.device)
    fn = guided(model_fn, guidance_scale, channels=x_T.shape[1])
    x = x_T
    for t in scheduler.timesteps:
        out = fn(x, _timestep_batch(t, x))
        if is_ddim:
            out = out[:, : x.shape[1]]  # DDIM has no use for a learned variance
            x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        else:
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@torch.no_grad()
def ddim_invert(
    model_fn: ModelFn,
    scheduler: DDIMInverseScheduler,
    x0: torch.Tensor,
    steps: int,
    *,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (section 3: the x_T half of the bipartite latent).

    Pair it with `sample(..., make_scheduler("ddim", same schedule), steps, eta=0)`; the two use
    the same "trailing" timesteps when `steps` divides num_train_timesteps.
    """
    if not isinstance(scheduler, DDIMInverseScheduler):
        raise TypeError(f"scheduler must be a DDIMInverseScheduler, got {type(scheduler).__name__}")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    scheduler.set_timesteps(steps, device=x0.device)
    fn = guided(model_fn, guidance_scale, channels=x0.shape[1])
    x = x0
    for t in scheduler.timesteps:
        out = fn(x, _timestep_batch(t, x))[:, : x.shape[1]]
        x = scheduler.step(out, t, x).prev_sample
    return x


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise drawn on the generator's device then moved, so a CPU seed gives the same x_T anywhere."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)
