"""The timesteps of the forward in progress, for activation quantizers whose range depends on the timestep
(``QuantSpec.timestep_groups``).

A quantized model records its timestep argument when it is called (a forward pre-hook that its family adapter
installs, ``ditquant.models.adapters.quantize_model``), so every layer inside that forward sees which timestep each
row of its batch belongs to; code that calls a part of the model directly (block reconstruction replaying a unit)
sets them with ``timesteps(t)``. The groups themselves are chosen from the calibration set: its distinct timesteps,
sorted, split into contiguous groups of equal count; a timestep between two groups belongs to the nearer one.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Optional

import torch

from ditquant.errors import UserError

_CURRENT: ContextVar[Optional[torch.Tensor]] = ContextVar("ditquant_timesteps", default=None)


@contextlib.contextmanager
def timesteps(t: Optional[torch.Tensor]):
    """The timesteps (one per batch row, or one for all; None: unknown) of the forward calls inside the block; the
    enclosing block's come back at its end."""
    token = _CURRENT.set(None if t is None else torch.as_tensor(t))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_rows(rows: int) -> torch.Tensor:
    """The current timestep of each of ``rows`` batch rows (a single timestep is shared by every row)."""
    t = _CURRENT.get()
    if t is None:
        raise RuntimeError("a timestep-aware quantizer was called outside a model forward that gives its timesteps "
                           "(call the quantized model, or wrap a direct call of one of its parts in "
                           "ditquant.quant.timesteps.timesteps(t))")
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.expand(rows)
    if t.numel() != rows:
        raise RuntimeError(f"a timestep-aware quantizer got {rows} rows but the forward has {t.numel()} timesteps")
    return t


def group_edges(values: torch.Tensor, groups: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Split the distinct sorted ``values`` into ``groups`` contiguous groups of equal count: (the members of each
    group, the ``groups − 1`` edges between them, midway between neighbouring groups)."""
    values = torch.unique(values.double())
    if values.numel() < groups:
        raise UserError(f"timestep_groups: {groups} groups, but the calibration set has only {values.numel()} "
                        "distinct timesteps; record more timesteps (data.num_timesteps) or use fewer groups")
    bounds = [round(k * values.numel() / groups) for k in range(groups + 1)]
    members = [values[bounds[k]:bounds[k + 1]] for k in range(groups)]
    edges = torch.stack([(members[k][-1] + members[k + 1][0]) / 2 for k in range(groups - 1)])
    return members, edges


def group_of(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The group index of every timestep in ``t``."""
    return torch.bucketize(t.to(edges.dtype), edges)
