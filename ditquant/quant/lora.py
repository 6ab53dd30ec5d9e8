"""Training-free low-rank compensation of weight quantization error (DiTAS; LoftQ-style alternation).

W ≈ W_q + L·R with W_q on the quantizer's grid and L (out, r), R (r, in) in full precision. Starting from L·R = 0,
alternate W_q = Q(W − L·R) (the quantizer's range re-initialised on W − L·R) and L·R = the rank-r truncated SVD of
W − W_q. The first iterate already beats plain round-to-nearest (‖E − E_r‖ ≤ ‖E‖ for E = W − Q(W)); later ones
usually improve further but need not, so the best iterate in Frobenius error is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ditquant.errors import UserError


@dataclass
class LowRankQuantized:
    weight_q: torch.Tensor  # the quantized part, Q(quantized_input), at the best iterate
    quantized_input: torch.Tensor  # W − L·R of the previous iterate: what the best iterate quantized
    left: torch.Tensor      # (out, r)
    right: torch.Tensor     # (r, in)
    errors: list[float]     # ‖W − (W_q + L·R)‖_F per iterate
    best: int               # index of the kept iterate


def check_rank(rank: int, weight: torch.Tensor, where: str = "lora") -> None:
    limit = min(weight.shape[0], weight[0].numel())
    if not 1 <= rank <= limit:
        raise UserError(f"{where}: rank must be between 1 and min(out, in) = {limit} for a {tuple(weight.shape)} "
                        f"weight, got {rank}")


@torch.no_grad()
def low_rank_quantize(weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], rank: int = 32,
                      iterations: int = 10) -> LowRankQuantized:
    """Alternate quantization and rank-``rank`` SVD of the residual ``iterations`` times; keep the best iterate.

    ``quantize(w)`` returns the fake-quantized w (its range fitted to w) in w's shape.
    """
    check_rank(rank, weight)
    if iterations < 1:
        raise UserError(f"lora: iterations must be >= 1, got {iterations}")
    w = weight.detach().reshape(weight.shape[0], -1).double()
    low_rank = torch.zeros_like(w)
    best, errors = None, []
    for i in range(iterations):
        source = (w - low_rank).to(weight.dtype).reshape(weight.shape)
        w_q = quantize(source).reshape(w.shape).double()
        u, s, vh = torch.linalg.svd(w - w_q, full_matrices=False)
        root = s[:rank].sqrt()
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
        low_rank = left @ right
        errors.append(torch.linalg.matrix_norm(w - w_q - low_rank).item())
        if best is None or errors[-1] < errors[best[0]]:
            best = (i, source, w_q, left, right)
    i, source, w_q, left, right = best
    dtype = weight.dtype
    return LowRankQuantized(w_q.to(dtype).reshape(weight.shape), source, left.to(dtype), right.to(dtype), errors, i)
