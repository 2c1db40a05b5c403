"""train_upsampler and train_upsampler2 stages: the first and second upsampler of the stack (the
paper's 64→256 with blur, 256→1024 with BSR degradation; here whatever sizes the config names),
from the ingested images alone. Both run this module; the second's defaults follow the paper
(TrainUpsampler2Config), and its low_res_size must be the first's image_size (pipelines.checks).

Ray Data reads the tar shards and, on CPU tasks, decodes each image at the upsampler's size,
makes its corrupted low-resolution conditioning (models.degradations) and draws the training
crop's corner; the loop's objective only cuts the crop and trains (models.upsampler). Sample grid:
validation images, bicubic upsampling of their low-res version, and the upsampler's output.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from tasks import training
from tasks.context import StageContext


class TrainUpsamplerConfig(training.TrainConfig):
    # fields of models.upsampler.UpsamplerConfig set over the named size, under `model`
    model_defaults: ClassVar[dict[str, Any]] = {}

    sample_steps: int = Field(15, ge=1, description="DDIM steps for the sample grid")
    grid_rows: int = Field(8, ge=1, le=64, description="validation images in the sample grid")

    def upsampler_config(self) -> dict[str, Any]:
        from models import sizes

        return dataclasses.asdict(sizes.config_for("upsampler", self.size, **{**self.model_defaults, **self.model}))


class TrainUpsampler2Config(TrainUpsamplerConfig):
    """The second upsampler: as the paper's 256→1024, a linear noise schedule and BSR-degraded
    conditioning unless `model` sets `schedule` / `degradation` (the network has no attention)."""

    model_defaults: ClassVar[dict[str, Any]] = {"schedule": "linear", "degradation": "bsr"}


def upsampler_rows(batch: dict[str, Any], model_config: dict, split: str, val_fraction: float, seed: int) -> Iterator[dict]:
    """Ray Data UDF: webdataset rows → {"image": uint8 (B, S, S, 3) at image_size, "low": float
    (B, 3, s, s) degraded low-res conditioning in [-1, 1], "crop": int64 (B, 2) crop corners}.
    Held-out pairs and undecodable images are dropped (embed counts the latter)."""
    import hashlib

    import torch

    from models import degradations
    from tasks.dataset import decoded_pairs

    size, low_size = model_config["image_size"], model_config["low_res_size"]
    crop = model_config["crop_size"] or size // 4
    images, kept = [], []
    for _, key, image in decoded_pairs(batch, split, val_fraction, size):
        images.append(image)
        kept.append(key)
    if not images:  # nothing (a generator): Ray Data would store a zero-row tensor batch pickled, with a warning
        return
    # Validation rows get the same corruption every time (comparable losses); training rows get
    # fresh corruptions and crops on every epoch's read.
    entropy = "".join(kept) + str(seed) if split == "validation" else os.urandom(16).hex()
    digest = hashlib.blake2b(entropy.encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    hi = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    low = degradations.degrade(degradations.downsample_to(hi, low_size), model_config["degradation"], generator,
                               blur_kernel=model_config["blur_kernel"], blur_sigma=model_config["blur_sigma"])
    corners = torch.randint(0, size - crop + 1, (len(images), 2), generator=generator)
    yield {"image": np.stack(images), "low": low.clamp(-1, 1).numpy().astype(np.float32), "crop": corners.numpy()}


class UpsamplerBatches:
    def __init__(self, device):
        self.device = device

    def __call__(self, raw: dict) -> dict:
        image = raw["image"].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return {"image": image, "low": raw["low"].float().to(self.device), "crop": raw["crop"].long().to(self.device)}


@dataclasses.dataclass
class UpsamplerGrid:
    steps: int
    rows: int

    def __call__(self, network, batch, step: int, directory: Path):
        import torch
        from torchvision.utils import save_image

        from models.upsampler import upsample_to

        n = min(self.rows, batch["image"].shape[0])
        low = batch["low"][:n]
        generator = torch.Generator(device=low.device).manual_seed(0)
        drawn = network.sample(low, steps=self.steps, generator=generator)
        bicubic = upsample_to(low, batch["image"].shape[-1]).clamp(-1, 1)
        path = directory / f"upsampler_samples_{step:07d}.png"
        save_image(torch.cat([batch["image"][:n], bicubic, drawn]).float().cpu() * 0.5 + 0.5, str(path), nrow=n)
        return [path], {}


def upsampler_pairs(ingest_dir: Path, split: str, model_config: dict, val_fraction: float, seed: int):
    import ray

    from tasks.dataset import image_task_cpus

    ds = ray.data.read_webdataset(str(ingest_dir), decoder=None, file_extensions=["tar"])
    return ds.map_batches(upsampler_rows, batch_size=64, num_cpus=image_task_cpus(),
                          fn_kwargs={"model_config": model_config, "split": split, "val_fraction": val_fraction,
                                     "seed": seed})


def run(cfg: TrainUpsamplerConfig, ctx: StageContext) -> dict[str, float]:
    config = cfg.upsampler_config()
    ingest_dir = ctx.input("ingest")
    train = upsampler_pairs(ingest_dir, "train", config, cfg.val_fraction, ctx.seed)
    val = upsampler_pairs(ingest_dir, "validation", config, cfg.val_fraction, ctx.seed) if cfg.val_fraction > 0 else None
    spec = training.TrainSpec(kind="upsampler", batches=UpsamplerBatches, samples=UpsamplerGrid(cfg.sample_steps, cfg.grid_rows))
    return training.fit(spec, cfg, ctx, config, train, val)
