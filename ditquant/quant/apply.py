"""quantize_model: wrap a DiT's layers in place according to a QuantConfig, and describe the result."""

from __future__ import annotations

import torch
from rich.table import Table
from torch import nn

from ditquant.models.layout import layers_by_role, role_of
from ditquant.quant.attention import QuantAttnProcessor, quantize_attention
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import QuantLayer, activation_quantizers, quant_layers


def quantize_model(model: nn.Module, config: QuantConfig, init_weights: bool = True) -> nn.Module:
    """Replace every Linear/Conv2d of the configured roles by a QuantLayer (in place; weights initialised RTN unless
    ``init_weights`` is false: a skeleton whose state is loaded afterwards)."""
    if any(True for _ in quant_layers(model)):
        raise ValueError("model is already quantized")
    for name, layer in layers_by_role(model, config.roles).items():
        weight_spec, input_spec = config.specs_for(role_of(name))
        try:
            wrapped = QuantLayer(layer, weight_spec, input_spec, name=name)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if init_weights:
            wrapped.init_weight_quantizer()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
    if config.attention is not None and config.attention.enabled:
        quantize_attention(model, config.attention)
    return model


def quantization_table(model: nn.Module) -> Table:
    """A rich table: per role, how many layers, and their weight / activation specs."""
    rows: dict[tuple[str, str, str], int] = {}
    for m in quant_layers(model):
        key = (role_of(m.name) or "?", m.weight_quantizer.spec.describe(), m.input_quantizer.spec.describe())
        rows[key] = rows.get(key, 0) + 1
    attention = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    if attention:
        rows[("attention matmuls", "-", attention[0].query_quantizer.spec.describe())] = len(attention)
    table = Table(title="Quantized layers")
    for col in ("role", "layers", "weights", "activations"):
        table.add_column(col)
    for (role, w, a), n in rows.items():
        table.add_row(role, str(n), w, a)
    return table


def uncalibrated_layers(model: nn.Module) -> list[str]:
    """Names of the modules holding a static quantizer that has not seen calibration data."""
    names = {id(q): name for name, q in model.named_modules()}
    return [names[id(q)] for q in activation_quantizers(model) if not q.calibrated]


@torch.no_grad()
def weight_sqnr_db(model: nn.Module) -> float:
    """Signal-to-quantization-noise ratio of all quantized weights together, in dB."""
    signal = noise = 0.0
    for m in quant_layers(model):
        w = m.layer.weight
        signal += w.square().sum().item()
        noise += (m.effective_weight() - w).square().sum().item()  # learned rounding, low-rank branch included
    return 10 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()
