"""Shared test fixtures: a quiet offline environment and one local Ray instance per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline, no telemetry, Ray bound to loopback without auth (see README "Environment").
for key, value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # as the runner sets for its embedded cluster: no spot-node watcher actor per Ray Train fit
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}.items():
    os.environ.setdefault(key, value)


def _mlflow_runs(folder: Path) -> set[Path]:
    return set(folder.glob("*/*")) if folder.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def nothing_logged_into_the_repository():
    """MLflow puts the artifacts of an experiment it creates itself in ./mlruns of the working
    directory, here the repository: a test must create its experiment with them in its own tmp
    folder (tests/mlflow_helpers.py). Errors the session's last test if one did not."""
    repo_mlruns = Path(__file__).parents[1] / "mlruns"
    before = _mlflow_runs(repo_mlruns)
    yield
    added = sorted(_mlflow_runs(repo_mlruns) - before)
    assert not added, f"tests logged MLflow artifacts into the repository: {[str(p) for p in added[:3]]}"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray instance shared by the tests that need one (start-up costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one intra-op thread, and far faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """Files with slow (end-to-end) tests first: with `-n 2 --dist loadfile` (make test) each file
    runs on one worker, and a long file started last would finish the suite alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within a file kept
