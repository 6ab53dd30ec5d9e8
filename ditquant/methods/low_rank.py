"""DiTAS's training-free LoRA for weights over a whole model (the per-layer alternation is
``QuantLayer.compensate_low_rank``, see ``ditquant.quant.lora``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from torch import nn

from ditquant.errors import UserError
from ditquant.methods.base import Method, register
from ditquant.models.adapters import adapter_for, known_roles
from ditquant.models.layout import BLOCK_LINEAR_ROLES
from ditquant.quant.lora import check_rank
from ditquant.quant.modules import quant_layers
from ditquant.quant.quantizer import quantize_tensor


def compensate_low_rank(model: nn.Module, rank: int, iterations: int, roles: Sequence[str]) -> dict:
    """Per quantized layer of ``roles``: W_q = Q(W − L·R) with L·R the rank-``rank`` SVD of W − W_q, alternated
    ``iterations`` times (best iterate kept). Every rank is checked before any work. Returns the per-layer weight
    error of round-to-nearest and after compensation."""
    selected = adapter_for(model).selected_roles(model, roles)
    wrapped = {m.name: m for m in quant_layers(model) if m.role in selected}
    if not wrapped:
        raise UserError(f"LowRankCompensation: no quantized layer has a role in {list(roles)}")
    for name, layer in wrapped.items():
        check_rank(rank, layer.layer.weight, f"LowRankCompensation.rank ({name})")
    report = {"rank": rank, "rtn_error": {}, "error": {}}
    for name, layer in wrapped.items():
        w = layer.layer.weight
        report["rtn_error"][name] = (w - quantize_tensor(w, layer.weight_quantizer.spec, True)).norm().item()
        report["error"][name] = min(layer.compensate_low_rank(rank, iterations))
    return report


@register
@dataclass
class LowRankCompensation(Method):
    """DiTAS's training-free LoRA for weights: per layer, W_q = Q(W − L·R) and L·R the rank-r SVD of W − W_q,
    alternated ``iterations`` times (best iterate kept); the FP branch L·R reads the quantized activation. It fixes
    the quantized weights, so folds (smoothing) must come before it.

    Args:
        rank: r (DiTAS: 32).
        iterations: alternations (DiTAS: 10).
        roles: layer roles to compensate (DiTAS: the four block linears).
    """

    name: ClassVar[str] = "low_rank_compensation"
    changes: ClassVar[frozenset] = frozenset({"quantized_weights"})
    fp_statistics: ClassVar[bool] = True  # the weights are what it reads; quantizers stay off for any forward
    rank: int = 32
    iterations: int = 10
    roles: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_ROLES))

    def __post_init__(self):
        if self.iterations < 1:
            raise UserError(f"LowRankCompensation.iterations must be >= 1, got {self.iterations}")
        self.roles = list(self.roles)
        if unknown := sorted(set(self.roles) - set(known_roles())):
            raise UserError(f"LowRankCompensation.roles: unknown role(s) {unknown}; known roles: "
                            f"{', '.join(known_roles())}")

    def apply(self, model: nn.Module, calibration=None, ctx=None) -> dict:
        return compensate_low_rank(model, self.rank, self.iterations, self.roles)


@register
@dataclass
class SVDQuantBranch(Method):
    """SVDQuant's low-rank branch: per layer, the rank-r SVD L·R of W (after any smoothing or rotation folded into
    it) stays in floating point as a branch reading the unquantized input, and only the residual W − L·R is
    quantized (round-to-nearest), so the branch absorbs the weight's dominant, outlier-carrying part. Unlike
    DiTAS's compensation (``low_rank_compensation``), whose branch reads the quantized input and fits the
    quantization error, this branch adds r·(in + out) multiply-adds per token in floating point.

    Args:
        rank: r (SVDQuant: 32).
        roles: layer roles that get a branch (default: the four block linears).
    """

    name: ClassVar[str] = "svdquant_branch"
    changes: ClassVar[frozenset] = frozenset({"quantized_weights"})
    fp_statistics: ClassVar[bool] = True
    rank: int = 32
    roles: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_ROLES))

    def __post_init__(self):
        self.roles = list(self.roles)
        if unknown := sorted(set(self.roles) - set(known_roles())):
            raise UserError(f"SVDQuantBranch.roles: unknown role(s) {unknown}; known roles: "
                            f"{', '.join(known_roles())}")

    def _layers(self, model: nn.Module) -> dict:
        selected = adapter_for(model).selected_roles(model, self.roles)
        layers = {m.name: m for m in quant_layers(model) if m.role in selected}
        if not layers:
            raise UserError(f"SVDQuantBranch: no quantized layer has a role in {self.roles}")
        return layers

    def check(self, model: nn.Module, ctx=None) -> None:
        for name, layer in self._layers(model).items():
            check_rank(self.rank, layer.layer.weight, f"SVDQuantBranch.rank ({name})")

    def apply(self, model: nn.Module, calibration=None, ctx=None) -> dict:
        report = {"rank": self.rank, "rtn_error": {}, "error": {}, "branch_macs_per_token": 0}
        for name, layer in self._layers(model).items():
            w = layer.layer.weight
            report["rtn_error"][name] = (w - quantize_tensor(w, layer.weight_quantizer.spec, True)).norm().item()
            report["error"][name] = layer.split_low_rank(self.rank)
            report["branch_macs_per_token"] += self.rank * (w.shape[0] + w.shape[1])
        return report
