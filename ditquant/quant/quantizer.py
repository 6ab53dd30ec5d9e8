"""The calibratable fake quantizer: static ranges (weights: from the tensor; activations: observed over the
calibration set) or dynamic ones (computed from every input).

Scales are laid out so that they broadcast against the tensor after ``grouped`` reshaping:
weights (out, in) -> per channel (out, 1); per group (out, in/g, 1); per column group (out·in/g, 1);
activations (..., in) -> per token (..., 1), per group (..., in/g, 1), per sample (batch, 1); per tensor: a scalar.
"""

from __future__ import annotations

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.affine import fake_quantize, qparams_from_range
from ditquant.quant.observers import search_range
from ditquant.quant.spec import QuantSpec
from ditquant.quant.timesteps import current_rows, group_edges, group_of

SAMPLES_PER_BATCH = 1 << 16  # values kept per row and observed batch (percentile / mse activation init)
MAX_SAMPLES = 1 << 20  # values kept per row in all


def grouped(x: torch.Tensor, spec: QuantSpec, is_weight: bool) -> torch.Tensor:
    """View x so that the last dim holds exactly the elements sharing one scale (tensor: all of them)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "channel":
        if not is_weight:
            raise UserError("granularity 'channel' is for weights; use 'tensor', 'token' or 'group' for activations")
        return x.reshape(x.shape[0], -1)
    if spec.granularity == "token":
        return x
    if spec.granularity == "column_group":
        if not is_weight:
            raise UserError("granularity 'column_group' is for weights; use 'group' for activations")
        w = x.reshape(x.shape[0], -1)
        if w.shape[0] % spec.group_size:
            raise UserError(f"column group size {spec.group_size} does not divide the {w.shape[0]} output channels")
        # Row-major (g, O·I/g): column j holds W[r + k·O/g, c] for k < g; transposed so the last dim is the group.
        return w.reshape(spec.group_size, -1).t()
    if spec.granularity == "sample":
        if is_weight:
            raise UserError("granularity 'sample' is for activations; use 'channel' or 'group' for weights")
        return x.reshape(x.shape[0], -1)
    n = x.shape[-1] if not is_weight else x.reshape(x.shape[0], -1).shape[1]
    if n % spec.group_size:
        raise UserError(f"group size {spec.group_size} does not divide the {n} input channels")
    base = x.reshape(x.shape[0], -1) if is_weight else x
    return base.reshape(*base.shape[:-1], n // spec.group_size, spec.group_size)


def ungrouped(g: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """The inverse of ``grouped``: g back in the tensor's own shape."""
    return (g.t() if spec.granularity == "column_group" else g).reshape(shape)


def quantize_tensor(x: torch.Tensor, spec: QuantSpec, is_weight: bool, scale=None, zero_point=None) -> torch.Tensor:
    """Fake-quantize x; with no scale given, the range is x's own min–max (round-to-nearest / dynamic)."""
    g = grouped(x, spec, is_weight)
    if scale is None:
        scale, zero_point = qparams_from_range(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), spec)
    return ungrouped(fake_quantize(g, scale, zero_point, spec), x.shape, spec)


class UniformQuantizer(nn.Module):
    """A fake quantizer for one weight or one activation stream.

    Static quantizers observe min–max ranges while ``observing`` is on (activations, over calibration batches)
    or from ``init_from(weight)`` (weights); the scale is an ``nn.Parameter`` so reconstruction can learn it.
    Dynamic quantizers hold no parameters and compute ranges from every input. With ``spec.timestep_groups`` = K > 1
    a static activation quantizer holds K ranges (scale (K, 1)) and the ``timestep_edges`` between its groups;
    observation keeps one range per distinct calibration timestep and groups them at the end.
    """

    def __init__(self, spec: QuantSpec, is_weight: bool, scale_shape: tuple[int, ...] = (1, 1)):
        super().__init__()
        self.spec = spec
        self.is_weight = is_weight
        self.enabled = spec.enabled
        self.observing = False
        self.bypass = False  # pass values through unchanged (FP targets / references, weight-only passes)
        static = spec.enabled and not spec.dynamic
        self.scale = nn.Parameter(torch.ones(scale_shape), requires_grad=False) if static else None
        self.register_buffer("zero_point", torch.zeros(scale_shape) if static else None)
        self.register_buffer("range_min", torch.full(scale_shape, float("inf")) if static else None)
        self.register_buffer("range_max", torch.full(scale_shape, float("-inf")) if static else None)
        groups = spec.timestep_groups if static and not is_weight else 1
        self.register_buffer("timestep_edges", torch.full((groups - 1,), float("inf")) if groups > 1 else None)
        self._per_timestep: dict[float, list[torch.Tensor]] = {}  # timestep -> observed [lo, hi, sample...] rows
        # Observed values for percentile / mse activation ranges: transient, bounded, seeded.
        self._samples: list[torch.Tensor] = []
        self._sampler = torch.Generator().manual_seed(0)

    @property
    def calibrated(self) -> bool:
        return self.scale is None or bool(torch.isfinite(self.range_min).all())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate the range of an activation batch; non-minmax inits also keep a bounded sample of values."""
        if self.timestep_edges is not None:
            return self._observe_per_timestep(x)
        g = grouped(x, self.spec, self.is_weight)
        if not self.is_weight and self.spec.granularity == "group":  # one range per group, over all tokens
            g = g.reshape(-1, *g.shape[-2:]).transpose(0, 1).reshape(g.shape[-2], -1)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        self.range_min.copy_(torch.minimum(self.range_min, lo))
        self.range_max.copy_(torch.maximum(self.range_max, hi))
        self._set_qparams(self.range_min, self.range_max)
        if self.spec.init != "minmax":
            self._samples.append(self._kept(g, lo, hi))

    def _observe_per_timestep(self, x: torch.Tensor) -> None:
        rows = x.reshape(x.shape[0], -1)
        t = current_rows(rows.shape[0])
        for value in torch.unique(t).tolist():
            g = rows[t == value].reshape(1, -1)
            kept = self._kept(g, g.amin(-1, keepdim=True), g.amax(-1, keepdim=True))
            self._per_timestep.setdefault(float(value), []).append(kept)

    def _kept(self, g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """What observation keeps of a batch: its range and, unless the init is minmax, a bounded random sample."""
        if self.spec.init == "minmax":
            return torch.cat([lo, hi], dim=-1)
        keep = torch.randperm(g.shape[-1], generator=self._sampler)[:SAMPLES_PER_BATCH].to(g.device)
        return torch.cat([lo, hi, g.index_select(-1, keep)], dim=-1)

    def _searched_range(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The init's range (percentile / mse) of the kept values, at most MAX_SAMPLES of them."""
        if samples.shape[-1] > MAX_SAMPLES:
            samples = samples[..., torch.randperm(samples.shape[-1], generator=self._sampler)[:MAX_SAMPLES]]
        return search_range(samples.float(), self.spec)

    @torch.no_grad()
    def _finish_per_timestep(self) -> None:
        """Group the observed timesteps (``ditquant.quant.timesteps.group_edges``); one range per group."""
        members, edges = group_edges(torch.tensor(list(self._per_timestep)), self.timestep_edges.numel() + 1)
        for k, group in enumerate(members):
            samples = torch.cat([s for value in group.tolist() for s in self._per_timestep[value]], dim=-1)
            if self.spec.init == "minmax":
                lo, hi = samples.amin(-1, keepdim=True), samples.amax(-1, keepdim=True)
            else:
                lo, hi = self._searched_range(samples)
            self.range_min[k], self.range_max[k] = lo.reshape(-1), hi.reshape(-1)
        self._per_timestep.clear()
        self.timestep_edges.copy_(edges)
        self._set_qparams(self.range_min, self.range_max)

    @torch.no_grad()
    def finish_observing(self) -> None:
        """Turn the observed sample into the final range (percentile / mse); minmax is already final."""
        if self._per_timestep:
            return self._finish_per_timestep()
        if not self._samples:
            return
        samples = torch.cat(self._samples, dim=-1)
        self._samples.clear()
        lo, hi = self._searched_range(samples)
        self.range_min.copy_(lo.reshape(self.range_min.shape))
        self.range_max.copy_(hi.reshape(self.range_max.shape))
        self._set_qparams(self.range_min, self.range_max)

    @property
    def learnable(self) -> bool:
        """A static activation quantizer, whose step size reconstruction may learn."""
        return self.scale is not None and not self.is_weight

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        """Set the range from one tensor (weights) by the spec's init method."""
        lo, hi = search_range(grouped(w, self.spec, self.is_weight), self.spec)
        self.range_min.copy_(lo)
        self.range_max.copy_(hi)
        self._set_qparams(lo, hi)

    def _set_qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = qparams_from_range(lo, hi, self.spec)
        self.scale.data.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.bypass:
            return x
        if self.spec.dynamic:
            return quantize_tensor(x, self.spec, self.is_weight)
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            raise RuntimeError("static quantizer used before calibration: run calibration (ditquant fit) first")
        if self.timestep_edges is not None:  # each row with its timestep group's range
            group = group_of(current_rows(x.shape[0]).to(x.device), self.timestep_edges)
            rows = x.reshape(x.shape[0], -1)
            return fake_quantize(rows, self.scale[group], self.zero_point[group], self.spec).reshape(x.shape)
        return quantize_tensor(x, self.spec, self.is_weight, self.scale, self.zero_point)

    def extra_repr(self) -> str:
        return self.spec.label("w" if self.is_weight else "a")
