"""One registry for every trainable model kind: its network class, named sizes, training
objective and batch contract.

    network = sizes.build("decoder", "tiny", dropout=0.1)   # a named size plus config overrides
    loss, metrics = sizes.objective("decoder")(network, batch, generator)
    objective.check_batch(sizes.batch_contract("decoder"), batch)
    training, sampling = sizes.schedulers(network, "ddim")   # diffusion kinds

tiny: runs on a CPU in seconds (tests, demo); small: a laptop/single-GPU run; base: about
Karlo's sizes; paper: the paper's (appendix C). Each model module owns its SIZES table, its
`training_loss` and its `BATCH` contract (see models.objective for the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from models import ar_prior, clip, decoder, prior, upsampler
from models.objective import Field, Objective, unwrap


@dataclass(frozen=True)
class Kind:
    network: type[nn.Module]  # built as network(config)
    sizes: dict  # size name -> config dataclass
    training_loss: Objective  # (network, batch, generator=None) -> (loss, metrics)
    batch: dict[str, Field]  # the batch contract


KINDS: dict[str, Kind] = {
    "prior": Kind(prior.DiffusionPrior, prior.SIZES, prior.training_loss, prior.BATCH),
    "ar_prior": Kind(ar_prior.ARPrior, ar_prior.SIZES, ar_prior.training_loss, ar_prior.BATCH),
    "decoder": Kind(decoder.Decoder, decoder.SIZES, decoder.training_loss, decoder.BATCH),
    "upsampler": Kind(upsampler.Upsampler, upsampler.SIZES, upsampler.training_loss, upsampler.BATCH),
    "clip": Kind(clip.ClipModel, clip.SIZES, clip.training_loss, clip.BATCH),
}


def _lookup(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind]


def config_for(kind: str, size: str, **overrides):
    """The config of a named size with some fields replaced (validated by the config class)."""
    sizes = _lookup(kind).sizes
    if size not in sizes:
        raise ValueError(f"unknown {kind} size {size!r}; known: {sorted(sizes)}")
    return replace(sizes[size], **overrides)


def build(kind: str, size: str, **overrides) -> nn.Module:
    return _lookup(kind).network(config_for(kind, size, **overrides))


def build_from_config(kind: str, config: dict) -> nn.Module:
    """The network of a config given as a dict (e.g. `dataclasses.asdict(config_for(...))` sent to
    a training worker)."""
    network = _lookup(kind).network
    return network(network.config_class(**config))


def objective(kind: str) -> Objective:
    return _lookup(kind).training_loss


def batch_contract(kind: str) -> dict[str, Field]:
    return _lookup(kind).batch


def schedulers(network: nn.Module, sampler: str = "ddim"):
    """(training scheduler, a fresh sampling scheduler) of a diffusion network (prior, decoder,
    upsampler; possibly wrapped): the training one defines q(x_t | x0) for the objective, the
    sampling one is `network.scheduler(sampler)` ("ddpm", "ddim"; the decoder also "ddim_inverse")."""
    model = unwrap(network)
    if not hasattr(model, "training_scheduler"):
        raise TypeError(f"{type(model).__name__} is not a diffusion model: it has no schedulers")
    return model.training_scheduler, model.scheduler(sampler)
