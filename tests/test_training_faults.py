"""Fault tolerance of the training loop on real Ray: a killed worker, a killed driver, a NaN batch."""

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks import train_prior
from tests.test_runner import QUICK, data_half, unclip
from tests.train_helpers import Inputs, metric_history, run_stage, train_inputs  # noqa: F401  (fixture)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "ray_train").glob("checkpoint_*"))


def _kill_a_worker_after_first_checkpoint(out: Path, killed: list[int]):
    import ray

    deadline = time.time() + 300
    while time.time() < deadline and not _checkpoints(out):
        time.sleep(0.5)
    # the GCS's actor table (the state API would need the dashboard, which the test Ray has not)
    workers = [a for a in ray._private.state.actors().values()
               if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a.get("Pid")]
    if workers:
        pid = max(a["Pid"] for a in workers)  # rank order is not pid order; any worker will do
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


def test_killed_worker_recovers_and_metrics_do_not_go_back(train_inputs, tmp_path):
    cfg = train_prior.TrainPriorConfig(steps=60, batch_size=16, workers=2, checkpoint_every=10, log_every=5,
                                       max_failures=2, val_fraction=0.0)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(tmp_path / "train_prior", killed))
    killer.start()
    counts, run_id, uri = run_stage(train_prior, cfg, train_inputs, tmp_path, "train_prior")
    killer.join()
    assert killed, "no training worker was found to kill"
    assert counts["steps"] == 60
    steps = [s for s, _ in metric_history(uri, run_id, "loss")]
    assert steps[-1] == 60
    assert all(b > a - cfg.checkpoint_every for a, b in zip(steps, steps[1:])), steps


def test_nan_rows_are_skipped_and_counted(train_inputs, tmp_path):
    # a copy of the table with NaN embeddings in two rows: each epoch (12 full batches of the 192
    # rows) has one or two bad batches, so some steps are skipped and most are not
    import shutil

    from tasks.schema import list_embedding_files

    embed = tmp_path / "embed_nan"
    shutil.copytree(train_inputs.embed, embed)
    first = list_embedding_files(embed)[0]
    table = pq.read_table(first)
    emb = np.asarray(table["image_emb"].to_pylist(), dtype=np.float32)
    emb[:2] = np.nan
    import pyarrow as pa

    column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=table.schema.field("image_emb").type.value_type),
                                               emb.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index("image_emb"), "image_emb", column), first)
    cfg = train_prior.TrainPriorConfig(steps=30, batch_size=16, workers=1, checkpoint_every=30, log_every=5,
                                       val_fraction=0.0, max_bad_steps=3)
    inputs = Inputs(train_inputs.root, train_inputs.ingest, embed)
    counts, run_id, uri = run_stage(train_prior, cfg, inputs, tmp_path, "train_prior")
    assert counts["steps"] == 30
    assert 1 <= counts["skipped_steps"] <= 6
    assert np.isfinite(counts["loss"])
    assert all(np.isfinite(v) for _, v in metric_history(uri, run_id, "loss"))


@pytest.mark.slow
def test_killed_driver_resumes_from_checkpoint_in_the_same_mlflow_run(tmp_path):
    storage = tmp_path / "store"
    args = ["run", QUICK, "--storage", storage, *data_half("train_prior"), "--set", "synth.n=60",
            "--set", "train_prior.steps=400", "--set", "train_prior.checkpoint_every=100", "--set", "train_prior.batch_size=8"]
    first = unclip(*args, cwd=tmp_path, start_new_session=True)
    # Ray Train registers a checkpoint in its snapshot after the directory is written; a kill in
    # between leaves nothing to resume from (a fresh start, which is right but not this test)
    snapshot = storage / "train_prior" / "ray_train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline and not snapshot.exists():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (storage / "train_prior" / "_manifest.json").exists()
    second = unclip(*args, cwd=tmp_path)
    assert (second.stdout + second.stderr).count("resuming from the checkpoint at step") == 1
    manifest = (storage / "train_prior" / "_manifest.json").read_text()
    assert '"resumed_from_step": 0.0' not in manifest
    mlflow.set_tracking_uri(f"sqlite:///{storage}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["unclip"], filter_string="tags.`unclip.stage` = 'train_prior'")
    assert len(runs) == 1
