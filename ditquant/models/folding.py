"""Exact re-parameterizations of a DiT block that move a per-channel factor from an activation into weights.

Balancing (PTQ4DiT) and smoothing (DiTAS) divide a linear's input channel j by s_j and multiply the weight's column
j by s_j: X·W^T = (X/s)·(W·s)^T. Done online that costs a division per forward; folded, it is free:

- the post-adaLN inputs (q/k/v share the attention input, fc1 reads the MLP input) are x̂·(1 + scale) + shift with
  scale and shift produced by the adaLN linear, so dividing by s means rows of that linear divide by s and the
  scale bias becomes (1 + b)/s − 1 (DiT computes 1 + scale);
- the attention output projection reads softmax(QKᵀ)·V, linear in V per channel, so V's rows divide by s.

An input with nothing linear in front of it (fc2's, after GELU) can only be divided on the fly: ``divide_online``
keeps s in the QuantLayer (one per-channel division per forward, stated by DiTAS).

Weights are changed in place; a layer already wrapped in a QuantLayer gets its weight quantizer re-initialised.
"""

from __future__ import annotations

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.models.layout import (ADALN_CHUNKS, ATTENTION_OUTPUT, MODULATED_INPUTS, VALUE_PROJECTION,
                                    modulation_linear, transformer_blocks)
from ditquant.quant.modules import QuantLayer, fp_layer


def _requantize(module: nn.Module) -> None:
    if isinstance(module, QuantLayer):
        module.init_weight_quantizer()


def ensure_foldable(modules: list[nn.Module]) -> None:
    """Checked before any weight changes: a fold cannot reach a quantized weight that no longer follows W."""
    for m in modules:
        if isinstance(m, QuantLayer) and m.frozen_weight:
            raise UserError(f"{m.name}: its quantized weight is already fixed (reconstructed or low-rank "
                            "compensated); fold factors into the model before that")


def check_factor(s: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    if s.shape != (channels,) or not torch.isfinite(s).all() or (s <= 0).any():
        raise UserError(f"{where}: the factor must be {channels} finite positive values, got shape {tuple(s.shape)}")
    return s


def _chunk(name: str, hidden: int) -> slice:
    """The output rows of the adaLN linear that produce chunk ``name``."""
    i = ADALN_CHUNKS.index(name)
    return slice(i * hidden, (i + 1) * hidden)


def require_modulation(model: nn.Module) -> None:
    """Every block has an adaLN-Zero linear to fold into: checked before any statistics or weight change."""
    for block in transformer_blocks(model):
        modulation_linear(block)


def input_weights(block: nn.Module, consumers: tuple[str, ...]) -> torch.Tensor:
    """The FP weights of the linears reading one input, stacked along their outputs (q, k and v together)."""
    return torch.cat([fp_layer(block.get_submodule(c)).weight for c in consumers])


@torch.no_grad()
def scale_input_columns(consumers: list[nn.Module], s: torch.Tensor) -> None:
    """W[:, j] *= s_j for every consumer (the input it reads is divided by s)."""
    ensure_foldable(consumers)
    for m in consumers:
        lin = fp_layer(m)
        lin.weight.mul_(s.to(lin.weight)[None, :])
        _requantize(m)


@torch.no_grad()
def fold_into_modulation(block: nn.Module, branch: str, s: torch.Tensor) -> None:
    """Divide the block's modulated ``branch`` input ("attention" or "mlp") by s and compensate in its linears."""
    shift_name, scale_name, consumer_names = MODULATED_INPUTS[branch]
    ada = modulation_linear(block)
    ensure_foldable([ada, *(block.get_submodule(n) for n in consumer_names)])
    lin = fp_layer(ada)
    hidden = lin.out_features // len(ADALN_CHUNKS)
    s = check_factor(s, hidden, f"fold_into_modulation({branch})").to(lin.weight)
    shift, scale = (_chunk(name, hidden) for name in (shift_name, scale_name))
    lin.weight[shift] /= s[:, None]
    lin.bias[shift] /= s
    lin.weight[scale] /= s[:, None]
    lin.bias[scale] = (1 + lin.bias[scale]) / s - 1  # x·(1 + scale)/s = x·(1 + scale')
    _requantize(ada)
    scale_input_columns([block.get_submodule(n) for n in consumer_names], s)


@torch.no_grad()
def fold_into_value(block: nn.Module, s: torch.Tensor, value_name: str = VALUE_PROJECTION,
                    output_name: str = ATTENTION_OUTPUT) -> None:
    """Divide an attention output projection's input by s through V's rows, and compensate in its weight (the
    block's self-attention unless the names say another attention's projections)."""
    value = block.get_submodule(value_name)
    ensure_foldable([value, block.get_submodule(output_name)])
    lin = fp_layer(value)
    s = check_factor(s, lin.out_features, "fold_into_value").to(lin.weight)
    lin.weight /= s[:, None]
    if lin.bias is not None:
        lin.bias /= s
    _requantize(value)
    scale_input_columns([block.get_submodule(output_name)], s)


@torch.no_grad()
def divide_online(layer: QuantLayer, s: torch.Tensor) -> None:
    """x / s at run time in front of ``layer``'s input quantizer, and W's columns multiplied by s."""
    if not isinstance(layer, QuantLayer):
        raise UserError("divide_online needs a QuantLayer (the division lives in its forward)")
    s = check_factor(s, layer.layer.in_features, f"divide_online({layer.name})").to(layer.layer.weight)
    scale_input_columns([layer], s)
    layer.divide_input(s)


@torch.no_grad()
def rotate_into_value(block: nn.Module, head_rotation: torch.Tensor, value_name: str = VALUE_PROJECTION,
                      output_name: str = ATTENTION_OUTPUT) -> None:
    """Rotate the attention output projection's input by Q = diag(Q_h, …, Q_h) (one orthogonal Q_h per head) through
    V's rows: softmax(·)·V acts on each head's channels linearly, so V·Q_h per head gives o·Q; W_v ← Qᵀ·W_v,
    b_v ← b_v·Q, W_o ← W_o·Q. Exact, and free at run time."""
    attention = block.get_submodule(value_name.rpartition(".")[0])
    value, out = block.get_submodule(value_name), block.get_submodule(output_name)
    ensure_foldable([value, out])
    heads, inner = attention.heads, attention.inner_dim
    if head_rotation.shape != (inner // heads, inner // heads):
        raise UserError(f"rotate_into_value: a per-head rotation must be {inner // heads}x{inner // heads}, got "
                        f"{tuple(head_rotation.shape)}")
    q = torch.block_diag(*[head_rotation.double()] * heads)
    v, o = fp_layer(value), fp_layer(out)
    v.weight.copy_((q.T @ v.weight.double()).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_((v.bias.double() @ q).to(v.bias.dtype))
    o.weight.copy_((o.weight.double() @ q).to(o.weight.dtype))
    _requantize(value)
    _requantize(out)
