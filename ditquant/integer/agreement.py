"""How closely an integer model reproduces its fake-quantized source: SQNR per transformer block, each block fed the
same input (the fake model's), so differences do not compound from block to block."""

from __future__ import annotations

import torch
from torch import nn

from ditquant.models.adapters import adapter_for


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (other.float() - reference.float()).square().sum().clamp(min=1e-30)
    return float(10 * torch.log10(reference.float().square().sum() / noise))


@torch.no_grad()
def block_sqnr(fake: nn.Module, integer: nn.Module, *inputs) -> list[float]:
    """SQNR (dB) of every integer block's output against the fake block's, on the fake model's block inputs."""
    fake_blocks, int_blocks = adapter_for(fake).blocks(fake), adapter_for(integer).blocks(integer)
    results: list[float] = []

    def compare(index):
        def hook(module, args, kwargs, output):
            results.append(sqnr_db(output, int_blocks[index](*args, **kwargs)))
        return hook

    handles = [b.register_forward_hook(compare(i), with_kwargs=True) for i, b in enumerate(fake_blocks)]
    try:
        fake(*inputs)
    finally:
        for h in handles:
            h.remove()
    return results
