"""Test helper: a small embedded table (real shards, real embed stage) and a stage runner with a
real MLflow sqlite store, shared by the training-stage tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.mlflow_helpers import use_sqlite_store
from tests.shards import write_shards


@dataclass
class Inputs:
    root: Path
    ingest: Path
    embed: Path


@pytest.fixture(scope="session")
def train_inputs(ray_local, tmp_path_factory) -> Inputs:
    from tasks.context import StageContext
    from tasks.embed import EmbedConfig, run

    root = tmp_path_factory.mktemp("train_inputs")
    ingest, embed = root / "ingest", root / "embed"
    embed.mkdir()
    write_shards(ingest, range(4), 48, size=32)
    run(EmbedConfig(clip_arch="tiny", clip_pretrained=None, batch_size=64),
        StageContext("embed", root, embed, {"ingest": ingest}, seed=0, show_progress=False))
    return Inputs(root, ingest, embed)


def run_stage(module, cfg, inputs: Inputs, storage: Path, name: str, extra_inputs: dict | None = None):
    """Run a training stage's `run` inside a fresh MLflow run (as the runner does); returns
    (counts, run_id, tracking_uri)."""
    from tasks.context import StageContext

    out = storage / name
    out.mkdir(parents=True, exist_ok=True)
    uri = use_sqlite_store(storage / "mlflow.db")
    ctx = StageContext(name, storage, out, {"embed": inputs.embed, "ingest": inputs.ingest, **(extra_inputs or {})},
                       seed=0, show_progress=False)
    with mlflow.start_run(run_name=name) as run:
        counts = module.run(cfg, ctx)
    return counts, run.info.run_id, uri


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
