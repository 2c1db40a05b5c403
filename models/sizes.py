"""Named model sizes, one registry for every model kind: `build("decoder", "tiny")`.

tiny: runs on a CPU in seconds (tests, demo); small: a laptop/single-GPU run; base: about
Karlo's sizes; paper: the paper's (appendix C). Each model module owns its SIZES table.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from models import ar_prior, decoder, prior, upsampler

MODELS = {
    "prior": (prior.DiffusionPrior, prior.SIZES),
    "ar_prior": (ar_prior.ARPrior, ar_prior.SIZES),
    "decoder": (decoder.Decoder, decoder.SIZES),
    "upsampler": (upsampler.Upsampler, upsampler.SIZES),
}


def config_for(kind: str, size: str, **overrides):
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODELS)}")
    sizes = MODELS[kind][1]
    if size not in sizes:
        raise ValueError(f"unknown {kind} size {size!r}; known: {sorted(sizes)}")
    return replace(sizes[size], **overrides)


def build(kind: str, size: str, **overrides) -> nn.Module:
    return MODELS[kind][0](config_for(kind, size, **overrides))
