"""PCA stage: a basis for CLIP image embeddings and the AR prior's per-dimension buckets.

Reads the embedding table (one pass; a uniform sample of `sample_size` rows if set), fits the one
PCA basis (`models.pca.fit_pca`: components by decreasing eigenvalue, per-dim quantile bucket
edges, and quantile edges of z_i.z_t from the table's `similarity` column), and writes
`pca.safetensors` + `pca.json` (see tasks.schema for the artifact contract). The AR prior of the
paper keeps 319 of 1024 dims and quantises each kept dim into 1024 buckets; `ARPrior.from_basis`
takes the loaded artifact as it is.

MLflow (the stage's active run): explained-variance curve (PNG), dims for 90/99/99.9% of the
variance, reconstruction cosine at the kept dims, and the artifact's JSON.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from models.pca import PcaBasis, fit_pca
from tasks.context import StageContext
from tasks.progress import progress
from tasks.schema import PCA_META, list_embedding_files, read_pca_meta, save_pca, to_matrix

__all__ = ["PcaConfig", "run", "fit_basis", "dims_for_variance"]

PAPER_KEPT_DIMS = 319
VARIANCE_LEVELS = (0.90, 0.99, 0.999)


class PcaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kept_dims: int | None = Field(
        None, ge=1, le=8192,
        description="PCA dims kept (and quantised) for the AR prior; default min(319, embed dim) as in the paper")
    num_buckets: int = Field(1024, ge=2, le=65536, description="quantile buckets per kept dim (paper: 1024)")
    similarity_buckets: int = Field(64, ge=2, le=65536, description="quantile buckets for the z_i·z_t token")
    sample_size: int | None = Field(
        None, ge=2, description="fit on a uniform sample of this many rows (None: all rows)")
    exclude_splits: list[str] = Field(
        default_factory=lambda: ["heldout"], description="rows whose `split` is listed are not used for the fit")


def dims_for_variance(explained_variance_ratio: np.ndarray, level: float) -> int:
    """Smallest number of leading components whose explained variance ratio sums to >= level."""
    cum = np.cumsum(explained_variance_ratio)
    return int(min(np.searchsorted(cum, level - 1e-12) + 1, len(cum)))


def _load_image_embeddings(files, cfg: PcaConfig, seed: int, show_progress: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(image embeddings (n, d) float32, similarity (n,), rows available) after split filtering and sampling."""
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    keep_prob = 1.0 if cfg.sample_size is None or cfg.sample_size >= total else cfg.sample_size / total
    rng = np.random.default_rng(seed)
    embs, sims, available = [], [], 0
    for f in progress(files, desc="pca: reading embeddings", unit="file", enabled=show_progress):
        table = pq.read_table(f, columns=["image_emb", "similarity", "split"])
        if cfg.exclude_splits:
            table = table.filter(pc.invert(pc.is_in(table["split"], value_set=pa.array(cfg.exclude_splits, type=pa.string()))))
        available += table.num_rows
        if keep_prob < 1.0:
            table = table.filter(rng.random(table.num_rows) < keep_prob)
        embs.append(to_matrix(table["image_emb"]))
        sims.append(table["similarity"].to_numpy().astype(np.float32))
    if not embs:
        raise ValueError("the embedding table is empty")
    return np.concatenate(embs), np.concatenate(sims), available


def fit_basis(z: np.ndarray, similarity: np.ndarray | None, cfg: PcaConfig) -> tuple[PcaBasis, dict]:
    """models.pca.fit_pca with the stage's settings, and the numbers pca.json and MLflow record."""
    import torch

    n, d = z.shape
    kept = min(PAPER_KEPT_DIMS, d) if cfg.kept_dims is None else cfg.kept_dims
    if kept > min(n, d):
        raise ValueError(f"pca.kept_dims={kept} exceeds the number of components available "
                         f"(min(rows={n}, embed dim={d}) = {min(n, d)}); lower pca.kept_dims")
    z = torch.as_tensor(np.asarray(z, dtype=np.float32))
    similarity = None if similarity is None else torch.as_tensor(np.asarray(similarity, dtype=np.float32))
    basis = fit_pca(z, kept, cfg.num_buckets, similarity=similarity, similarity_buckets=cfg.similarity_buckets)
    ratio = basis.explained_variance_ratio.double().numpy()
    cos = torch.nn.functional.cosine_similarity(basis.reconstruct(basis.project(z)), z, dim=-1, eps=1e-12)
    meta = {
        "embed_dim": d, "kept_dims": kept, "num_buckets": cfg.num_buckets, "similarity_buckets": cfg.similarity_buckets,
        "n_fit": n, "n_components": basis.components.shape[0],
        **{f"dims_for_{lvl * 100:g}pct_variance": dims_for_variance(ratio, lvl) for lvl in VARIANCE_LEVELS},
        "variance_kept": float(ratio[:kept].sum()),
        "reconstruction_cosine_kept": float(cos.mean()),
    }
    return basis, meta


def _variance_plot(basis: PcaBasis):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = basis.explained_variance_ratio.numpy()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(np.arange(1, len(ratio) + 1), np.cumsum(ratio), label="cumulative")
    ax.plot(np.arange(1, len(ratio) + 1), ratio, label="per component")
    ax.axvline(basis.kept_dims, color="grey", linestyle="--", label=f"kept: {basis.kept_dims}")
    for lvl in VARIANCE_LEVELS:
        ax.axhline(lvl, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("components")
    ax.set_ylabel("explained variance ratio")
    ax.set_title("PCA of CLIP image embeddings")
    ax.legend()
    fig.tight_layout()
    return fig


def run(cfg: PcaConfig, ctx: StageContext) -> dict[str, float]:
    import mlflow

    t0 = time.perf_counter()
    files = list_embedding_files(ctx.input("embed"))
    if not files:
        raise FileNotFoundError(f"no embedding files in {ctx.input('embed')} (run the embed stage first)")
    z, sim, available = _load_image_embeddings(files, cfg, ctx.seed, ctx.show_progress)
    t_read = time.perf_counter() - t0
    basis, meta = fit_basis(z, sim, cfg)
    meta.update({"source_files": len(files), "rows_available": available, "exclude_splits": cfg.exclude_splits})
    save_pca(basis, ctx.out_dir, meta)
    t_total = time.perf_counter() - t0
    counts = {
        "rows_fit": float(meta["n_fit"]),
        "rows_available": float(available),
        "embed_dim": float(meta["embed_dim"]),
        "kept_dims": float(meta["kept_dims"]),
        "num_buckets": float(meta["num_buckets"]),
        **{k: float(meta[k]) for k in meta if k.startswith("dims_for_")},
        "variance_kept": meta["variance_kept"],
        "reconstruction_cosine_kept": meta["reconstruction_cosine_kept"],
        "read_seconds": t_read,
        "seconds": t_total,
    }
    if mlflow.active_run() is not None:
        import matplotlib.pyplot as plt

        fig = _variance_plot(basis)
        mlflow.log_figure(fig, "pca/explained_variance.png")
        plt.close(fig)
        mlflow.log_metrics({k: v for k, v in counts.items() if not k.endswith("seconds")})
        mlflow.log_artifact(str(ctx.out_dir / PCA_META), artifact_path="pca")
    return counts


def summary(directory) -> str:
    return json.dumps(read_pca_meta(directory), indent=2)
