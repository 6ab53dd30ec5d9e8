"""How closely an integer model reproduces its fake-quantized source: SQNR per transformer block, each block fed the
same input (the fake model's), so differences do not compound from block to block."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

import ditquant.quant.modules as quant_modules
from ditquant.models.adapters import adapter_for


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    noise = (other.float() - reference.float()).square().sum().clamp(min=1e-30)
    return float(10 * torch.log10(reference.float().square().sum() / noise))


@torch.no_grad()
def block_sqnr(fake: nn.Module, integer: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[float]:
    """SQNR (dB) of every integer block's output against the fake block's, on the fake model's block inputs, with
    the denoiser called on (x, t, y) through its family's adapter."""
    adapter = adapter_for(fake)
    fake_blocks, int_blocks = adapter.blocks(fake), adapter_for(integer).blocks(integer)
    results: list[float] = []
    inputs: dict[int, tuple] = {}

    def record(index):  # the block's inputs as called, before its own pre-hooks (PixArt's modulation multiplier)
        def hook(module, args, kwargs):
            inputs[index] = (args, dict(kwargs))
        return hook

    def compare(index):
        def hook(module, args, kwargs, output):
            args, kwargs = inputs.pop(index)
            results.append(sqnr_db(output, int_blocks[index](*args, **kwargs)))
        return hook

    handles = [h for i, b in enumerate(fake_blocks)
               for h in (b.register_forward_pre_hook(record(i), with_kwargs=True, prepend=True),
                         b.register_forward_hook(compare(i), with_kwargs=True))]
    try:
        adapter.forward(fake, x, t, y)
    finally:
        for h in handles:
            h.remove()
    return results


class _ReorderedFunctional:
    """``torch.nn.functional`` as the quantized layers see it, with ``linear`` summing over a permutation of the input
    channels (the same one for the activation and the weight), drawn per width from ``seed``."""

    def __init__(self, seed: int):
        self.seed, self.orders = seed, {}

    def __getattr__(self, name):
        return getattr(F, name)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n = w.shape[1]
        if n not in self.orders:
            self.orders[n] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + n))
        order = self.orders[n].to(w.device)
        return F.linear(x.index_select(-1, order), w.index_select(1, order), bias)


@contextlib.contextmanager
def reordered_sums(seed: int) -> Iterator[None]:
    """While inside, every fake-quantized linear sums its products in another order (seeded): the same arithmetic as
    the fake-quantized model, rounded differently — the yardstick for how far the integer model's exact int32 sums
    may move results that pass through rounding boundaries (codes) at every layer and step."""
    original = quant_modules.F
    quant_modules.F = _ReorderedFunctional(seed)
    try:
        yield
    finally:
        quant_modules.F = original
