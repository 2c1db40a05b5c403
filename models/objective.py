"""One training interface for every model kind (the k-diffusion / DiT pattern).

A kind's network is a plain `nn.Module`; its objective is a function

    loss, metrics = objective(network, batch, generator=None)

of the network (possibly wrapped by DDP, FSDP or `torch.compile`: the objective calls
`network(...)` for every forward pass, so the wrapper's gradient synchronisation runs, and reads
configuration through `unwrap(network)`) and a batch dict of tensors. `loss` is a scalar tensor,
`metrics` a dict of detached scalar tensors (no `.item()`: the caller decides when to sync).

Randomness (timesteps, noise, dropout masks, crops) is drawn from `generator` unless the batch
carries it under the keys the contract marks optional (e.g. `t`, `noise`): this is how a
validation loss is made deterministic and how a data-parallel test feeds the same draws to one
process with batch 2b and to two processes with batch b.

Each kind states its batch contract (`Field`s by key) so the data path can be checked once,
before a step runs, with an error that names the missing key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

Metrics = dict[str, torch.Tensor]
Objective = Callable[..., tuple[torch.Tensor, Metrics]]

_DTYPES = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "long": (torch.int64, torch.int32),
    "bool": (torch.bool,),
}


class BatchError(ValueError):
    pass


@dataclass(frozen=True)
class Field:
    """One batch entry: dtype family ("float", "long", "bool") and shape, where a str names a
    dimension that must agree across fields ("B" is the batch) and an int is a fixed size."""

    dtype: str
    shape: tuple[str | int, ...]
    optional: bool = False
    doc: str = ""


def unwrap(network: nn.Module) -> nn.Module:
    """The module under DDP / FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel) or type(network).__name__ in (
            "FullyShardedDataParallel",
        ):
            network = network.module
        else:
            return network


def bernoulli(p: float, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """n independent bools, True with probability p (a dropout mask), drawn on the generator's
    device then moved: a CPU seed gives the same mask on any device."""
    gen_device = generator.device if generator is not None else "cpu"
    return (torch.rand(n, generator=generator, device=gen_device) < p).to(device or gen_device)


def detached(**metrics: torch.Tensor) -> Metrics:
    """Metrics as detached float32 scalars (no host sync)."""
    return {k: v.detach().float() for k, v in metrics.items()}


def data_parallel(network: nn.Module) -> bool:
    """Whether `network` is (or wraps) a DDP / FSDP module, i.e. a forward of one rank's shard of a
    global batch; a bare module (e.g. the EMA copy evaluated on one rank) is not."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel) or type(network).__name__ == "FullyShardedDataParallel":
            return True
        if not hasattr(network, "_orig_mod"):
            return False
        network = network._orig_mod


def check_batch(contract: Mapping[str, Field], batch: Mapping[str, torch.Tensor], kind: str = "model") -> None:
    """Raise BatchError naming the first missing key, wrong dtype or inconsistent dimension."""
    missing = [k for k, f in contract.items() if not f.optional and k not in batch]
    if missing:
        raise BatchError(
            f"{kind} batch is missing {missing}; it has {sorted(batch)}. "
            f"Required: {[k for k, f in contract.items() if not f.optional]}"
        )
    dims: dict[str, tuple[int, str]] = {}
    for key, field in contract.items():
        if key not in batch:
            continue
        value = batch[key]
        if not isinstance(value, torch.Tensor):
            raise BatchError(f"{kind} batch[{key!r}] is a {type(value).__name__}, expected a tensor")
        if value.dtype not in _DTYPES[field.dtype]:
            raise BatchError(f"{kind} batch[{key!r}] has dtype {value.dtype}, expected {field.dtype}")
        if value.dim() != len(field.shape):
            raise BatchError(f"{kind} batch[{key!r}] has shape {tuple(value.shape)}, expected {field.shape}")
        for size, name in zip(value.shape, field.shape):
            if isinstance(name, int):
                if size != name:
                    raise BatchError(f"{kind} batch[{key!r}] has shape {tuple(value.shape)}, expected {field.shape}")
            elif name in dims and dims[name][0] != size:
                other_size, other_key = dims[name]
                raise BatchError(
                    f"{kind} batch[{key!r}] has {name}={size} but batch[{other_key!r}] has {name}={other_size}"
                )
            else:
                dims.setdefault(name, (size, key))
