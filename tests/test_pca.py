"""tasks.pca: the fit against numpy's SVD, the artifact, buckets and the MLflow logging."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from tasks.context import StageContext
from tasks.pca import PcaConfig, dims_for_variance, fit_pca, load_pca, run
from tasks.schema import embedding_file, embedding_schema, embedding_table, write_embeddings


def _low_rank(n=600, d=48, rank=6, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([8, 5, 3, 2, 1, 0.5])[:rank]
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T  # (rank, d) orthonormal
    z = (rng.normal(size=(n, rank)) * scales) @ basis + noise * rng.normal(size=(n, d)) + rng.normal(size=d)
    return z


def test_explained_variance_matches_numpy_svd():
    z = _low_rank()
    basis = fit_pca(z, kept_dims=6, num_buckets=16)
    centred = z - z.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    np.testing.assert_allclose(basis.explained_variance.numpy(), (s**2 / (len(z) - 1)).astype(np.float32), rtol=1e-4, atol=1e-7)
    ratio = basis.explained_variance_ratio.numpy()
    assert np.all(np.diff(basis.explained_variance.numpy()) <= 0)  # decreasing eigenvalues
    assert ratio[:6].sum() > 0.9999 and dims_for_variance(ratio, 0.99) <= 6
    assert basis.meta["reconstruction_cosine_kept"] > 0.9999
    # leading components span the planted subspace: projector distance to numpy's top-6 right vectors
    vt = np.linalg.svd(centred, full_matrices=False)[2][:6]
    c = basis.components[:6].double().numpy()
    np.testing.assert_allclose(c.T @ c, vt.T @ vt, atol=1e-4)


def test_components_orthonormal_and_edges_monotone():
    z = np.random.default_rng(1).normal(size=(400, 32))
    basis = fit_pca(z, kept_dims=10, num_buckets=64)
    c = basis.components.double()
    torch.testing.assert_close(c @ c.T, torch.eye(32, dtype=torch.float64), atol=1e-5, rtol=0)
    assert basis.bucket_edges.shape == (65, 10)
    assert torch.all(basis.bucket_edges[1:] >= basis.bucket_edges[:-1])
    assert torch.all(basis.bucket_widths > 0)  # continuous data: no empty buckets


def test_quantise_dequantise_round_trip_within_bucket_width():
    z = np.random.default_rng(2).normal(size=(500, 24))
    basis = fit_pca(z, kept_dims=8, num_buckets=32)
    coords = basis.project(torch.as_tensor(z, dtype=torch.float32))
    tokens = basis.quantize_coords(coords)
    assert tokens.dtype == torch.long and tokens.min() >= 0 and tokens.max() < 32
    assert tokens.min() == 0 and tokens.max() == 31  # the quantiles use every bucket
    back = basis.dequantize_coords(tokens)
    width = torch.gather(basis.bucket_widths, 0, tokens)
    assert torch.all((back - coords).abs() <= width + 1e-5)
    # each coordinate lies inside the bucket it was assigned to
    lo = torch.gather(basis.bucket_edges[:-1], 0, tokens)
    hi = torch.gather(basis.bucket_edges[1:], 0, tokens)
    assert torch.all((coords >= lo - 1e-5) & (coords <= hi + 1e-5))
    # about equal counts per bucket (quantiles of the fit data)
    counts = torch.bincount(tokens[:, 0], minlength=32)
    assert counts.min() >= 500 // 32 - 2 and counts.max() <= 500 // 32 + 3
    # full embedding round trip: unit-norm output
    assert torch.allclose(basis.dequantize(basis.quantize(torch.as_tensor(z[:5]))).norm(dim=-1), torch.ones(5))


def test_kept_dims_larger_than_components_is_a_clear_error():
    with pytest.raises(ValueError, match="pca.kept_dims=40"):
        fit_pca(np.random.default_rng(0).normal(size=(100, 16)), kept_dims=40)


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="num_buckets"):
        PcaConfig(num_buckets=1)
    with pytest.raises(ValidationError, match="kept_dim"):
        PcaConfig(kept_dim=3)
    with pytest.raises(ValidationError, match="svd_solver"):
        PcaConfig(svd_solver="magic")


def _write_table(directory, z, splits, shard):
    n, d = z.shape
    schema = embedding_schema(d, 4)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    cols = {"key": [f"{shard}{i:04d}" for i in range(n)], "caption": ["x"] * n, "shard": [shard] * n,
            "split": splits, "image_emb": zn, "text_emb": zn, "text_tokens": np.zeros((n, 4), np.int32),
            "similarity": np.ones(n, np.float32)}
    write_embeddings(embedding_table(cols, schema), embedding_file(directory, shard))


def test_run_writes_artifact_and_logs_to_mlflow(tmp_path):
    embed_dir, out = tmp_path / "embed", tmp_path / "pca"
    embed_dir.mkdir(), out.mkdir()
    z = _low_rank(n=300, d=32, noise=1e-2) + 3.0
    _write_table(embed_dir, z[:200], ["train"] * 150 + ["heldout"] * 50, "00000")
    _write_table(embed_dir, z[200:], ["train"] * 100, "00001")
    ctx = StageContext("pca", tmp_path, out, {"embed": embed_dir}, seed=0, show_progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
    with mlflow.start_run() as active:
        counts = run(PcaConfig(kept_dims=8, num_buckets=16), ctx)
    assert counts["rows_fit"] == 250 and counts["rows_available"] == 250  # heldout excluded
    assert counts["kept_dims"] == 8 and counts["dims_for_99.9pct_variance"] <= 32
    basis = load_pca(out)
    assert basis.kept_dims == 8 and basis.num_buckets == 16 and basis.components.shape == (32, 32)
    assert json.loads((out / "pca.json").read_text())["n_fit"] == 250
    client = mlflow.tracking.MlflowClient()
    run_data = client.get_run(active.info.run_id).data
    assert run_data.metrics["kept_dims"] == 8 and 0 < run_data.metrics["reconstruction_cosine_kept"] <= 1.0001
    artifacts = [a.path for a in client.list_artifacts(active.info.run_id, "pca")]
    assert "pca/explained_variance.png" in artifacts and "pca/pca.json" in artifacts
    # a sample: about sample_size rows
    out2 = tmp_path / "pca2"
    out2.mkdir()
    counts = run(PcaConfig(kept_dims=4, num_buckets=8, sample_size=100),
                 StageContext("pca", tmp_path, out2, {"embed": embed_dir}, show_progress=False))
    assert 60 <= counts["rows_fit"] <= 140
