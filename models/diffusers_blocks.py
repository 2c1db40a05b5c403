"""Checks for the diffusers blocks that our fast paths run directly (models.decoder's
`_ResnetBlock`, models.prior's `_block`/`_last_block`/`_predict`).

Those paths compute what a diffusers block computes from its submodules and settings, so a
diffusers release that changes such a block (a new setting, a renamed or extra submodule) would
make them compute something else without any error. They call `expect_block` on every block they
take over, which raises `UnexpectedDiffusersBlock` naming the block, what differs and the installed
diffusers version, instead of a silent partial replacement.
"""

from __future__ import annotations

import inspect
from operator import attrgetter
from typing import Any, Callable

import diffusers
from torch import nn

# The diffusers release the fast paths were written for and tested against (their tests compare
# them with diffusers' own forward, outputs and gradients).
WRITTEN_FOR = "0.42.1"


class UnexpectedDiffusersBlock(RuntimeError):
    pass


def _show(value: Any) -> str:
    text = type(value).__name__ if isinstance(value, nn.Module) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def expect_block(block: nn.Module, where: str, fast_path: str, checks: dict[str, Callable[[Any], bool]],
                 children: set[str] | None = None) -> None:
    """Raise UnexpectedDiffusersBlock unless every `checks[attr](block.attr)` holds (attr may be
    dotted) and, given `children`, the block has no submodule outside that set."""
    problems = []
    for attr, ok in checks.items():
        try:
            value = attrgetter(attr)(block)
        except AttributeError:
            problems.append(f"it has no {attr!r}")
            continue
        try:
            good = bool(ok(value))
        except Exception:  # a check that cannot even be evaluated is a mismatch too
            good = False
        if not good:
            problems.append(f"{attr} = {_show(value)}")
    if children is not None:
        extra = sorted({name for name, _ in block.named_children()} - children)
        if extra:
            problems.append(f"submodules {extra} that the fast path would skip")
    if problems:
        raise UnexpectedDiffusersBlock(
            f"{fast_path} runs diffusers' {type(block).__name__} ({where}) through its submodules as written for "
            f"diffusers {WRITTEN_FOR}; in the installed diffusers ({diffusers.__version__}) the block differs: "
            f"{'; '.join(problems)}. Install diffusers=={WRITTEN_FOR}, or update {fast_path} (its tests compare it "
            "with diffusers' own forward)."
        )


def parameter_names(function: Callable) -> list[str]:
    return list(inspect.signature(function).parameters)


# Predicates shared by the checks
def is_conv(kernel: int):
    return lambda m: type(m) is nn.Conv2d and m.kernel_size == (kernel, kernel) and m.stride == (1, 1) \
        and m.padding == ((kernel - 1) // 2,) * 2 and m.dilation == (1, 1) and m.groups == 1


def is_type(*types: type):
    return lambda m: type(m) in types


def is_none_or(predicate: Callable[[Any], bool]):
    return lambda m: m is None or predicate(m)


def equals(expected: Any):
    return lambda value: value == expected
