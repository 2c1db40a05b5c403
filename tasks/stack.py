"""The trained stack of a run, loaded from its storage directory without Ray: the one place that
knows which stage wrote which part (evaluation, registration and the sampling CLI share it).

    stack = load_stack("/tmp/u1")                  # <storage>/{embed,pca,train_*}/
    images = stack.unclip.sample(["a small red circle"], generator=g)   # (B, 3, H, W) in [-1, 1]
    z_i = stack.clip.encode_image(stack.clip.normalize(uint8_batch))

Parts (`PARTS`, each a directory): the CLIP that embedded the table (`embed/clip`), the prior
(`train_prior/ema`), the decoder (`train_decoder/ema`), the upsampler (`train_upsampler/ema`,
optional), the PCA basis (`pca/`, optional). `which="best"` takes each stage's best-by-validation
EMA instead of its final one. `load_stack_parts` loads from any such dict of directories (e.g. a
registered model's artifacts, tasks.serving), `load_stack` from a storage directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

STAGE_OF = {"prior": "train_prior", "decoder": "train_decoder", "upsampler": "train_upsampler"}
PARTS = ("clip", "prior", "decoder", "upsampler", "pca")
REQUIRED_PARTS = ("clip", "prior", "decoder")
# the file that marks a part's directory as complete
MARKER = {"clip": "clip_spec.json", "prior": "config.json", "decoder": "config.json", "upsampler": "config.json",
          "pca": "pca.json"}


class StackError(FileNotFoundError):
    """A storage directory without the parts a command needs; the message says which and how to make them."""


@dataclass
class Stack:
    unclip: Any  # models.unclip.UnCLIP with a text encoder
    clip: Any  # models.clip.ClipEncoder (frozen)
    pca: Any | None  # models.pca.PcaBasis
    storage: Path | None = None  # the run's storage, when loaded from one

    @property
    def image_size(self) -> int:
        ups = self.unclip.upsamplers
        return ups[-1].config.image_size if ups else self.unclip.decoder.config.image_size


def parts_from_stage_dirs(stage_dirs: Mapping[str, str | os.PathLike], which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """{part: directory or None} from stage output directories ({"embed": ..., "train_prior": ...});
    a stage that is absent, or did not write its part, gives None."""
    dirs = {name: Path(d) for name, d in stage_dirs.items() if d is not None}
    candidates = {"clip": dirs["embed"] / "clip" if "embed" in dirs else None, "pca": dirs.get("pca")}
    for part, stage in STAGE_OF.items():
        candidates[part] = dirs[stage] / which if stage in dirs else None
    return {part: path if path is not None and (path / MARKER[part]).is_file() else None for part, path in candidates.items()}


def stack_parts(storage: str | os.PathLike, which: Literal["ema", "best"] = "ema") -> dict[str, Path | None]:
    """Paths of each part of a run's storage (None for an optional part that is absent); StackError naming the missing ones."""
    storage = Path(storage)
    parts = parts_from_stage_dirs({s: storage / s for s in ("embed", "pca", *STAGE_OF.values())}, which)
    missing = [f"{p} ({storage / ('embed/clip' if p == 'clip' else STAGE_OF[p] + '/' + which)})"
               for p in REQUIRED_PARTS if parts[p] is None]
    if missing:
        raise StackError(f"{storage} has no trained {', '.join(missing)}: run the pipeline there first "
                         f"(e.g. unclip run pipelines/configs/quick.yaml --storage {storage})")
    return parts


def load_stack(storage: str | os.PathLike, device: str = "cpu", which: Literal["ema", "best"] = "ema",
               upsample: bool = True) -> Stack:
    return load_stack_parts(stack_parts(storage, which), device=device, upsample=upsample, storage=Path(storage))


def load_stack_parts(parts: Mapping[str, str | os.PathLike | None], device: str = "cpu", upsample: bool = True,
                     storage: Path | None = None) -> Stack:
    """The stack from a dict of part directories (keys of PARTS; upsampler and pca may be None or absent)."""
    from models import checkpoint
    from models.unclip import UnCLIP, clip_text_encoder
    from tasks.schema import load_clip_dir, load_pca

    missing = [p for p in REQUIRED_PARTS if not parts.get(p)]
    if missing:
        raise StackError(f"the stack needs the parts {list(REQUIRED_PARTS)}; missing: {missing}")
    clip = load_clip_dir(parts["clip"], device=device).eval()
    prior = checkpoint.load(parts["prior"], map_location=device).eval()
    decoder = checkpoint.load(parts["decoder"], map_location=device).eval()
    upsamplers = [checkpoint.load(parts["upsampler"], map_location=device).eval()] if upsample and parts.get("upsampler") else []
    pca = load_pca(parts["pca"]) if parts.get("pca") else None
    unclip = UnCLIP(decoder, prior, upsamplers, text_encoder=clip_text_encoder(clip))
    return Stack(unclip=unclip, clip=clip, pca=pca, storage=storage)
