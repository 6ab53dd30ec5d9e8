"""Orthogonal rotations for linear inputs: Hadamard matrices for any width that has one, and a seeded random
orthogonal matrix for any width.

A Hadamard matrix H (entries ±1, H·Hᵀ = n·I) scaled by 1/√n spreads every channel's outlier over all channels
with the same magnitude. Orders that are powers of two come from Sylvester's doubling. Widths such as DiT-XL/2's
1152 = 32·36 and 4608 = 128·36 are covered by the Kronecker product H_{2^k} ⊗ H_m with H_m from Paley's
constructions (m = q + 1 for a prime q ≡ 3 mod 4, m = 2(q + 1) for a prime q ≡ 1 mod 4), as QuaRot does with its
stored H_m.
"""

from __future__ import annotations

import functools

import torch

from ditquant.errors import UserError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character of GF(q) (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


@functools.lru_cache(maxsize=None)
def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley I (m = q + 1, q ≡ 3 mod 4) or II (m = 2(q + 1), q ≡ 1 mod 4)."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        jac = _jacobsthal(q)
        core = torch.zeros(m, m, dtype=torch.float64)
        core[0, 1:], core[1:, 0] = 1.0, -1.0
        core[1:, 1:] = jac
        return core + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        jac = _jacobsthal(q)
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1.0, 1.0
        c[1:, 1:] = jac
        plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        out = torch.zeros(m, m, dtype=torch.float64)
        for i in range(q + 1):
            for j in range(q + 1):
                out[2 * i:2 * i + 2, 2 * j:2 * j + 2] = minus if c[i, j] == 0 else plus * c[i, j]
        return out
    return None


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard-type matrix of order n (float64): H_{2^k} ⊗ H_m / √n; a clear error when no
    construction here covers n."""
    power, base = hadamard_factors(n)
    return torch.kron(_sylvester(power), base) / n ** 0.5


def fast_hadamard(x: torch.Tensor, power: int, base: torch.Tensor) -> torch.Tensor:
    """x·(H_power ⊗ base)/√n along the last dimension without the n×n matrix: the m×m ``base`` as a matmul, then
    a fast Walsh–Hadamard transform over the 2^k blocks (log2(2^k) butterfly passes): O(n·(m + log n)) per row
    instead of O(n²)."""
    m = base.shape[0]
    n = power * m
    y = (x.reshape(*x.shape[:-1], power, m) @ base.to(x.dtype)) if m > 1 else x.reshape(*x.shape[:-1], power, 1)
    h = 1
    while h < power:  # Sylvester order: index i = (high bit)·h + rest at every doubling
        y = y.reshape(*x.shape[:-1], power // (2 * h), 2, h, m)
        a, b = y[..., 0, :, :], y[..., 1, :, :]
        y = torch.stack((a + b, a - b), dim=-3)
        h *= 2
    return y.reshape(x.shape) / n ** 0.5


def hadamard_factors(n: int) -> tuple[int, torch.Tensor]:
    """(2^k, H_m) with 2^k·m = n and H_m a Hadamard matrix (±1, float64); the largest power of two that works."""
    two = n & -n  # the largest power of two dividing n
    for power in [two >> s for s in range(two.bit_length())]:
        m = n // power
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return power, base
    raise UserError(f"no Hadamard matrix of order {n} is known here (orders 2^k · m with m = 1 or a Paley order: "
                    "q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for a prime q ≡ 1 mod 4); use kind 'random'")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so the draw is uniform)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation_matrix(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    if kind == "hadamard":
        return hadamard(n)
    if kind == "random":
        return random_orthogonal(n, seed)
    raise UserError(f"rotation kind must be 'hadamard' or 'random', got {kind!r}")
