"""The one PCA basis (models.pca) against numpy, its artifact (tasks.schema) and the pca stage
(tasks.pca): fit, buckets, old artifacts, MLflow logging."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from models.pca import PcaBasis, fit_pca, quantile_edges
from tasks.context import StageContext
from tasks.pca import PcaConfig, dims_for_variance, fit_basis, run
from tasks.schema import embedding_file, embedding_schema, embedding_table, load_pca, read_pca_meta, save_pca, write_embeddings
from tests.mlflow_helpers import use_sqlite_store


def _low_rank(n=600, d=48, rank=6, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.array([8, 5, 3, 2, 1, 0.5])[:rank]
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T  # (rank, d) orthonormal
    z = (rng.normal(size=(n, rank)) * scales) @ basis + noise * rng.normal(size=(n, d)) + rng.normal(size=d)
    return z


def test_explained_variance_matches_numpy_svd():
    z = _low_rank()
    basis = fit_pca(torch.as_tensor(z), kept_dims=6, num_buckets=16)
    centred = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)  # independent route: SVD of the data
    np.testing.assert_allclose(basis.explained_variance.numpy(), s**2 / (len(z) - 1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(basis.total_variance, (centred**2).sum() / (len(z) - 1), rtol=1e-9)
    ratio = basis.explained_variance_ratio.numpy()
    assert np.all(np.diff(basis.explained_variance.numpy()) <= 0)  # decreasing eigenvalues
    assert ratio[:6].sum() > 0.9999 and dims_for_variance(ratio, 0.99) <= 6
    c = basis.components.double().numpy()
    np.testing.assert_allclose(c @ c.T, np.eye(48), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose(np.abs(c[:6] @ vt[:6].T), np.eye(6), atol=1e-4)  # numpy's directions, up to sign
    np.testing.assert_allclose(basis.mean.numpy(), z.mean(axis=0), rtol=1e-6, atol=1e-6)


def test_bucket_edges_are_numpy_quantiles_of_the_kept_coordinates():
    z = np.random.default_rng(1).normal(size=(400, 32)).astype(np.float32)
    dot = np.random.default_rng(2).uniform(-0.2, 0.6, size=400).astype(np.float32)
    basis = fit_pca(torch.as_tensor(z), kept_dims=10, num_buckets=64, similarity=torch.as_tensor(dot), similarity_buckets=8)
    assert basis.bucket_edges.shape == (10, 65) and basis.dot_edges.shape == (9,)  # one row per kept dim
    coords = (z - basis.mean.numpy()) @ basis.components[:10].numpy().T
    np.testing.assert_allclose(basis.bucket_edges.numpy(), np.quantile(coords, np.linspace(0, 1, 65), axis=0).T, atol=1e-5)
    np.testing.assert_allclose(basis.dot_edges.numpy(), np.quantile(dot, np.linspace(0, 1, 9)), atol=1e-6)
    assert torch.all(basis.bucket_widths > 0)  # continuous data: no empty buckets
    big = np.random.default_rng(3).normal(size=(1001, 3))
    np.testing.assert_allclose(quantile_edges(torch.as_tensor(big), 10).numpy(), np.quantile(big, np.linspace(0, 1, 11), axis=0), atol=1e-12)


def test_quantise_dequantise_round_trip():
    z = torch.as_tensor(np.random.default_rng(2).normal(size=(500, 24)), dtype=torch.float32)
    dot = z[:, 0] * 0.1
    basis = fit_pca(z, kept_dims=8, num_buckets=32, similarity=dot, similarity_buckets=4)
    coords = basis.project(z)
    tokens = basis.quantize(z)
    assert tokens.dtype == torch.long and tokens.shape == (500, 8)
    assert tokens.min() == 0 and tokens.max() == 31  # the quantiles use every bucket
    # the same tokens as numpy's searchsorted on the inner edges, dimension by dimension
    edges = basis.bucket_edges.numpy()
    expected = np.stack([np.searchsorted(edges[j, 1:-1], coords[:, j].numpy(), side="right") for j in range(8)], 1)
    np.testing.assert_array_equal(tokens.numpy(), expected)
    np.testing.assert_array_equal(basis.quantize_dot(dot).numpy(), np.searchsorted(basis.dot_edges.numpy()[1:-1], dot.numpy(), side="right"))
    # each coordinate comes back as its bucket's centre: within half a bucket width
    back = basis.dequantize_coords(tokens)
    lo = basis.bucket_edges.gather(1, tokens.T).T
    hi = basis.bucket_edges.gather(1, tokens.T + 1).T
    assert torch.all((coords >= lo - 1e-5) & (coords <= hi + 1e-5))  # each coordinate lies in its bucket
    width = hi - lo
    assert torch.all((back - coords).abs() <= width / 2 + 1e-5)
    # about equal counts per bucket (quantiles of the fit data)
    counts = torch.bincount(tokens[:, 0], minlength=32)
    assert counts.min() >= 500 // 32 - 2 and counts.max() <= 500 // 32 + 3
    # full embedding round trip: unit norm, and with every dim kept and fine buckets, close to the input
    torch.testing.assert_close(basis.dequantize(tokens).norm(dim=-1), torch.ones(500))
    fine = fit_pca(z, kept_dims=24, num_buckets=512)
    assert torch.nn.functional.cosine_similarity(fine.dequantize(fine.quantize(z), normalize=False), z).min() > 0.99
    # out-of-range values land in the end buckets
    far = basis.quantize(basis.mean + 1e3 * basis.components[:1])
    assert far[0, 0] == 31 and basis.quantize(basis.mean - 1e3 * basis.components[:1])[0, 0] == 0


def test_basis_checks_shapes_and_values_and_says_what_is_missing():
    basis = fit_pca(torch.randn(100, 8), kept_dims=4, num_buckets=8)
    with pytest.raises(ValueError, match="bucket_edges"):
        PcaBasis(basis.mean, basis.components, basis.explained_variance, basis.bucket_edges.T)
    with pytest.raises(ValueError, match="mean"):
        PcaBasis(basis.mean[:3], basis.components, basis.explained_variance)
    with pytest.raises(ValueError, match="non-decreasing"):
        PcaBasis(basis.mean, basis.components, basis.explained_variance, basis.bucket_edges.flip(1)).validate()
    with pytest.raises(RuntimeError, match="dot-product bucket edges.*pca stage"):
        basis.quantize_dot(torch.zeros(3))
    with pytest.raises(RuntimeError, match="no bucket edges"):
        PcaBasis(basis.mean, basis.components, basis.explained_variance).quantize(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="kept_dims=9"):
        fit_pca(torch.randn(100, 8), kept_dims=9, num_buckets=8)
    with pytest.raises(ValueError, match="similarity must be"):
        fit_pca(torch.randn(100, 8), kept_dims=2, num_buckets=8, similarity=torch.zeros(99))


def test_kept_dims_larger_than_components_is_a_clear_error():
    with pytest.raises(ValueError, match="pca.kept_dims=40"):
        fit_basis(np.random.default_rng(0).normal(size=(100, 16)), None, PcaConfig(kept_dims=40))


def _legacy_artifact(directory, basis: PcaBasis, meta: dict) -> None:
    """What the pca stage wrote before models.pca: edges [num_buckets + 1, kept_dims], the ratio,
    `similarity_edges`, and no `pca_format` in pca.json."""
    directory.mkdir()
    save_file({"mean": basis.mean, "components": basis.components, "explained_variance": basis.explained_variance,
               "explained_variance_ratio": basis.explained_variance_ratio, "bucket_edges": basis.bucket_edges.T.contiguous(),
               "similarity_edges": basis.dot_edges}, str(directory / "pca.safetensors"))
    (directory / "pca.json").write_text(json.dumps({"schema_version": 1, **meta}))


def test_save_load_round_trip_and_old_artifacts_still_load(tmp_path):
    z = torch.as_tensor(_low_rank(n=300, d=16, noise=1e-2), dtype=torch.float32)
    basis = fit_pca(z, kept_dims=5, num_buckets=8, similarity=z[:, 0], similarity_buckets=4)
    save_pca(basis, tmp_path / "new", {"n_fit": 300})
    for loaded in (load_pca(tmp_path / "new"), (_legacy_artifact(tmp_path / "old", basis, {"n_fit": 300}), load_pca(tmp_path / "old"))[1]):
        for name in ("mean", "components", "explained_variance", "bucket_edges", "dot_edges"):
            assert torch.equal(getattr(loaded, name), getattr(basis, name)), name
        assert loaded.total_variance == pytest.approx(basis.total_variance, rel=1e-5)
        assert torch.equal(loaded.quantize(z), basis.quantize(z))
    assert read_pca_meta(tmp_path / "new")["n_fit"] == 300 and read_pca_meta(tmp_path / "new")["pca_format"] == 2
    # the first stage wrote zero similarity edges when fitted without z_i.z_t: that is "none"
    _legacy_artifact(tmp_path / "old_no_dot", PcaBasis(**{**basis.__dict__, "dot_edges": torch.zeros(5)}), {})
    assert load_pca(tmp_path / "old_no_dot").dot_edges is None
    meta = json.loads((tmp_path / "new" / "pca.json").read_text())
    (tmp_path / "new" / "pca.json").write_text(json.dumps({**meta, "pca_format": 99}))
    with pytest.raises(ValueError, match="pca_format 99 is newer"):
        load_pca(tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="run the pca stage"):
        load_pca(tmp_path / "nothing")


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="num_buckets"):
        PcaConfig(num_buckets=1)
    with pytest.raises(ValidationError, match="kept_dim"):
        PcaConfig(kept_dim=3)
    with pytest.raises(ValidationError, match="similarity_buckets"):
        PcaConfig(similarity_buckets=1)


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
    use_sqlite_store(tmp_path / "m.db", "pca")  # not an experiment id another test left active in this process
    with mlflow.start_run() as active:
        counts = run(PcaConfig(kept_dims=8, num_buckets=16), ctx)
    assert counts["rows_fit"] == 250 and counts["rows_available"] == 250  # heldout excluded
    assert counts["kept_dims"] == 8 and counts["dims_for_99.9pct_variance"] <= 32
    basis = load_pca(out)
    assert basis.kept_dims == 8 and basis.num_buckets == 16 and basis.components.shape == (32, 32)
    assert basis.similarity_buckets == 64  # from the table's similarity column
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
