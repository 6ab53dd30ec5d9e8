"""Mixed precision under a budget (issue 16): keep the few layers whose low-bit inputs hurt most at a higher activation
bit width, within an average-bits budget.

Sensitivity of a layer: the mean squared error of the model's output (the denoiser's prediction) over a few
calibration batches when only that layer's input is quantized at its configured (low) bits, everything else in full
precision — the layer's own contribution to the error, measured where it matters. A static range is first observed
on the same batches by a probe quantizer (the model's own quantizers are not touched).

Budget: the average input bit width over the quantized layers, each weighed by its multiply-adds per token
(out·in: its share of the integer GEMM work, which is what 4-bit activations speed up). Layers are promoted to
``high_bits`` in order of sensitivity per promoted bit-MAC while the average stays within the budget.
"""

from __future__ import annotations

import itertools

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Optional

import torch
import yaml
from torch import nn

from ditquant import interrupt
from ditquant.errors import UserError
from ditquant.io import atomic_write
from ditquant.methods.base import Method, MethodContext, register
from ditquant.models.adapters import adapter_for
from ditquant.quant.apply import apply_plan
from ditquant.quant.modules import QuantLayer, quant_disabled, quant_layers, scale_shape
from ditquant.quant.quantizer import UniformQuantizer

log = logging.getLogger(__name__)


def layer_cost(q: QuantLayer) -> int:
    """Multiply-adds per token (per output position for a patchifying convolution)."""
    return q.layer.weight.numel()


def average_bits(bits: dict[str, int], costs: dict[str, int]) -> float:
    return sum(bits[n] * costs[n] for n in bits) / sum(costs[n] for n in bits)


@torch.no_grad()
def activation_sensitivities(model: nn.Module, batches: list[dict], layers: list[QuantLayer]) -> dict[str, float]:
    """Per layer, the model output's mean squared error with only that layer's input quantized (see the module
    doc)."""
    adapter = adapter_for(model)
    result = {}
    with quant_disabled(model):  # every quantizer of the model passes values through; the probe does not
        targets = [adapter.forward_batch(model, b) for b in batches]
        for q in layers:
            interrupt.check()
            spec = q.input_quantizer.spec
            probe = UniformQuantizer(spec, False, scale_shape(spec, q.layer.weight, False)).to(q.layer.weight.device)
            original, q.input_quantizer = q.input_quantizer, probe
            try:
                if probe.scale is not None:  # a static range: observe it on the same batches first
                    probe.observing = True
                    for b in batches:
                        adapter.forward_batch(model, b)
                    probe.observing = False
                    probe.finish_observing()
                errors = [(adapter.forward_batch(model, b) - target).square().mean().item()
                          for b, target in zip(batches, targets)]
            finally:
                q.input_quantizer = original
            result[q.name] = sum(errors) / len(errors)
    return result


def choose_promotions(sensitivity: dict[str, float], bits: dict[str, int], costs: dict[str, int], budget: float,
                      high_bits: int) -> list[str]:
    """The layers to raise to ``high_bits``: greedily by sensitivity per added bit-MAC, while the budget holds."""
    total = sum(costs.values())
    spent = sum(bits[n] * costs[n] for n in bits)
    order = sorted(sensitivity, key=lambda n: (-sensitivity[n] / (costs[n] * (high_bits - bits[n])), n))
    chosen = []
    for name in order:
        extra = costs[name] * (high_bits - bits[name])
        if spent + extra <= budget * total + 1e-9:
            chosen.append(name)
            spent += extra
    return chosen


@register
@dataclass
class MixedPrecision(Method):
    """Keep the most sensitive layers' inputs at ``high_bits`` within an average activation bit width of
    ``budget`` (see the module doc). The chosen bit widths are applied to the model and its QuantConfig
    (``layer_activation_bits``, through ``MethodContext.set_quant``, so checkpoints and ``quantized/`` record them)
    and written to ``output``, a config overlay a later fit loads with ``--config``. List it after the methods that
    change the FP weights (rotation, smoothing, balancing: the sensitivities are measured on their result) and
    before those that fix the quantized weights.

    Args:
        budget: the average activation bits allowed (e.g. 4.5 with 4-bit activations: an eighth of the work at 8).
        high_bits: the bit width of promoted layers.
        num_batches: calibration batches the sensitivities are measured on.
        output: the result YAML (default ``<run folder>/activation_bits.yaml``).
    """

    name: ClassVar[str] = "mixed_precision"
    changes: ClassVar[frozenset] = frozenset({"bit_widths"})
    budget: float = 4.5
    high_bits: int = 8
    num_batches: int = 2
    output: Optional[str] = None

    def __post_init__(self):
        if not 2 <= self.high_bits <= 8:
            raise UserError(f"MixedPrecision.high_bits must be 2–8, got {self.high_bits}")
        if self.num_batches < 1:
            raise UserError(f"MixedPrecision.num_batches must be >= 1, got {self.num_batches}")

    def _layers(self, model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
        """(input bits, MACs per token) of every quantized layer with a quantized input."""
        layers = [q for q in quant_layers(model) if q.input_quantizer.enabled]
        if not layers:
            raise UserError("MixedPrecision: no quantized layer has a quantized input (model.quant.activation)")
        return ({q.name: q.input_quantizer.spec.bits for q in layers}, {q.name: layer_cost(q) for q in layers})

    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        if ctx.quant is None:
            raise UserError("MixedPrecision needs the model's QuantConfig (MethodContext.quant) to record its result")
        if ctx.quant.layer_activation_bits:
            return  # given (a previous search's result): nothing to search
        bits, costs = self._layers(model)
        low, high = average_bits(bits, costs), average_bits({n: max(b, self.high_bits) for n, b in bits.items()},
                                                           costs)
        if not low <= self.budget <= high:
            raise UserError(f"MixedPrecision.budget: {self.budget} average activation bits is outside what this model "
                            f"can have: {low:.3g} (every input at its configured bits) to {high:.3g} (every input at "
                            f"high_bits {self.high_bits})")

    def apply(self, model: nn.Module, calibration, ctx: MethodContext) -> dict:
        if ctx.quant is not None and ctx.quant.layer_activation_bits:
            log.info("mixed precision skipped: model.quant.layer_activation_bits is given")
            return {"skipped": "model.quant.layer_activation_bits is given"}
        self.check(model, ctx)
        bits, costs = self._layers(model)
        batches = list(itertools.islice(ctx.calibration_batches(calibration), self.num_batches))
        candidates = [q for q in quant_layers(model) if q.name in bits and bits[q.name] < self.high_bits]
        sensitivity = activation_sensitivities(model, batches, candidates)
        promoted = choose_promotions(sensitivity, bits, costs, self.budget, self.high_bits)
        chosen = {name: self.high_bits for name in sorted(promoted, key=list(bits).index)}
        result = replace(ctx.quant, layer_activation_bits={**ctx.quant.layer_activation_bits, **chosen})
        apply_plan(model, result)
        if ctx.set_quant is not None:
            ctx.set_quant(result)
        achieved = average_bits({**bits, **chosen}, costs)
        out = Path(self.output or Path(ctx.output_dir) / "activation_bits.yaml")
        with atomic_write(out) as tmp:
            tmp.write_text(f"# Mixed-precision result (ditquant MixedPrecision): {len(chosen)} of {len(bits)} layer "
                           f"inputs at {self.high_bits} bits, average {achieved:.3f} bits (budget {self.budget}).\n"
                           "# Load it with  ditquant fit --config <method config> --config <this file>\n"
                           + yaml.safe_dump({"model": {"quant": {"layer_activation_bits": chosen}}}, sort_keys=False))
        log.info("mixed precision: %d layer inputs at %d bits, average %.3f bits (budget %s)", len(chosen),
                 self.high_bits, achieved, self.budget)
        return {"promoted": chosen, "average_bits": achieved, "budget": self.budget, "sensitivity": sensitivity,
                "output": str(out)}
