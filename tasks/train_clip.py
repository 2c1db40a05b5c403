"""train_clip stage (optional): a CLIP trained from scratch on the ingested pairs, for domains
with no pretrained CLIP (and for the offline demo, whose random CLIP would embed nothing useful).

Ray Data reads the tar shards, decodes and resizes images and tokenizes captions on CPU tasks;
pairs the dataset marks "heldout" are never trained on. The loop trains open_clip's model with its
contrastive loss (models.clip). Output besides the loop's exports: `clip/arch.json` +
`clip/clip.safetensors` (open_clip's state dict), what `embed` loads when `embed.clip_from` is
`train_clip`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tasks import training
from tasks.context import StageContext

CLIP_EXPORT = "clip"
ARCH_NAME = "arch.json"
WEIGHTS_NAME = "clip.safetensors"


class TrainClipConfig(training.TrainConfig):
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 256


def pair_rows(batch: dict[str, Any], image_size: int, context_length: int, split: str, val_fraction: float) -> Iterator[dict]:
    """Ray Data UDF: webdataset rows → {"image": uint8 (B, S, S, 3), "text_tokens": int64 (B, L)}.
    Undecodable samples and held-out pairs are dropped (embed counts the former)."""
    from models.clip_preprocess import import_open_clip
    from tasks.dataset import decoded_pairs

    SimpleTokenizer = import_open_clip().SimpleTokenizer  # a Ray Data worker may not have loaded models.clip

    images, captions = [], []
    for i, _, image in decoded_pairs(batch, split, val_fraction, image_size):
        caption = batch["txt"][i]
        try:  # a caption that is not UTF-8 drops its pair (embed counts it)
            captions.append(caption.decode("utf-8") if isinstance(caption, bytes) else str(caption))
        except UnicodeDecodeError:
            continue
        images.append(image)
    if not images:  # nothing (a generator): Ray Data would store a zero-row tensor batch pickled, with a warning
        return
    tokens = SimpleTokenizer(context_length=context_length)(captions).numpy()
    yield {"image": np.stack(images), "text_tokens": tokens.astype(np.int64)}


class ClipBatches:
    def __init__(self, device):
        self.device = device

    def __call__(self, raw: dict) -> dict:
        image = raw["image"].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return {"image": image, "text_tokens": raw["text_tokens"].long().to(self.device)}


def clip_pairs(ingest_dir: Path, split: str, image_size: int, context_length: int, val_fraction: float):
    import ray

    from tasks.dataset import image_task_cpus

    ds = ray.data.read_webdataset(str(ingest_dir), decoder=None, file_extensions=["tar"])
    return ds.map_batches(pair_rows, batch_size=256, num_cpus=image_task_cpus(),
                          fn_kwargs={"image_size": image_size, "context_length": context_length,
                                     "split": split, "val_fraction": val_fraction})


def export_for_embed(out_dir: Path) -> None:
    """The trained EMA CLIP as open_clip weights + architecture, for `embed.clip_from`."""
    from models import checkpoint
    from models.clip import save_clip_weights

    model = checkpoint.load(out_dir / "ema")
    target = out_dir / CLIP_EXPORT
    target.mkdir(exist_ok=True)
    save_clip_weights(model.encoder(), target / WEIGHTS_NAME)
    (target / ARCH_NAME).write_text(json.dumps(model.config.arch, indent=2))


def run(cfg: TrainClipConfig, ctx: StageContext) -> dict[str, float]:
    from models import sizes

    config = dataclasses.asdict(sizes.config_for("clip", cfg.size, **cfg.model))
    image_size = config["arch"]["vision_cfg"]["image_size"]
    context_length = config["arch"]["text_cfg"]["context_length"]
    ingest_dir = ctx.input("ingest")
    train = clip_pairs(ingest_dir, "train", image_size, context_length, cfg.val_fraction)
    val = clip_pairs(ingest_dir, "validation", image_size, context_length, cfg.val_fraction) if cfg.val_fraction > 0 else None
    spec = training.TrainSpec(kind="clip", batches=ClipBatches)
    counts = training.fit(spec, cfg, ctx, config, train, val)
    export_for_embed(ctx.out_dir)
    return counts
