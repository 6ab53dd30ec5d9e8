"""Run a model forward until one submodule (a unit) is called or returns, capture what it receives or returns, and
replay it on the submodule.

A unit's input is recorded with a forward pre-hook, its output with a forward hook; either way the forward stops
right there (an exception unwinds it), so capturing unit i costs the prefix up to i and nothing after.
Tensors with a leading batch dimension become named rows for a UnitCache; everything else (None, flags) is kept
as is and passed again on replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


class _Captured(Exception):
    pass


@dataclass
class CallSignature:
    """How a module was called: positional and keyword arguments, with batch tensors replaced by row names."""

    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def bind(self, rows: dict[str, torch.Tensor]) -> tuple[list[Any], dict[str, Any]]:
        def value(v):
            return rows[v.name] if isinstance(v, _RowRef) else v
        return [value(a) for a in self.args], {k: value(v) for k, v in self.kwargs.items()}


@dataclass(frozen=True)
class _RowRef:
    name: str


def _split(args: tuple, kwargs: dict, batch: int) -> tuple[CallSignature, dict[str, torch.Tensor]]:
    rows: dict[str, torch.Tensor] = {}
    sig = CallSignature()

    def keep(name: str, v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            rows[name] = v
            return _RowRef(name)
        return v
    sig.args = [keep(f"in_{i}", a) for i, a in enumerate(args)]
    sig.kwargs = {k: keep(f"in_{k}", v) for k, v in kwargs.items()}
    return sig, rows


def _run_until_hook(model_forward: Callable[[], Any], unit: nn.Module, register) -> Any:
    """Run ``model_forward`` with a hook on ``unit`` (installed by ``register(unit, record)``) that records one value
    and stops the forward; return the recorded value."""
    seen: list = []

    def record(value):
        seen.append(value)
        raise _Captured

    handle = register(unit, record)
    try:
        model_forward()
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(unit).__name__} was not called by the model forward")
    return seen[0]


def capture_input(model_forward: Callable[[], Any], unit: nn.Module, batch: int
                  ) -> tuple[CallSignature, dict[str, torch.Tensor]]:
    """Run ``model_forward`` until ``unit`` is called; return how it was called and its batch tensors — the call
    as made, before the unit's own pre-hooks (PixArt's modulation multiplier), which ``replay`` runs again."""
    return _run_until_hook(model_forward, unit, lambda m, record: m.register_forward_pre_hook(
        lambda module, args, kwargs: record(_split(args, kwargs, batch)), with_kwargs=True, prepend=True))


def run_until_output(model_forward: Callable[[], Any], unit: nn.Module) -> torch.Tensor:
    """Run ``model_forward`` until ``unit`` returns, and no further; return its output (a tensor). The one way to
    stop a model forward at a unit (reconstruction targets, GPTQ's Hessians of a unit's layers)."""
    return _run_until_hook(model_forward, unit, lambda m, record: m.register_forward_hook(
        lambda module, args, output: record(_first(output))))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def replay(unit: nn.Module, signature: CallSignature, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    args, kwargs = signature.bind(rows)
    return _first(unit(*args, **kwargs))

