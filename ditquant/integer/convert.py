"""Turn a calibrated fake-quantized DiT into its integer twin: every QuantLayer becomes an IntLinear holding only
integer weights, scales and zero points (the FP weights are not kept)."""

from __future__ import annotations

import copy

import torch
from diffusers.models.activations import GELU
from torch import nn

from ditquant.errors import UserError
from ditquant.integer.linear import INT8_SHIFT, IntLinear
from ditquant.integer.packing import pack_int4
from ditquant.quant.affine import integer_codes
from ditquant.quant.modules import QuantLayer, quant_layers
from ditquant.quant.quantizer import grouped


def _patch_size(layer: nn.Conv2d, name: str) -> int:
    k, s = layer.kernel_size, layer.stride
    if k[0] != k[1] or tuple(k) != tuple(s) or layer.padding not in ((0, 0), 0) or layer.groups != 1 \
            or tuple(layer.dilation) != (1, 1):
        raise UserError(f"{name}: only patchifying convolutions (kernel = stride, no padding) have an integer form")
    return k[0]


def integer_shell(q: QuantLayer) -> IntLinear:
    """An empty IntLinear shaped and specified like ``q`` (to load an exported state into)."""
    layer = q.layer
    patch = _patch_size(layer, q.name) if isinstance(layer, nn.Conv2d) else None
    out_features, in_features = layer.weight.shape[0], layer.weight[0].numel()
    return IntLinear(out_features, in_features, q.weight_quantizer.spec, q.input_quantizer.spec, q.name, patch)


@torch.no_grad()
def to_integer_layer(q: QuantLayer) -> IntLinear:
    """The integer form of one calibrated QuantLayer (codes: AdaRound's or LoRA's if stored, else round-to-nearest)."""
    if q.adaround is not None:
        raise UserError(f"{q.name}: reconstruction of this layer is unfinished (soft rounding); finish `ditquant fit`")
    wq, aq = q.weight_quantizer, q.input_quantizer
    if wq.scale is None:
        raise UserError(f"{q.name}: dynamic weight quantization has no integer form")
    if not aq.calibrated:
        raise UserError(f"{q.name}: activation range never observed: the model was not calibrated (ditquant fit)")
    out = integer_shell(q)
    spec = wq.spec
    codes = q.weight_codes.float() if q.weight_codes is not None else integer_codes(
        grouped(q.layer.weight, spec, True), wq.scale, wq.zero_point, spec)
    groups = out.weight_scale.shape[1]

    def per_group(t: torch.Tensor) -> torch.Tensor:  # (out, 1) | (out, groups, 1) | (1, 1) -> (out, groups, 1)
        return t.reshape(t.shape[0], -1, 1).expand(out.out_features, groups, 1)

    codes = codes.reshape(out.out_features, groups, -1)
    zero = per_group(wq.zero_point)
    out.weight_scale.copy_(per_group(wq.scale)[..., 0])
    if out.packed:  # unsigned nibbles, zero point subtracted after unpacking
        nibbles, nibble_zero = codes - spec.qmin, zero - spec.qmin
        out.weight.copy_(pack_int4(nibbles.reshape(out.out_features, -1)))
        out.weight_zero.copy_(nibble_zero.reshape(out.out_features, groups).to(torch.int8))
    else:
        centred = codes - zero
        if centred.abs().max() <= 127:
            out.weight.copy_(centred.reshape(out.out_features, -1).to(torch.int8))
        else:  # asymmetric 8-bit: int8 codes − 128, the zero point enters the GEMM's correction term
            out.weight.copy_((codes - INT8_SHIFT).reshape(out.out_features, -1).to(torch.int8))
            out.weight_offset = (zero - INT8_SHIFT).reshape(out.out_features, groups).clone()
    if q.layer.bias is not None:
        out.bias = q.layer.bias.detach().clone().float()
    if aq.scale is not None:
        out.input_scale, out.input_zero = aq.scale.detach().clone(), aq.zero_point.clone()
        if aq.timestep_edges is not None:
            out.input_timestep_edges = aq.timestep_edges.clone()
    for transform in q.input_transforms:
        out.input_transforms.append(transform.to_integer())
    for branch in q.branches:
        out.branches.append(branch.to_integer())
    return out


class FusedGELU(nn.Module):
    """diffusers' ``GELU`` activation (a linear, then GELU) whose linear is an IntLinear: the IntLinear applies the
    GELU itself, inside oneDNN's GEMM where that runs (a post-op on the float32 result, which saves a pass over the
    block's widest activation). The linear keeps its name, so the state dict is unchanged."""

    def __init__(self, proj: IntLinear, approximate: str):
        super().__init__()
        self.proj = proj
        proj.gelu = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Replace, in place, each diffusers ``GELU`` whose linear is an IntLinear by ``FusedGELU``; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GELU) and isinstance(module.proj, IntLinear) and module.approximate in ("none", "tanh"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    FusedGELU(module.proj, module.approximate))
    return model


def to_integer(model: nn.Module, keep_float: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """A copy of a calibrated quantized ``model`` with every QuantLayer replaced by its IntLinear, except the
    ``keep_float`` ones (layer names), which become their floating-point layer again (with the weights the methods
    left in them); each diffusers ``GELU`` around an IntLinear becomes ``FusedGELU``; the rest (embeddings, norms,
    unquantized layers, attention processors) is copied as is.
    ``model`` is not changed."""
    layers = [q for q in quant_layers(model) if q.weight_quantizer.spec.enabled]
    if not layers:
        raise UserError("the model has no quantized layers: quantize and calibrate it first (ditquant fit)")
    names = {q.name for q in layers}
    if unknown := [n for n in keep_float if n not in names]:
        raise UserError(f"keep float: {unknown} is not a quantized layer of this model (e.g. {sorted(names)[:3]})")
    memo = {}
    for q in layers:
        if q.name not in keep_float:
            memo[id(q)] = to_integer_layer(q)
        elif q.input_transforms or q.branches:  # the weight alone is not the layer's function
            raise UserError(f"keep float: {q.name} transforms its input or adds a branch (rotation, smoothing, "
                            "low-rank); it can only run as an integer layer")
        else:
            memo[id(q)] = copy.deepcopy(q.layer)
    return fuse_gelu(copy.deepcopy(model, memo))
