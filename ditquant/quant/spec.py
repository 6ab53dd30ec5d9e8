"""What a quantizer does: bit width, symmetry, granularity and whether it is calibrated or dynamic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ditquant.errors import UserError

Granularity = Literal["tensor", "channel", "group", "column_group", "token", "sample"]
GRANULARITIES = ("tensor", "channel", "group", "column_group", "token", "sample")
GROUPED = ("group", "column_group")  # the granularities that take a group_size
INITS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class QuantSpec:
    """A uniform affine quantizer.

    Args:
        bits: bit width, 2–8; 16 means "not quantized".
        symmetric: signed grid around zero (no zero point) instead of an asymmetric min–max grid.
        granularity: one scale per ``tensor``, per output ``channel`` (weights), per ``group`` of ``group_size``
            contiguous input channels, per ``token`` or per ``sample`` (activations, dynamic only: one range per row
            of the batch, so a sample's result does not depend on what else is in the batch).
            ``column_group`` (weights only; the DiTAS official code's layout, offered as an option): ``group_size``
            elements of one input column, from output rows r, r + O/g, r + 2·O/g, … (O = out_features), i.e. the
            weight reshaped row-major to (g, O·I/g) and reduced over its first dim.
        group_size: channels per group (``group``) or elements per column group (``column_group``).
        dynamic: scales computed from each input at run time (no calibrated parameters).
        init: how a static range is initialised: ``minmax``; ``percentile`` (the (1−p, p) quantiles); ``mse``
            (BRECQ / Q-Diffusion's clipping search minimising the L_p error). See ``ditquant.quant.observers``.
        percentile: p for ``init: percentile``.
        lp: the norm of the ``mse`` search (2.4 in BRECQ and Q-Diffusion).
        timestep_groups: static activation ranges per group of timesteps (per-tensor only): the calibration set's
            timesteps, sorted, are split into this many contiguous groups of equal count, each group gets its own
            range, and every sample is quantized with the range of its timestep's group
            (``ditquant.quant.timesteps``). 1: one range for the whole trajectory.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "tensor"
    group_size: Optional[int] = None
    dynamic: bool = False
    init: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 0.9999
    lp: float = 2.4
    timestep_groups: int = 1

    def __post_init__(self):
        if not (2 <= self.bits <= 8 or self.bits == 16):
            raise UserError(f"bits: {self.bits} is not one of 2–8 or 16 (16 = not quantized)")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if (self.granularity in GROUPED) != (self.group_size is not None):
            raise UserError(f"group_size is required with granularity {' or '.join(map(repr, GROUPED))} and only "
                            "allowed with them "
                            f"(granularity={self.granularity!r}, group_size={self.group_size})")
        if self.group_size is not None and self.group_size < 1:
            raise UserError(f"group_size must be positive, got {self.group_size}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise UserError(f"percentile must be in (0.5, 1], got {self.percentile}")
        if self.lp <= 0:
            raise UserError(f"lp must be positive, got {self.lp}")
        if self.granularity == "token" and not self.dynamic:
            raise UserError("granularity 'token' needs dynamic: true (token counts are not fixed at calibration)")
        if not isinstance(self.timestep_groups, int) or self.timestep_groups < 1:
            raise UserError(f"timestep_groups must be a positive integer, got {self.timestep_groups!r}")
        if self.timestep_groups > 1 and (self.dynamic or self.granularity != "tensor"):
            raise UserError(f"timestep_groups: {self.timestep_groups} needs a static per-tensor range (dynamic: "
                            f"false, granularity: tensor), got {'dynamic' if self.dynamic else 'static'} "
                            f"{self.granularity!r}; dynamic ranges already follow every input")
        if self.granularity == "sample" and not self.dynamic:
            raise UserError("granularity 'sample' needs dynamic: true (a static range is shared by every sample; "
                            "use 'tensor')")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def label(self, role: str) -> str:
        """What the spec does, for tables and logs: ``w4 asym per-channel``, ``a8 asym per-tensor static minmax``
        (``role``: ``w`` for weights, ``a`` for activations)."""
        if not self.enabled:
            return f"{role}16 (fp)"
        gran = (f"per-{self.granularity.replace('_', '-')}{self.group_size}" if self.granularity in GROUPED
                else f"per-{self.granularity}")
        kind = "" if role == "w" else (" dynamic" if self.dynamic else f" static {self.init}")
        if self.timestep_groups > 1:
            kind += f" ×{self.timestep_groups} timestep groups"
        return f"{role}{self.bits} {'sym' if self.symmetric else 'asym'} {gran}{kind}"
