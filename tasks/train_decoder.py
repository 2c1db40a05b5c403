"""train_decoder stage: the diffusion decoder from images joined with their CLIP embeddings.

Batches: images from the ingest shards (resized to the decoder's size in Ray Data), z_i and z_t
from the embedding table, caption token states from the frozen CLIP (tasks.captions) on the
worker. Rows whose image is missing from its shard are counted and skipped. Sample grid: for a
validation batch, real images above images decoded from their z_i.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydantic import Field

from tasks import training
from tasks.context import StageContext

COLUMNS = ["image", "image_emb", "text_emb", "text_tokens"]


class TrainDecoderConfig(training.TrainConfig):
    size: str = "tiny"
    use_captions: bool = Field(True, description="condition on caption token states as well as z_i")
    sample_steps: int = Field(25, ge=1, description="DDIM steps for the sample grid")
    guidance_scale: float = Field(3.0, ge=0, description="decoder guidance for the sample grid")
    sample_eta: float = Field(0.0, ge=0, description="DDIM eta for the sample grid (as evaluate.decoder_eta)")
    grid_rows: int = Field(8, ge=1, le=64, description="validation images in the sample grid")


class DecoderBatches:
    def __init__(self, device, embed_dir: str, use_captions: bool):
        from tasks.captions import CaptionEncoder

        self.captions = CaptionEncoder(embed_dir, device) if use_captions else None
        self.device = device

    def __call__(self, raw: dict) -> dict:
        image = raw["image"].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        batch = {"image": image, "image_emb": raw["image_emb"].float().to(self.device),
                 "text_emb": raw["text_emb"].float().to(self.device)}
        if self.captions is not None:
            batch["text_states"], batch["text_mask"] = self.captions(raw["text_tokens"])
        return batch


@dataclasses.dataclass
class DecoderGrid:
    steps: int
    guidance_scale: float
    eta: float
    rows: int

    def __call__(self, network, batch, step: int, directory: Path):
        import torch
        from torchvision.utils import save_image

        n = min(self.rows, batch["image"].shape[0])
        cut = {k: v[:n] for k, v in batch.items()}
        generator = torch.Generator(device=cut["image"].device).manual_seed(0)
        drawn = network.sample(cut["image_emb"], cut["text_emb"], cut.get("text_states"), cut.get("text_mask"),
                               steps=self.steps, eta=self.eta, guidance_scale=self.guidance_scale, generator=generator)
        path = directory / f"decoder_samples_{step:07d}.png"
        save_image(torch.cat([cut["image"], drawn]).float().cpu() * 0.5 + 0.5, str(path), nrow=n)
        return [path], {}


def model_config(cfg: TrainDecoderConfig, embed_dir: Path) -> dict:
    from models import sizes
    from tasks.captions import clip_dims

    dims = clip_dims(embed_dir)
    derived = {"embed_dim": dims["embed_dim"], "text_dim": dims["text_width"]}
    return dataclasses.asdict(sizes.config_for("decoder", cfg.size, **{**derived, **cfg.model}))


def run(cfg: TrainDecoderConfig, ctx: StageContext) -> dict[str, float]:
    from tasks.dataset import embedding_dataset, rows_without_image

    embed_dir, ingest_dir = ctx.input("embed"), ctx.input("ingest")
    config = model_config(cfg, embed_dir)
    common = dict(val_fraction=cfg.val_fraction, columns=COLUMNS[1:], ingest_dir=ingest_dir,
                  image_size=config["image_size"])
    train = embedding_dataset(embed_dir, split="train", **common)
    val = embedding_dataset(embed_dir, split="validation", **common) if cfg.val_fraction > 0 else None
    spec = training.TrainSpec(
        kind="decoder",
        batches=DecoderBatches,
        batch_args={"embed_dir": str(embed_dir), "use_captions": cfg.use_captions},
        samples=DecoderGrid(cfg.sample_steps, cfg.guidance_scale, cfg.sample_eta, cfg.grid_rows),
    )
    counts = training.fit(spec, cfg, ctx, config, train, val)
    return {**counts, "rows_without_image": float(rows_without_image(embed_dir, ingest_dir))}
