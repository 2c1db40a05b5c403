"""MLflow in tests: a sqlite store whose experiment keeps its artifacts beside it, not in ./mlruns."""

from __future__ import annotations

from pathlib import Path

import mlflow


def use_sqlite_store(db: Path, experiment: str = "unclip") -> str:
    """Point this process at the sqlite store `db` with `experiment` active; returns the tracking URI.
    An experiment MLflow creates itself keeps its artifacts in ./mlruns of the working directory,
    which in the suite is the repository, so this one is created with them next to `db`."""
    uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(Path(db).parent / "mlruns").as_uri())
    mlflow.set_experiment(experiment)
    return uri
