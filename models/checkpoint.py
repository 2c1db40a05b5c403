"""Checkpoints: safetensors weights + a JSON config that rebuilds the module. Never pickle.

Layout of a checkpoint directory:

    config.json        {"class": "prior.DiffusionPrior", "format_version": 1, "config": {...}}
    model.safetensors  the state dict

A model class takes part by being registered with `@register("name", format_version=N)` and
having a `config` attribute (a dataclass) and a constructor `cls(config)`. When a class changes
its config, bump `format_version` and add a migration `@migration("name", from_version=N-1)`
that turns an old config dict into the new one: old checkpoints keep loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_CLASSES: dict[str, tuple[type, int]] = {}
_MIGRATIONS: dict[tuple[str, int], Callable[[dict], dict]] = {}


class CheckpointError(RuntimeError):
    pass


def register(name: str, format_version: int = 1):
    def wrap(cls):
        _CLASSES[name] = (cls, format_version)
        cls.checkpoint_name = name
        return cls

    return wrap


def migration(name: str, from_version: int):
    """Register fn(config_dict) -> config_dict turning `from_version` into `from_version + 1`."""

    def wrap(fn):
        _MIGRATIONS[(name, from_version)] = fn
        return fn

    return wrap


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = model.config
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write the checkpoint; files appear atomically (written to temp names, then renamed)."""
    name = getattr(model, "checkpoint_name", None)
    if name not in _CLASSES:
        raise CheckpointError(f"{type(model).__name__} is not registered with models.checkpoint.register")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = {"class": name, "format_version": _CLASSES[name][1], "config": _config_dict(model)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(header, indent=2)))
    return directory


def read_config(directory: str | Path) -> tuple[str, dict]:
    """(class name, config dict migrated to the current format version)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {directory}: {CONFIG_NAME} is missing")
    try:
        header = json.loads(path.read_text())
        name, version, config = header["class"], int(header["format_version"]), dict(header["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid checkpoint config: {e}") from e
    if name not in _CLASSES:
        import models.sizes  # noqa: F401  (imports every model module, which registers its classes)
    if name not in _CLASSES:
        raise CheckpointError(f"{path}: unknown model class {name!r}; known: {sorted(_CLASSES)}")
    current = _CLASSES[name][1]
    if version > current:
        raise CheckpointError(f"{path}: format version {version} is newer than this code ({current}); upgrade unclip-pipeline")
    while version < current:
        if (name, version) not in _MIGRATIONS:
            raise CheckpointError(f"{path}: no migration for {name} from format version {version}")
        config = _MIGRATIONS[(name, version)](config)
        version += 1
    return name, config


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    name, config_dict = read_config(directory)
    cls = _CLASSES[name][0]
    config_cls = getattr(cls, "config_class", None)
    config = config_cls(**config_dict) if config_cls else config_dict
    model = cls(config)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"no weights at {weights}")
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    return model


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
