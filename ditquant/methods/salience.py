"""PTQ4DiT's salience statistics: channel-wise salience balancing (CSB) and Spearman-ρ salience calibration (SSC).

For a linear with weight W (out, in) reading X: s(W_j) = max over outputs |W_{:, j}|, s(X_j) = max over tokens |X_j|.
CSB balances both to their geometric mean: X is divided by f_j = √(s(X_j) / s(W_j)) and W's column j multiplied by it
(SmoothQuant with α = ½). SSC replaces s(X) by Σ_t η_t s(X^(t)) with η = softmax(−ρ) over the calibration timesteps,
ρ_t = Spearman(s(X^(t)), s(W)): timesteps whose activation salience lines up less with the weights' count more.
The factor f is what ``ditquant.models.folding`` folds into the model.
"""

from __future__ import annotations

import torch
from scipy.stats import spearmanr


def weight_salience(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_{:, j}| over the outputs of every weight sharing the input (q, k and v share one)."""
    return torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0)


def activation_salience(x: torch.Tensor) -> torch.Tensor:
    """max |X_j| over every token (and row) of an activation batch (..., channels)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two channel vectors (ties averaged)."""
    return float(spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic)


def calibrated_salience(per_timestep: torch.Tensor, w_salience: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSC: (s_ρ(X), η) from the activation salience at each timestep (T, channels)."""
    rho = torch.tensor([spearman(s, w_salience) for s in per_timestep], dtype=per_timestep.dtype)
    eta = torch.softmax(-rho, dim=0)
    return (eta[:, None] * per_timestep).sum(dim=0), eta


def balancing_factor(x_salience: torch.Tensor, w_salience: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """f_j = √(s(X_j) / s(W_j)): X / f and W · f both have salience √(s(X_j)·s(W_j)) in channel j."""
    return ((x_salience + eps) / (w_salience + eps)).sqrt()
