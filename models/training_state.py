"""Training state: an EMA of the weights, and a resumable state saved as safetensors + JSON.

A training state directory holds

    network/             the trained weights   } each a models.checkpoint directory, so an
    ema/                 the EMA weights        } exported model is just `checkpoint.load(dir / "ema")`
    state.safetensors    every other tensor: optimizer moments, RNG states (and lr if a tensor)
    state.json           format_version, step, extra, and the non-tensor rest of the optimizer,
                         LR schedule, EMA and RNG states; written last, so it marks the directory
                         complete

The directory is first written under a temporary sibling name and renamed into place, so a
crash never leaves a half-written directory under the final name. No pickles anywhere.

Exact resume restores the torch CPU (and CUDA, when available) RNG, python `random` and numpy's
global RNG of the process that saves, plus an optional `torch.Generator` the loop draws from.
Each data-parallel rank has its own RNG: a loop that needs bitwise resume on several ranks saves
one state per rank (or reseeds per rank from the step).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import get_ema_multi_avg_fn

from models import checkpoint
from models.checkpoint import CheckpointError
from models.objective import unwrap

FORMAT_VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


class EMA:
    """Exponential moving average of a network's parameters; buffers are copied.

    After each optimizer step, `update(network)` does ema = d_t·ema + (1 - d_t)·network, with
    d_t = min(decay, (1 + t) / (10 + t)) when `warmup` (t = updates done before this one; the
    formula of TensorFlow's ExponentialMovingAverage and diffusers' EMAModel: early on the average
    spans only about the last t/9 steps, so it is not dominated by the random initialisation),
    else d_t = decay.

    `module` is a copy of the unwrapped network (same class, no grad), so
    `checkpoint.save(ema.module, dir)` exports it. A small class rather than
    `torch.optim.swa_utils.AveragedModel`: AveragedModel's first update copies instead of
    averaging, its decay cannot depend on the update count without a host read of its counter
    buffer each step, and it would nest the network one level deeper (`.module`) in the state.
    The averaging itself is swa_utils' `get_ema_multi_avg_fn`.
    """

    def __init__(self, network: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.module = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        network = unwrap(network)
        # by name, not by order: FSDP re-registers parameters, which changes their order
        ema_params, params = dict(self.module.named_parameters()), dict(network.named_parameters())
        if ema_params.keys() != params.keys():
            raise ValueError(f"EMA of a {type(self.module).__name__} cannot follow a {type(network).__name__}")
        get_ema_multi_avg_fn(self.current_decay())(list(ema_params.values()), [params[k].detach() for k in ema_params], None)
        buffers = dict(network.named_buffers())
        for name, b_ema in self.module.named_buffers():
            b_ema.copy_(buffers[name])
        self.num_updates += 1


class WarmupCosine:
    """LR factor (step + 1) / warmup_steps for the first warmup_steps steps (linear up to the peak,
    never 0), then a cosine from 1 down to min_lr_ratio at total_steps, constant after.

    A callable object rather than a closure: LambdaLR saves and restores its attributes, so a
    total_steps refit during training (a wall-time budget, tasks.training) survives a resume."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR with a `WarmupCosine` factor; `refit_total_steps` changes where its cosine ends."""
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def refit_total_steps(schedule: LambdaLR, total_steps: int) -> None:
    """End a `warmup_cosine` schedule's cosine at `total_steps`, with the optimizer's LR following
    now (LambdaLR would apply it only at its next step: a plan that ends at this step would keep
    the old LR)."""
    schedule.lr_lambdas[0].total_steps = total_steps
    for group, base_lr in zip(schedule.optimizer.param_groups, schedule.base_lrs):
        group["lr"] = base_lr * schedule.lr_lambdas[0](schedule.last_epoch)


def save_training_state(directory: str | Path, *, network: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                        lr_scheduler: Any, step: int, extra: dict | None = None,
                        generator: torch.Generator | None = None) -> Path:
    """Write the state to `directory` (replacing a previous state there). `extra` must be JSON-able."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "extra": extra or {},
        "versions": {"torch": torch.__version__},
        "ema": {"decay": ema.decay, "warmup": ema.warmup, "num_updates": ema.num_updates},
        "optimizer": _encode(optimizer.state_dict(), tensors, "optimizer"),
        "lr_scheduler": _encode(lr_scheduler.state_dict(), tensors, "lr_scheduler"),
        "rng": _encode(_rng_state(generator), tensors, "rng"),
    }
    try:
        state_text = json.dumps(state, indent=1)
    except TypeError as e:
        raise CheckpointError(f"training state for {directory} is not JSON-able (check `extra`): {e}") from e
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        checkpoint.save(unwrap(network), tmp / "network")
        checkpoint.save(ema.module, tmp / "ema")
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(state_text)  # last: marks the directory complete
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, old)  # onto an empty directory: allowed
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_training_state(directory: str | Path, *, network: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                        lr_scheduler: Any, generator: torch.Generator | None = None) -> tuple[int, dict]:
    """Restore everything in place (network, EMA, optimizer, schedule, RNGs); return (step, extra)."""
    directory = Path(directory)
    path = directory / STATE_JSON
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"is incomplete ({STATE_JSON} is missing)"
        raise CheckpointError(f"no training state at {directory}: the directory {what}")
    try:
        state = json.loads(path.read_text())
        version = int(state["format_version"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid training state: {e}") from e
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this code ({FORMAT_VERSION}); upgrade unclip-pipeline")
    # read and check everything before changing anything
    network_weights = _read_weights(directory / "network", unwrap(network))
    ema_weights = _read_weights(directory / "ema", ema.module)
    tensors = _read_tensors(directory / STATE_TENSORS)
    try:
        unwrap(network).load_state_dict(network_weights)
        ema.module.load_state_dict(ema_weights)
        ema.num_updates = int(state["ema"]["num_updates"])
        optimizer.load_state_dict(_decode(state["optimizer"], tensors))
        lr_scheduler.load_state_dict(_decode(state["lr_scheduler"], tensors))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: the saved state does not fit this network / optimizer / LR schedule: {e}") from e
    _set_rng_state(_decode(state["rng"], tensors), generator, directory)
    return int(state["step"]), state["extra"]


def save_state_dict(state: dict, directory: str | Path, name: str) -> None:
    """Any state dict (e.g. one rank's optimizer shard) as `<name>.safetensors` + `<name>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, name)
    save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(encoded))


def load_state_dict(directory: str | Path, name: str) -> dict:
    """Inverse of save_state_dict; CheckpointError if the files are missing or unreadable."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        encoded = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return _decode(encoded, _read_tensors(Path(directory) / f"{name}.safetensors"))


def _read_weights(directory: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights saved in `directory` after checking they were saved from the same config."""
    name, config = checkpoint.read_config(directory)
    ours = json.loads(json.dumps(checkpoint._config_dict(module)))
    if name != getattr(module, "checkpoint_name", None):
        raise CheckpointError(f"{directory} holds a {name}, not a {type(module).__name__}")
    differ = [f"{k}: saved {config.get(k)!r}, here {ours.get(k)!r}" for k in sorted(set(config) | set(ours)) if config.get(k) != ours.get(k)]
    if differ:
        raise CheckpointError(f"{directory} was saved with another {name} config; " + "; ".join(differ))
    return _read_tensors(directory / checkpoint.WEIGHTS_NAME)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


# ----- state dicts as JSON + tensors -----
# Tensors become {"__tensor__": key} (their data in state.safetensors), tuples {"__tuple__": [...]},
# dicts with non-str keys (the optimizer's per-parameter state) {"__items__": [[key, value], ...]}.

def _encode(obj, tensors: dict[str, torch.Tensor], key: str):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()  # copy: no shared storage
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot save {key}: a {type(obj).__name__} is neither a tensor nor a JSON value")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise CheckpointError(f"{STATE_TENSORS} lacks tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _rng_state(generator: torch.Generator | None) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "generator": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(rng: dict, generator: torch.Generator | None, directory: Path) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"][: torch.cuda.device_count()])
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if generator is not None:
        if rng["generator"] is None:
            raise CheckpointError(f"{directory} was saved without a generator state; pass generator=None or save one")
        generator.set_state(rng["generator"])
