"""train_prior on real Ray Train (2 workers), real MLflow, a real embedded table."""

import mlflow

from models import checkpoint
from tasks import train_prior
from tests.train_helpers import metric_history, run_stage, train_inputs  # noqa: F401  (fixture)


def test_prior_trains_with_two_workers_logs_and_exports(train_inputs, tmp_path):
    cfg = train_prior.TrainPriorConfig(steps=40, batch_size=16, workers=2, lr=1e-3, warmup_steps=5,
                                       checkpoint_every=20, log_every=5, val_fraction=0.2, sample_steps=4)
    counts, run_id, uri = run_stage(train_prior, cfg, train_inputs, tmp_path, "train_prior")
    assert counts["steps"] == 40 and counts["skipped_steps"] == 0
    losses = metric_history(uri, run_id, "loss")
    assert [s for s, _ in losses] == list(range(5, 41, 5))
    first, last = sum(v for _, v in losses[:2]) / 2, sum(v for _, v in losses[-2:]) / 2
    assert last < 0.8 * first, losses
    for key in ("lr", "grad_norm", "samples_per_s", "val_loss", "val_cos_pred_image", "val_cos_text_image"):
        assert metric_history(uri, run_id, key), key
    artifacts = mlflow.MlflowClient(uri).list_artifacts(run_id, "samples")
    assert any(a.path.endswith(".json") for a in artifacts)
    for name in ("ema", "network", "best"):
        model = checkpoint.load(tmp_path / "train_prior" / name)
        assert type(model).__name__ == "DiffusionPrior"


def test_ar_prior_trains_on_the_pca_basis(train_inputs, tmp_path):
    from tasks import pca

    run_stage(pca, pca.PcaConfig(kept_dims=16, num_buckets=16, similarity_buckets=8), train_inputs, tmp_path, "pca")
    pca_dir = tmp_path / "pca"
    cfg = train_prior.TrainPriorConfig(kind="ar_prior", steps=20, batch_size=16, workers=1, lr=1e-3, warmup_steps=2,
                                       checkpoint_every=20, log_every=5, val_fraction=0.2)
    counts, run_id, uri = run_stage(train_prior, cfg, train_inputs, tmp_path, "train_prior", {"pca": pca_dir})
    assert counts["steps"] == 20
    losses = [v for _, v in metric_history(uri, run_id, "loss")]
    assert losses[-1] < losses[0]
    model = checkpoint.load(tmp_path / "train_prior" / "ema")
    assert type(model).__name__ == "ARPrior" and model.config.kept_dims == 16
    assert metric_history(uri, run_id, "val_cos_pred_image")
