"""Checks that a run can start, done before anything is written and before Ray starts.

Each check returns problems as one-line strings that name the option or config key, the value,
what is wrong and the fix; `preflight` raises them together as one ConfigError (CLI exit code 2).
What a stage reads (URL lists, model files) is checked by its task module's `check_inputs`.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Callable

from pipelines.config import STAGE_ORDER, ConfigError, PipelineConfig
from pipelines.object_store import MIRROR_ENV, is_remote, local_mirror, local_storage, store_problems
from tasks import embed, evaluate, ingest, training
from tasks.context import one_line

# stage -> check_inputs(stage_config, storage) -> problems; stages without files to check are absent
STAGE_CHECKS: dict[str, Callable[..., list[str]]] = {
    "ingest": ingest.check_inputs,
    "embed": embed.check_inputs,
    "evaluate": evaluate.check_inputs,
}
STORAGE_FIX = "pass a writable directory or an object-store URI (s3://bucket/path) with --storage (or set `storage:` in the config)"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Raise ConfigError listing every reason why running `stages` of `cfg` would fail at once."""
    problems = storage_problems(cfg.storage)
    storage = local_storage(cfg.storage)  # relative model paths are looked up in the local mirror of a store
    for name in stages:
        if name in STAGE_CHECKS:
            problems += STAGE_CHECKS[name](cfg.stage_config(name), storage)
        elif name.startswith("train_"):
            problems += training.check_inputs(name, cfg.stage_config(name), storage, tracking_uri(cfg, storage))
    problems += upsampler_chain_problems(cfg) + tracking_problems(cfg) + ray_problems(cfg)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "the run cannot start:\n" + "\n".join(f"  {p}" for p in problems))


def check_stage_names(cfg: PipelineConfig, only: list[str] | None, until: str | None) -> None:
    """--only / --until must name stages of this config."""
    for option, names in (("--only", only or []), ("--until", [until] if until else [])):
        for name in names:
            if name in cfg.stages:
                continue
            if name not in STAGE_ORDER:
                hint = "; repeat --only for several stages" if option == "--only" and "," in name else ""
                raise ConfigError(f"{option} {name!r}: no such stage (stages: {', '.join(STAGE_ORDER)}){hint}")
            raise ConfigError(f"{option} {name!r}: not one of this config's stages ({', '.join(cfg.stages)}); add it to `stages:` or pick another")


def tracking_uri(cfg: PipelineConfig, storage: Path) -> str:
    """The tracking URI the run will use (pipelines.runner.start_tracking decides the same way)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri or f"sqlite:///{storage}/mlflow.db"


def upsampler_chain_problems(cfg: PipelineConfig) -> list[str]:
    """The second upsampler takes the first's output: its low_res_size must be the first's image_size."""
    if "train_upsampler2" not in cfg.stages:
        return []
    try:
        first, second = cfg.train_upsampler.upsampler_config(), cfg.train_upsampler2.upsampler_config()
    except (TypeError, ValueError) as e:
        return [f"train_upsampler / train_upsampler2: {e}; fix the size or model settings"]
    if second["low_res_size"] != first["image_size"]:
        return [f"train_upsampler2.model.low_res_size is {second['low_res_size']} but train_upsampler makes "
                f"{first['image_size']}px images; set train_upsampler2.model.low_res_size={first['image_size']}"]
    return []


def storage_problems(storage: str) -> list[str]:
    if not storage.strip():
        return [f"storage is empty; {STORAGE_FIX}"]
    if is_remote(storage):
        problems = store_problems(storage)
        if problem := writable_dir_problem(local_mirror(storage)):
            problems.append(f"storage {storage}: its local mirror {problem}; set {MIRROR_ENV} to a writable directory")
        return problems
    if _URL.match(storage):  # file://
        return [f"storage {storage}: give the local path itself, not a URL; {STORAGE_FIX}"]
    problem = writable_dir_problem(Path(storage).absolute())
    return [f"storage: {problem}; {STORAGE_FIX}"] if problem else []


def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be created (if missing) and written, or None. Leaves nothing behind."""
    existing = path
    while not _exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:  # a real attempt: permission bits do not tell about read-only mounts, /proc, quotas, ...
        os.rmdir(tempfile.mkdtemp(prefix=".unclip-write-check-", dir=existing))
    except OSError as e:
        return f"cannot write in {path} ({e.strerror})" if existing == path else f"{path} cannot be created: making a directory in {existing} fails ({e.strerror})"
    return None


def tracking_problems(cfg: PipelineConfig) -> list[str]:
    """An explicit tracking URI must be one MLflow can use: known scheme, creatable sqlite file, reachable server.
    The default (sqlite under storage) needs nothing beyond a usable storage."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri, key = (env_uri, "MLFLOW_TRACKING_URI") if env_uri else (cfg.mlflow.tracking_uri, "mlflow.tracking_uri")
    if not uri:
        return []
    fix = f"correct {key} or unset it (default: sqlite under storage)"
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # the schemes MLflow (and its plugins) know

    try:
        _tracking_store_registry.get_store_builder(uri)
    except Exception:
        return [f"{key} {uri}: MLflow has no tracking store for {scheme or 'this'} URIs (e.g. http://host:5000, sqlite:////abs/path/mlflow.db); {fix}"]
    if scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?")[0]
        if db and db != ":memory:":
            problem = f"{db} is a directory" if Path(db).is_dir() else writable_dir_problem(Path(db).absolute().parent)
            if problem:
                return [f"{key} {uri}: {problem}; {fix}"]
    elif scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.exceptions.SSLError:
            pass  # it answers; TLS is MLflow's business (MLFLOW_TRACKING_INSECURE_TLS, ..._SERVER_CERT_PATH)
        except requests.RequestException as e:
            return [f"{key} {uri}: cannot reach the tracking server ({one_line(e)}); start the server, or {fix}"]
    return []


def ray_problems(cfg: PipelineConfig) -> list[str]:
    """A cluster address must answer (ray.init would retry for many minutes); "auto" fails fast by itself."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if not address or address in ("auto", "local"):
        return []
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return [f"{key} {address}: expected host:port, ray://host:port or auto; fix it, or unset {key} to run locally"]
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        return [f"{key} {address}: nothing answers at {host}:{port} ({one_line(e)}); start the cluster, or unset {key} to run locally"]
    return []


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a parent that cannot be searched: treat as missing and look further up
        return False
