"""Uniform affine quantization as pure tensor functions: parameters from a range, and quantize-dequantize."""

from __future__ import annotations

import torch

from ditquant.quant.spec import QuantSpec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping [lo, hi] onto the integer grid of ``spec`` (the range always holds 0)."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero_point = None
    scale = scale.clamp(min=1e-8)
    if zero_point is None:
        zero_point = (spec.qmin - lo / scale).round()
    return scale, zero_point


def integer_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The grid values round(x / scale) + zero_point, clamped (as floats)."""
    return torch.clamp(torch.round(x / scale) + zero_point, spec.qmin, spec.qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding; gradients flow to x and scale (LSQ-style).

    Without autograd (sampling) the same values are computed in place on one buffer: (r − x) + x equals r exactly
    for r = round(x) (Sterbenz), so both paths agree bit for bit.
    """
    if not torch.is_grad_enabled():
        return torch.div(x, scale).round_().add_(zero_point).clamp_(spec.qmin, spec.qmax).sub_(zero_point).mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, spec.qmin, spec.qmax)
    return (q - zero_point) * scale
