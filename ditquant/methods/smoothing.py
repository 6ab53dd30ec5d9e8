"""DiTAS's temporal-aggregated smoothing (TAS) with a per-input α grid search, applied to a DiT.

For the inputs of q/k/v (shared), the attention output projection, fc1 and fc2 of every block:

- a_j = max |X_j| over the whole calibration set (every timestep of the trajectory: the "temporal aggregation");
- w_j = max |W_{:,j}| over the linears reading the input; s_j(α) = a_j^α / w_j^(1−α) (clamped at 1e-4), X / s
  and W · s;
- α from a grid (0, 0.05, …, 1) minimising the layer's output MSE ‖Q_a(X/s)·Q_w(W·s)ᵀ − X·Wᵀ‖² summed over the
  calibration set, with the weight re-quantized per candidate (per output channel, so s changes the weight error,
  unlike the official code's input-column groups) and activations quantized as configured (dynamic: per sample).

A static activation spec is scored with each batch's own range (the calibrated range is not known yet).
All inputs are FP activations (the FP function does not change under folding), so one calibration pass scores every
α of every layer at once: the official code's layer-by-layer visiting order gives the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ditquant.calibration.dataset import CalibrationSet
from ditquant.errors import UserError
from ditquant.methods.base import Method, register
from ditquant.models.folding import input_weights
from ditquant.methods.salience import activation_salience, weight_salience
from ditquant.methods.statistics import visit_block_inputs
from ditquant.models.adapters import adapter_for
from ditquant.quant.modules import QuantLayer
from ditquant.quant.quantizer import quantize_tensor
from ditquant.quant.spec import QuantSpec

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
EPS = 1e-4


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise UserError(f"the α grid must be a non-empty list of values in [0, 1], got {list(alphas)}")
    return tuple(float(a) for a in alphas)


def smoothing_factor(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = a_j^α / w_j^(1−α): X is divided by s and W's columns multiplied by it (α = ½: PTQ4DiT's CSB)."""
    return (act_max.clamp(min=EPS) ** alpha / weight_max.clamp(min=EPS) ** (1 - alpha)).clamp(min=EPS)


@torch.no_grad()
def temporal_max(model: nn.Module, calibration: Dataset, batch_size: int = 32) -> dict[tuple[int, str], torch.Tensor]:
    """{(block, input): max |X_j| over every calibration row and timestep} (TAS's statistic)."""
    stats: dict[tuple[int, str], torch.Tensor] = {}

    def visit(key, x, t):
        s = activation_salience(x)
        stats[key] = torch.maximum(stats[key], s) if key in stats else s

    visit_block_inputs(model, calibration, adapter_for(model).input_groups(model), visit, batch_size)
    return stats


@torch.no_grad()
def alpha_losses(model: nn.Module, calibration: Dataset, act_max: dict[tuple[int, str], torch.Tensor],
                 weight_spec: QuantSpec, act_spec: QuantSpec, alphas: Sequence[float] = ALPHA_GRID,
                 batch_size: int = 32) -> dict[tuple[int, str], torch.Tensor]:
    """{(block, input): output MSE per α} over one calibration pass (weights re-quantized per candidate)."""
    alphas = check_alphas(alphas)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    weights = {(b, name): input_weights(blocks[b], consumers)
               for b in range(len(blocks)) for name, consumers in adapter.input_groups(model).items()}
    # s per candidate, once; the weights are re-quantized per batch instead of cached: 21 copies of every weight
    # would not fit for DiT-XL/2, and the matmuls cost far more than quantizing the weight
    factors = {key: [smoothing_factor(act_max[key], weight_salience([w]), a) for a in alphas]
               for key, w in weights.items()}
    sums = {key: torch.zeros(len(alphas), dtype=torch.float64) for key in weights}
    counts = dict.fromkeys(weights, 0)

    def visit(key, x, t):
        w = weights[key]
        reference = x @ w.T
        for i, s in enumerate(factors[key]):
            xq = quantize_tensor(x / s, act_spec, False)
            wq = quantize_tensor(w * s, weight_spec, True)
            sums[key][i] += (xq @ wq.T - reference).double().pow(2).sum()
        counts[key] += reference.numel()

    visit_block_inputs(model, calibration, adapter_for(model).input_groups(model), visit, batch_size)
    return {key: sums[key] / max(counts[key], 1) for key in sums}


@torch.no_grad()
def fold_smoothing(model: nn.Module, factors: dict[tuple[int, str], torch.Tensor]) -> None:
    """q/k/v's and fc1's factors into the adaLN modulation, the attention output's into V's rows, fc2's on the fly."""
    adapter_for(model).rescale_inputs(model, factors)


def _layer_specs(model: nn.Module) -> tuple[QuantSpec, QuantSpec]:
    """The weight and activation specs of the smoothed linears (all four roles must be quantized, alike)."""
    specs = set()
    adapter = adapter_for(model)
    for block in adapter.blocks(model):
        for consumers in adapter.input_groups(model).values():
            for name in consumers:
                m = block.get_submodule(name)
                if not isinstance(m, QuantLayer):
                    raise UserError(f"smoothing needs q/k/v, attn_out, fc1 and fc2 quantized (quant.roles); {name} "
                                    "is not")
                specs.add((m.weight_quantizer.spec, m.input_quantizer.spec))
    if len(specs) != 1:
        raise UserError("smoothing searches α with one weight/activation spec: the smoothed linears have "
                        f"{len(specs)} different ones (quant.overrides)")
    return specs.pop()


@torch.no_grad()
def smooth_model(model: nn.Module, calibration: CalibrationSet, alphas: Sequence[float] = ALPHA_GRID,
                 alpha: float | None = None, batch_size: int = 32) -> dict:
    """TAS on every block of a quantized ``model`` (FP function unchanged): α searched per input over ``alphas``, or
    ``alpha`` for all; returns the chosen α and scores per input."""
    alphas = check_alphas([alpha] if alpha is not None else alphas)
    adapter_for(model).require_exact_folds(model)
    weight_spec, act_spec = _layer_specs(model)
    act_max = temporal_max(model, calibration, batch_size)
    losses = alpha_losses(model, calibration, act_max, weight_spec, act_spec, alphas, batch_size)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    groups = adapter.input_groups(model)
    factors, report = {}, {"calibration_rows": len(calibration), "timesteps": calibration.num_timesteps,
                           "alpha": {}, "mse": {}}
    for (b, name), scores in losses.items():
        best = int(scores.argmin())
        w_max = weight_salience([input_weights(blocks[b], groups[name])])
        factors[(b, name)] = smoothing_factor(act_max[(b, name)], w_max, alphas[best])
        report["alpha"][f"{b}.{name}"] = alphas[best]
        report["mse"][f"{b}.{name}"] = scores[best].item()
    fold_smoothing(model, factors)
    return report


@register
@dataclass
class TemporalSmoothing(Method):
    """DiTAS's temporal-aggregated smoothing with a per-input α grid search, folded into the weights.

    For q/k/v (shared input), the attention output projection, fc1 and fc2 of every block: a_j = max |X_j| over
    the whole calibration trajectory, s_j = a_j^α / w_j^(1−α); α per input minimises the layer's quantized output
    MSE over the calibration set. q/k/v's and fc1's s fold into the adaLN modulation, the attention output's into
    V's rows, fc2's is divided on the fly (GELU sits in front of it).

    Args:
        alphas: the α grid searched per input (default 0, 0.05, …, 1).
        alpha: a fixed α for every input instead of the search (the "smoothing only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name: ClassVar[str] = "temporal_smoothing"
    changes: ClassVar[frozenset] = frozenset({"fp_weights"})
    fp_statistics: ClassVar[bool] = True
    alphas: Optional[list[float]] = None
    alpha: Optional[float] = None
    batch_size: int = 32

    def __post_init__(self):
        check_alphas(list(ALPHA_GRID) if self.alphas is None else self.alphas)
        if self.alpha is not None:
            check_alphas([self.alpha])
        if self.batch_size < 1:
            raise UserError(f"TemporalSmoothing.batch_size must be >= 1, got {self.batch_size}")

    def apply(self, model: nn.Module, calibration: CalibrationSet, ctx=None) -> dict:
        grid = check_alphas(list(ALPHA_GRID) if self.alphas is None else self.alphas)
        return smooth_model(model, calibration, grid, self.alpha, self.batch_size)
