"""train_prior stage: the diffusion prior (or the AR prior) from the embedding table.

Batches: z_i, z_t from the table; caption token states from the frozen CLIP that made the table
(tasks.captions), computed on the worker. The AR prior also needs the PCA basis (the pca stage).
Validation figures (DALLE2-pytorch's): cos(ẑ_i, z_i), cos(ẑ_i, z_t), the text baseline
cos(z_t, z_i) and cos(ẑ_i, z_i) under an unrelated (rolled) caption.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks import training
from tasks.context import StageContext

COLUMNS = ["image_emb", "text_emb", "text_tokens"]


class TrainPriorConfig(training.TrainConfig):
    kind: Literal["prior", "ar_prior"] = Field("prior", description="diffusion prior or AR prior")
    sample_steps: int = Field(16, ge=1, description="DDIM steps for the validation figures")
    guidance_scale: float = Field(1.0, ge=0, description="guidance for the validation figures")


class PriorBatches:
    def __init__(self, device, embed_dir: str):
        from tasks.captions import CaptionEncoder

        self.captions = CaptionEncoder(embed_dir, device)
        self.device = device

    def __call__(self, raw: dict) -> dict:
        states, mask = self.captions(raw["text_tokens"])
        return {"image_emb": raw["image_emb"].float().to(self.device), "text_emb": raw["text_emb"].float().to(self.device),
                "text_states": states, "text_mask": mask}


def prior_figures(network, batch, step: int, directory: Path, sample_steps: int = 16, guidance_scale: float = 1.0):
    """Sample ẑ_i for a validation batch; cosines against z_i, z_t and a rolled caption."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=batch["image_emb"].device).manual_seed(0)
    z_i, z_t = batch["image_emb"], batch["text_emb"]

    steps = {} if type(network).__name__ == "ARPrior" else {"steps": sample_steps}  # AR: one pass per token

    def draw(text_emb, states, mask):
        return network.sample(text_emb, states, mask, guidance_scale=guidance_scale, generator=generator, **steps)

    z_hat = draw(z_t, batch["text_states"], batch["text_mask"])
    rolled = draw(z_t.roll(1, 0), batch["text_states"].roll(1, 0), batch["text_mask"].roll(1, 0))
    cos = lambda a, b: float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())
    figures = {"val_cos_pred_image": cos(z_hat, z_i), "val_cos_pred_text": cos(z_hat, z_t),
               "val_cos_text_image": cos(z_t, z_i), "val_cos_pred_image_rolled": cos(rolled, z_i)}
    path = directory / f"prior_figures_{step:07d}.json"
    path.write_text(json.dumps({"step": step, **figures}, indent=2))
    return [path], figures


def model_config(cfg: TrainPriorConfig, embed_dir: Path, ctx: StageContext | None = None) -> dict:
    from models import sizes
    from tasks.captions import clip_dims

    dims = clip_dims(embed_dir)
    derived = {"embed_dim": dims["embed_dim"], "text_dim": dims["text_width"], "text_len": dims["context_length"]}
    if cfg.kind == "ar_prior":  # token vocabulary from the fitted basis
        from tasks.schema import load_pca

        basis = load_pca(ctx.input("pca"))
        derived.update(kept_dims=basis.kept_dims, num_buckets=basis.num_buckets,
                       similarity_buckets=basis.similarity_buckets)
    return dataclasses.asdict(sizes.config_for(cfg.kind, cfg.size, **{**derived, **cfg.model}))


def run(cfg: TrainPriorConfig, ctx: StageContext) -> dict[str, float]:
    from tasks.dataset import embedding_dataset

    embed_dir = ctx.input("embed")
    common = dict(val_fraction=cfg.val_fraction, columns=COLUMNS)
    train = embedding_dataset(embed_dir, split="train", **common)
    val = embedding_dataset(embed_dir, split="validation", **common) if cfg.val_fraction > 0 else None
    spec = training.TrainSpec(
        kind=cfg.kind,
        batches=PriorBatches,
        batch_args={"embed_dir": str(embed_dir)},
        samples=_Figures(cfg.sample_steps, cfg.guidance_scale),
        setup=SetBasis(str(ctx.input("pca"))) if cfg.kind == "ar_prior" else None,
    )
    return training.fit(spec, cfg, ctx, model_config(cfg, embed_dir, ctx), train, val)


@dataclasses.dataclass
class SetBasis:
    """The AR prior's PCA basis and bucket edges (the pca stage's artifact) set on a new network."""

    pca_dir: str

    def __call__(self, network) -> None:
        from tasks.schema import load_pca

        network.set_basis(load_pca(self.pca_dir))


@dataclasses.dataclass
class _Figures:
    sample_steps: int
    guidance_scale: float

    def __call__(self, network, batch, step, directory):
        return prior_figures(network, batch, step, directory, self.sample_steps, self.guidance_scale)
