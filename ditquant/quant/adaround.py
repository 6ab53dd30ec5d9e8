"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down, as BRECQ / Q-Diffusion / PTQ4DiT do.

h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1) with ζ = 1.1, γ = −0.1; soft weight Δ·(clamp(⌊W/Δ⌋ + h(V) + z, qmin, qmax) − z);
V starts where h(V) equals the fractional part of W/Δ, so hard rounding at the start is round-to-nearest. The grid
is clamped to the spec's [qmin, qmax] (signed for symmetric specs; Q-Diffusion's [0, 2^b − 1] clamp would zero
negative weights under symmetric quantization). Regulariser λ·Σ(1 − |2h(V) − 1|^β), λ = 0.01, with β annealed
20 → 2 after a 20 % warm-up without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Learnable rounding of one weight tensor on a fixed grid (scale, zero point), broadcast like the quantizer's."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        scaled = weight.detach() / self.scale
        self.register_buffer("floor", scaled.floor())
        frac = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        # Invert h: σ(V) = (frac − γ) / (ζ − γ).
        self.alpha = nn.Parameter(torch.logit((frac - GAMMA) / (ZETA - GAMMA)))
        self.hard = False

    def soft_rounding(self) -> torch.Tensor:
        """h(V), the rectified sigmoid in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding(self) -> torch.Tensor:
        if self.hard:
            return (self.alpha >= 0).to(self.alpha.dtype)
        return self.soft_rounding()

    def codes(self) -> torch.Tensor:
        return torch.clamp(self.floor + self.rounding() + self.zero_point, self.spec.qmin, self.spec.qmax)

    def forward(self) -> torch.Tensor:
        return (self.codes() - self.zero_point) * self.scale

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The integer grid values of the hardened rounding (floor + 1[V >= 0])."""
        hard, self.hard = self.hard, True
        try:
            return self.codes().round()
        finally:
            self.hard = hard

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()


@dataclass(frozen=True)
class RoundingSchedule:
    """The rounding regulariser's weight and β at each iteration.

    Args:
        iterations: total iterations of the unit's optimisation.
        weight: λ (0.01 in BRECQ / PTQ4DiT).
        warmup: fraction of iterations without the regulariser (0.2).
        beta_start, beta_end: β annealed linearly over the rest (20 → 2).
    """

    iterations: int
    weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0

    def __post_init__(self):
        if self.iterations < 1 or not 0 <= self.warmup < 1:
            raise UserError(f"rounding schedule needs iterations >= 1 and warmup in [0, 1), got {self.iterations}, "
                             f"{self.warmup}")

    def at(self, step: int) -> tuple[float, float]:
        """(λ, β) at ``step``: λ = 0 during warm-up."""
        start = self.warmup * self.iterations
        if step < start:
            return 0.0, self.beta_start
        progress = (step - start) / max(1.0, self.iterations - start)
        return self.weight, self.beta_end + (self.beta_start - self.beta_end) * (1 - progress)
