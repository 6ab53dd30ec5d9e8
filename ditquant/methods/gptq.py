"""GPTQ (Frantar et al., 2023) weight quantization, as Q-DiT uses it: per layer, quantize the weight one input
column at a time and spread each column's error over the columns not yet quantized, weighted by the inverse
Hessian H = 2·XᵀX of the layer's inputs (Optimal Brain Quantization with lazy batch updates).

- Block size 128 (lazy updates), damping 1 % of the mean diagonal of H, no act-order (Q-DiT's settings).
- Group-wise weights get each group's scale and zero point from the weight as it stands when the group's first
  column is reached (errors of earlier columns already spread into it), with the spec's range method; groups need
  not line up with the lazy blocks (Q-DiT's 192 and 288 do not divide 128). Per-channel weights take their range
  from the whole weight first. Every layer uses its own group size (Q-DiT's code uses the first layer's for all).
- ``quantize_model_gptq`` walks the reconstruction units in forward order. For each unit it accumulates H for
  every quantized Linear inside from forwards of the calibration set through the model with earlier units already
  GPTQ-quantized and activation quantizers on (the unit's own weights full precision), as Q-DiT's code does; the
  forward stops at the end of the unit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
from torch import nn

from ditquant import interrupt
from ditquant.calibration.capture import run_until_output
from ditquant.errors import UserError
from ditquant.methods.base import Method, MethodContext, register
from ditquant.models.adapters import adapter_for
from ditquant.quant.affine import integer_codes, qparams_from_range
from ditquant.quant.modules import QuantLayer, activation_quantizers, bypassing, quant_layers
from ditquant.quant.observers import search_range
from ditquant.quant.spec import QuantSpec


@dataclass
class GPTQResult:
    codes: torch.Tensor      # (out, groups, g) grid values, the layout of the layer's weight quantizer
    scale: torch.Tensor      # (out, groups, 1) for groups, (out, 1) per channel
    zero_point: torch.Tensor


def check_options(blocksize: int, damping: float) -> None:
    if blocksize < 1:
        raise UserError(f"GPTQ.blocksize must be >= 1, got {blocksize}")
    if not 0 < damping < 1:
        raise UserError(f"GPTQ.damping must be in (0, 1) (a fraction of the mean Hessian diagonal), got {damping}")


def _range_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every row of ``w`` (out, n) by the spec's range method."""
    lo, hi = search_range(w, spec)
    return qparams_from_range(lo, hi, spec)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
                  damping: float = 0.01) -> GPTQResult:
    """GPTQ of a (out, in) weight given the (in, in) Hessian of its inputs; ``spec`` per channel or per group."""
    check_options(blocksize, damping)
    if spec.granularity not in ("channel", "group"):
        raise UserError(f"GPTQ needs per-channel or group-wise weights, got granularity {spec.granularity!r}")
    w = weight.detach().reshape(weight.shape[0], -1).float().clone()
    out_features, n = w.shape
    g = spec.group_size if spec.granularity == "group" else n
    if n % g:
        raise UserError(f"group size {g} does not divide the {n} input channels")
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # channels never active: their weights cannot matter, quantize them as zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damping * h.diagonal().mean())
    # Upper Cholesky factor of H⁻¹: row i holds the update of the columns after i once column i is fixed.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty_like(w)
    scales = torch.empty(out_features, n // g)
    zeros = torch.empty(out_features, n // g)
    scale = zero = None
    for start in range(0, n, blocksize):
        end = min(start + blocksize, n)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % g == 0:  # a new group: its range from the weight as updated so far
                current = block[:, i:i + g]
                if col + g > end:  # the rest of the group lies beyond this lazy block: apply its pending updates
                    rest = w[:, end:col + g] - errors[:, :i] @ h_inv[start:col, end:col + g]
                    current = torch.cat([current, rest], dim=1)
                scale, zero = _range_params(current, spec)
                scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
            column = block[:, i:i + 1]
            q = integer_codes(column, scale, zero, spec)
            codes[:, col] = q[:, 0]
            err = (column - (q - zero) * scale) / h_block[i, i]
            block[:, i:] -= err @ h_block[i:i + 1, i:]
            errors[:, i:i + 1] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    if spec.granularity == "channel":
        return GPTQResult(codes, scales, zeros)
    return GPTQResult(codes.reshape(out_features, n // g, g), scales[..., None], zeros[..., None])


class HessianAccumulator:
    """H = 2/N · Σ xᵀx over every input row x that reaches a layer (a running mean over calls)."""

    def __init__(self, in_features: int, device: torch.device):
        self.h = torch.zeros(in_features, in_features, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total = self.rows + x.shape[0]
        self.h.mul_(self.rows / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


@contextlib.contextmanager
def _record_inputs(layers: list[QuantLayer]):
    """Accumulate each layer's quantized input (the input quantizer's output)."""
    stats = {q.name: HessianAccumulator(q.layer.weight[0].numel(), q.layer.weight.device) for q in layers}
    handles = [q.input_quantizer.register_forward_hook(lambda m, args, out, s=stats[q.name]: s.add(out))
               for q in layers]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def quantize_model_gptq(model: nn.Module, loader: Iterable[dict], blocksize: int = 128,
                        damping: float = 0.01) -> dict:
    """GPTQ every quantized Linear of ``model`` unit by unit (see the module doc) from the calibration batches of
    ``loader`` (dicts with x, t, y; iterated once per unit); returns a report."""
    check_options(blocksize, damping)
    adapter = adapter_for(model)
    report = {"layers": 0, "skipped": [], "hessian_rows": {}}
    for _, unit in adapter.units(model):
        layers = [q for q in quant_layers(unit) if isinstance(q.layer, nn.Linear) and q.learns_rounding]
        report["skipped"] += [q.name for q in quant_layers(unit) if q not in layers and q.weight_quantizer.enabled]
        if not layers:
            continue
        frozen = [q.name for q in layers if q.frozen_weight]
        if frozen:
            raise UserError(f"GPTQ: the weights of {frozen[:3]} are already fixed (codes or a low-rank branch); "
                            "GPTQ must be the only weight method")
        # Static activation ranges are observed after GPTQ: until then those inputs stay full precision.
        unobserved = [a for a in activation_quantizers(model) if not a.calibrated]
        with bypassing([q.weight_quantizer for q in layers] + unobserved), _record_inputs(layers) as stats:
            for batch in loader:
                interrupt.check()
                run_until_output(lambda: adapter.forward_batch(model, batch), unit)  # the rest is not needed
        for q in layers:
            result = gptq_quantize(q.layer.weight, stats[q.name].h, q.weight_quantizer.spec, blocksize, damping)
            quantizer = q.weight_quantizer
            quantizer.scale.data.copy_(result.scale.reshape(quantizer.scale.shape))
            quantizer.zero_point.copy_(result.zero_point.reshape(quantizer.zero_point.shape))
            q.store_codes(result.codes.reshape(quantizer.scale.shape[:-1] + (-1,)))
            report["hessian_rows"][q.name] = stats[q.name].rows
            report["layers"] += 1
    return report


@register
@dataclass
class GPTQ(Method):
    """GPTQ weights (Q-DiT): per Linear, column-by-column quantization with Hessian-weighted error feedback, each
    layer with its own group size. List it after a granularity search; it fixes the weights, so it replaces
    round-to-nearest and excludes block reconstruction (AdaRound), the alternative weight method. The Hessians are
    accumulated over the calibration set in batches of ``data.batch_size``.

    Args:
        blocksize: columns per lazy update (128).
        damping: added to H's diagonal, as a fraction of its mean (0.01).
    """

    name: ClassVar[str] = "gptq"
    changes: ClassVar[frozenset] = frozenset({"quantized_weights"})
    blocksize: int = 128
    damping: float = 0.01

    def __post_init__(self):
        check_options(self.blocksize, self.damping)

    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        if ctx.reconstruction is not None:
            raise UserError("GPTQ and model.reconstruction (AdaRound) both set the weights: use one (set "
                            "model.reconstruction: null, or drop the GPTQ method)")

    def apply(self, model: nn.Module, calibration, ctx: MethodContext) -> dict:
        return quantize_model_gptq(model, ctx.calibration_batches(calibration), self.blocksize, self.damping)
