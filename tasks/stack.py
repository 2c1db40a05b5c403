"""The trained stack of a run, loaded from its storage directory without Ray: the one place that
knows which stage wrote which part (evaluation, registration and the sampling CLI share it).

    stack = load_stack("/tmp/u1")                  # <storage>/{embed,pca,train_*}/
    images = stack.unclip.sample(["a small red circle"], generator=g)   # (B, 3, H, W) in [-1, 1]
    z_i = stack.clip.encode_image(stack.clip.normalize(uint8_batch))

Parts: the CLIP that embedded the table (`embed/clip`), the prior (`train_prior/ema`), the decoder
(`train_decoder/ema`), the upsampler (`train_upsampler/ema`, optional), the PCA basis (`pca/`,
optional). `which="best"` takes each stage's best-by-validation EMA instead of its final one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

STAGE_OF = {"prior": "train_prior", "decoder": "train_decoder", "upsampler": "train_upsampler"}


class StackError(FileNotFoundError):
    """A storage directory without the parts a command needs; the message says which and how to make them."""


@dataclass
class Stack:
    unclip: Any  # models.unclip.UnCLIP with a text encoder
    clip: Any  # models.clip.ClipEncoder (frozen)
    pca: Any | None  # models.pca.PcaBasis
    storage: Path

    @property
    def image_size(self) -> int:
        ups = self.unclip.upsamplers
        return ups[-1].config.image_size if ups else self.unclip.decoder.config.image_size


def stack_parts(storage: str | os.PathLike, which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """Paths of each part (None for an optional part that is absent); StackError naming the missing ones."""
    storage = Path(storage)
    parts: dict[str, Path | None] = {"embed": storage / "embed", "pca": storage / "pca"}
    for part, stage in STAGE_OF.items():
        parts[part] = storage / stage / which
    missing = [f"{p} ({parts[p]})" for p in ("embed", "prior", "decoder") if not (parts[p] / ("clip" if p == "embed" else "config.json")).exists()]
    if missing:
        raise StackError(f"{storage} has no trained {', '.join(missing)}: run the pipeline there first "
                         f"(e.g. unclip run pipelines/configs/quick.yaml --storage {storage})")
    for optional in ("upsampler", "pca"):
        marker = "config.json" if optional == "upsampler" else "pca.json"
        if not (parts[optional] / marker).is_file():
            parts[optional] = None
    return parts


def load_stack(storage: str | os.PathLike, device: str = "cpu", which: Literal["ema", "best"] = "ema",
               upsample: bool = True) -> Stack:
    from models import checkpoint
    from models.unclip import UnCLIP, clip_text_encoder
    from tasks.schema import load_embedding_clip, load_pca

    parts = stack_parts(storage, which)
    clip = load_embedding_clip(parts["embed"], device=device).eval()
    prior = checkpoint.load(parts["prior"], map_location=device).eval()
    decoder = checkpoint.load(parts["decoder"], map_location=device).eval()
    upsamplers = [checkpoint.load(parts["upsampler"], map_location=device).eval()] if upsample and parts["upsampler"] else []
    pca = load_pca(parts["pca"]) if parts["pca"] else None
    unclip = UnCLIP(decoder, prior, upsamplers, text_encoder=clip_text_encoder(clip))
    return Stack(unclip=unclip, clip=clip, pca=pca, storage=Path(storage))
