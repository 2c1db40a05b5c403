"""Synth stage: the synthetic image-caption dataset of coloured shapes (tasks.shapes draws them).

Output of the stage (`<storage>/synth/`):
    images/{id}.png     RGB, `image_size` px
    captions.parquet    id, path (relative to the stage dir), caption, split, objects (JSON)
A held-out split contains every image with a colour-shape pair never shown in training
(`tasks.shapes.HELDOUT_PAIRS`); `tasks.shapes.score_image` reads the shapes back.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.context import StageContext
from tasks.progress import progress as progress_bar
from tasks.shapes import render, sample_scene, split_of


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(2000, ge=1, description="number of images")
    image_size: int = Field(128, ge=16, le=1024, description="rendered resolution (above the decoder's)")
    two_object_fraction: float = Field(0.4, ge=0.0, le=1.0)
    sizes_named: float = Field(1.0, ge=0.0, le=1.0, description="the share of captions that name their objects' sizes "
                               "(small/large); in the others sizes are drawn but not named, a detail left to the prior "
                               "(tasks.shapes.sample_scene)")


def generate(out_dir: Path, n: int, seed: int, image_size: int = 128, two_object_fraction: float = 0.4, progress: bool = True,
             sizes_named: float = 1.0) -> dict[str, float]:
    """Write `n` images and captions.parquet under out_dir; deterministic by seed."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    naming = random.Random(f"{seed}-sizes")  # its own stream: the scenes do not depend on which captions name sizes
    rows = {"id": [], "path": [], "caption": [], "split": [], "objects": []}
    for i in progress_bar(range(n), desc="synth", unit="img", enabled=progress):
        objects, caption = sample_scene(rng, two_object_fraction, name_sizes=naming.random() < sizes_named)
        image_id = f"{i:07d}"
        path = f"images/{image_id}.png"
        render(objects, image_size).save(out_dir / path)
        rows["id"].append(image_id)
        rows["path"].append(path)
        rows["caption"].append(caption)
        rows["split"].append(split_of(objects))
        rows["objects"].append(json.dumps([o.__dict__ for o in objects]))
    table = pa.table(rows)
    tmp = out_dir / ".captions.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out_dir / "captions.parquet")
    heldout = sum(s == "heldout" for s in rows["split"])
    return {"images": n, "train": n - heldout, "heldout": heldout}


def run(cfg: SynthConfig, ctx: StageContext) -> dict[str, float]:
    return generate(ctx.out_dir, cfg.n, ctx.seed, cfg.image_size, cfg.two_object_fraction, ctx.show_progress, cfg.sizes_named)
