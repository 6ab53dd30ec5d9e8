"""Quantized drop-in replacements for nn.Linear / nn.Conv2d, and scoped switches for their quantizers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ditquant.quant.quantizer import UniformQuantizer
from ditquant.quant.spec import QuantSpec


def _scale_shape(spec: QuantSpec, weight: torch.Tensor, is_weight: bool) -> tuple[int, ...]:
    fan_in = weight[0].numel() if is_weight else weight.shape[1]
    if spec.granularity == "channel":
        return (weight.shape[0], 1)
    if spec.granularity == "group":
        if fan_in % spec.group_size:
            raise ValueError(f"group size {spec.group_size} does not divide in_features={fan_in}")
        return ((weight.shape[0], fan_in // spec.group_size, 1) if is_weight else (fan_in // spec.group_size, 1))
    return (1, 1)


class QuantLayer(nn.Module):
    """Wraps one Linear or Conv2d: y = layer(Q_a(x)) with weight Q_w(W). Keeps the FP weight for reconstruction."""

    def __init__(self, layer: nn.Module, weight_spec: QuantSpec, input_spec: QuantSpec, name: str = ""):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and input_spec.enabled and input_spec.granularity not in ("tensor",):
            raise ValueError(f"{name}: convolution inputs support only per-tensor activation quantization")
        self.name = name
        self.layer = layer
        self.weight_quantizer = UniformQuantizer(weight_spec, True, _scale_shape(weight_spec, layer.weight, True))
        self.input_quantizer = UniformQuantizer(input_spec, False, _scale_shape(input_spec, layer.weight, False))
        self.quant_weight = True
        self.quant_input = True

    @torch.no_grad()
    def init_weight_quantizer(self) -> None:
        if self.weight_quantizer.scale is not None:
            self.weight_quantizer.init_from(self.layer.weight)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.layer.weight) if self.quant_weight else self.layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_input:
            x = self.input_quantizer(x)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)

    def extra_repr(self) -> str:
        return f"{self.name}: W {self.weight_quantizer.spec.describe()}, A {self.input_quantizer.spec.describe()}"


def quant_layers(model: nn.Module) -> Iterator[QuantLayer]:
    return (m for m in model.modules() if isinstance(m, QuantLayer))


@contextlib.contextmanager
def quant_disabled(model: nn.Module):
    """Run ``model`` in full precision inside the block (FP targets, FP reference samples)."""
    layers = list(quant_layers(model))
    saved = [(m.quant_weight, m.quant_input) for m in layers]
    for m in layers:
        m.quant_weight = m.quant_input = False
    try:
        yield model
    finally:
        for m, (w, a) in zip(layers, saved):
            m.quant_weight, m.quant_input = w, a


@contextlib.contextmanager
def observing_activations(model: nn.Module):
    """Record activation ranges (static quantizers) while running FP inputs through the layers."""
    static = [m for m in quant_layers(model) if m.input_quantizer.scale is not None]
    quantizers = [m.input_quantizer for m in static]
    with quant_disabled(model):
        for layer in static:
            layer.quant_input = True  # the observing quantizer sees its input and passes it on unchanged
        for q in quantizers:
            q.observing = True
        try:
            yield model
        finally:
            for q in quantizers:
                q.observing = False
                q.finish_observing()
