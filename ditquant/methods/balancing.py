"""PTQ4DiT's salience balancing applied to a DiT: statistics from the calibration set, factors, exact folds.

For every block and each balanced input (the attention input read by q/k/v, the MLP input read by fc1, the attention
output read by its projection) the activation salience is gathered per calibration timestep with forward
pre-hooks on the FP model; ``salience: ssc`` weights the timesteps by softmax(−ρ) (PTQ4DiT), ``mid`` takes the middle
calibration timestep (the paper's "CSB only" ablation). The factors are folded into the adaLN modulation and V rows
(``folding``), so the balanced FP model computes the same function with no online division.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from ditquant.errors import UserError
from ditquant.methods.base import Method, register
from ditquant.models.folding import input_weights
from ditquant.methods.salience import activation_salience, balancing_factor, calibrated_salience, weight_salience
from ditquant.methods.statistics import visit_block_inputs
from ditquant.models.adapters import adapter_for


def salience_per_timestep(model: nn.Module, calibration: Dataset, batch_size: int = 32
                          ) -> tuple[list[int], dict[tuple[int, str], torch.Tensor]]:
    """(timesteps, {(block, input): (T, channels) max |X| per calibration timestep}) from FP forwards."""
    stats: dict[tuple[int, str], dict[int, torch.Tensor]] = {}

    def visit(key, x, t):
        per_t = stats.setdefault(key, {})
        for value in t.unique().tolist():
            s = activation_salience(x[t == value])
            per_t[value] = torch.maximum(per_t[value], s) if value in per_t else s

    visit_block_inputs(model, calibration, adapter_for(model).input_groups(model, exact_only=True), visit,
                       batch_size)
    timesteps = sorted(next(iter(stats.values())))
    return timesteps, {k: torch.stack([v[t] for t in timesteps]) for k, v in stats.items()}


@torch.no_grad()
def balancing_factors(model: nn.Module, calibration: Dataset, salience: Literal["ssc", "mid"] = "ssc",
                      batch_size: int = 32) -> tuple[dict[tuple[int, str], torch.Tensor], dict]:
    """({(block, input): f} for every balanced input, the statistics behind them); the model is not changed."""
    if salience not in ("ssc", "mid"):
        raise UserError(f"salience must be 'ssc' or 'mid', got {salience!r}")
    adapter_for(model).require_exact_folds(model)
    timesteps, per_t = salience_per_timestep(model, calibration, batch_size)
    factors, report = {}, {"timesteps": timesteps, "eta": {}, "factor_range": {}}
    adapter = adapter_for(model)
    for b, block in enumerate(adapter.blocks(model)):
        for name, sharing in adapter.input_groups(model, exact_only=True).items():
            sw = weight_salience([input_weights(block, sharing)])
            sx_t = per_t[(b, name)]
            if salience == "ssc":
                sx, eta = calibrated_salience(sx_t, sw)
                report["eta"][f"{b}.{name}"] = eta.tolist()
            else:
                sx = sx_t[len(timesteps) // 2]
            f = factors[(b, name)] = balancing_factor(sx, sw)
            report["factor_range"][f"{b}.{name}"] = (f.min().item(), f.max().item())
    return factors, report


@torch.no_grad()
def fold_balancing(model: nn.Module, factors: dict[tuple[int, str], torch.Tensor]) -> None:
    """Fold each factor: q/k/v's and fc1's into the adaLN modulation, the attention output's into V's rows."""
    adapter_for(model).rescale_inputs(model, factors)


def balance_model(model: nn.Module, calibration: Dataset, salience: Literal["ssc", "mid"] = "ssc",
                  batch_size: int = 32) -> dict:
    """Balance every block of ``model`` in place (the FP function is unchanged); returns the statistics used."""
    factors, report = balancing_factors(model, calibration, salience, batch_size)
    fold_balancing(model, factors)
    return report


@register
@dataclass
class SalienceBalancing(Method):
    """PTQ4DiT's channel-wise salience balancing (CSB), folded into the weights (no online division).

    For q/k/v (one factor, shared input), the attention output projection and fc1 of every block, the activation
    is divided by f_j = √(s(X_j)/s(W_j)) and the weight columns multiplied by it; the division is folded into the
    adaLN modulation (q/k/v, fc1) and the V projection's rows (attention output). Statistics come from FP forwards
    over the whole calibration set.

    Args:
        salience: ``ssc``: s(X) = Σ_t softmax(−ρ)_t s(X^(t)) with ρ_t the Spearman correlation of activation and
            weight salience at calibration timestep t (PTQ4DiT); ``mid``: s(X) of the middle calibration timestep
            (the paper's "CSB only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name: ClassVar[str] = "salience_balancing"
    changes: ClassVar[frozenset] = frozenset({"fp_weights"})
    fp_statistics: ClassVar[bool] = True
    salience: Literal["ssc", "mid"] = "ssc"
    batch_size: int = 32

    def __post_init__(self):
        if self.salience not in ("ssc", "mid"):
            raise UserError(f"SalienceBalancing.salience must be 'ssc' or 'mid', got {self.salience!r}")
        if self.batch_size < 1:
            raise UserError(f"SalienceBalancing.batch_size must be >= 1, got {self.batch_size}")

    def apply(self, model: nn.Module, calibration: Dataset, ctx=None) -> dict:
        report = balance_model(model, calibration, salience=self.salience, batch_size=self.batch_size)
        return {"salience": self.salience, **report}
