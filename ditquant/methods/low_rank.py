"""DiTAS's training-free LoRA for weights over a whole model (the per-layer alternation is
``QuantLayer.compensate_low_rank``, see ``ditquant.quant.lora``)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ditquant.errors import UserError
from ditquant.models.layout import role_of
from ditquant.quant.lora import check_rank
from ditquant.quant.modules import quant_layers
from ditquant.quant.quantizer import quantize_tensor


def compensate_low_rank(model: nn.Module, rank: int, iterations: int, roles: Sequence[str]) -> dict:
    """Per quantized layer of ``roles``: W_q = Q(W − L·R) with L·R the rank-``rank`` SVD of W − W_q, alternated
    ``iterations`` times (best iterate kept). Every rank is checked before any work. Returns the per-layer weight
    error of round-to-nearest and after compensation."""
    wrapped = {m.name: m for m in quant_layers(model) if role_of(m.name) in roles}
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
