"""quantize_model: wrap a DiT's layers in place according to a QuantConfig, and describe the result."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from rich.table import Table
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.attention import QuantAttnProcessor, attention_names, quantize_attention
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import QuantLayer, activation_quantizers, quant_layers
from ditquant.quant.plan import resolve_plan


@dataclass(frozen=True)
class RoleMap:
    """What the caller (a model-family adapter) says about a model's layers, like torchao's ``filter_fn``: the roles
    its family defines and the role of every quantizable Linear/Conv2d, by module name in forward order."""

    roles: tuple[str, ...]
    layers: dict[str, str]
    # A role a config names that also selects other roles of this family (PixArt: the block's attention roles
    # ``qkv`` / ``attn_out`` also select its cross-attention's, so one method config serves DiT and PixArt).
    implies: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def check(self, config: QuantConfig) -> None:
        for where, roles in [("quant.roles", config.roles or [])] + [("quant.overrides.roles", o.roles)
                                                                     for o in config.overrides]:
            if unknown := sorted(set(roles) - set(self.roles)):
                raise UserError(f"{where}: unknown layer role(s) {unknown}; this model's roles: "
                                f"{', '.join(self.roles)}")

    def selected(self, config: QuantConfig) -> dict[str, str]:
        """Name -> role of the layers ``config`` quantizes (every role when ``config.roles`` is null)."""
        self.check(config)
        if config.roles is None:
            return dict(self.layers)
        roles = set(config.roles).union(*(self.implies.get(r, ()) for r in config.roles))
        return {name: role for name, role in self.layers.items() if role in roles}


def wrap_layers(model: nn.Module, config: QuantConfig, role_map: RoleMap, init_weights: bool = True) -> nn.Module:
    """Replace every Linear/Conv2d of the configured roles by a QuantLayer (in place; weights initialised RTN unless
    ``init_weights`` is false: a skeleton whose state is loaded afterwards). Use
    ``ditquant.quantize_model``, which takes the role map from the model's family adapter."""
    if any(True for _ in quant_layers(model)):
        raise UserError("model is already quantized")
    for name, layer_plan in resolve_plan(config, role_map.selected(config), attention_names(model)).items():
        layer = model.get_submodule(name)
        try:
            wrapped = QuantLayer(layer, layer_plan.weight, layer_plan.input, name=name, role=layer_plan.role)
        except ValueError as e:
            raise UserError(f"{name}: {e}") from None
        if init_weights:
            wrapped.init_weight_quantizer()
        _replace(model, name, wrapped)
    quantize_attention(model, config.attention_spec_for)
    return model


@contextlib.contextmanager
def unwrapped(model: nn.Module):
    """The model exactly as it was before ``wrap_layers`` for the duration of the block: every QuantLayer replaced
    by the layer it wraps, every quantized attention processor by the one it replaced. Its FP forward is then the
    loaded model's own (not a quantized model with its quantizers bypassed, whose attention matmuls differ in the
    last bits). For work on the FP model before any method changed its weights: recording the calibration set with
    the run's single copy of the model."""
    from diffusers.models.attention_processor import Attention

    layers = list(quant_layers(model))
    processors = [(m, m.processor) for m in model.modules()
                  if isinstance(m, Attention) and isinstance(m.processor, QuantAttnProcessor)]
    for q in layers:
        _replace(model, q.name, q.layer)
    for attention, processor in processors:
        attention.set_processor(processor.replaced)
    try:
        yield model
    finally:
        for attention, processor in processors:
            attention.set_processor(processor)
        for q in layers:
            _replace(model, q.name, q)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def apply_plan(model: nn.Module, config: QuantConfig) -> list[str]:
    """Give the QuantLayers of ``model`` the specs ``config`` plans for them (a searched layout: other group sizes or
    bit widths, the same config otherwise): layers whose specs change get fresh quantizers, weights
    round-to-nearest. Returns the names of the changed layers."""
    changed = []
    layers = list(quant_layers(model))
    plan = resolve_plan(config, {q.name: q.role for q in layers}, attention_names(model))
    for q in layers:
        weight_spec, input_spec = plan[q.name].weight, plan[q.name].input
        if (weight_spec, input_spec) == (q.weight_quantizer.spec, q.input_quantizer.spec):
            continue
        if q.frozen_weight:
            raise UserError(f"{q.name}: its weight is already fixed (codes or low-rank branch); group sizes and bit "
                            "widths must be chosen before GPTQ, LoRA or reconstruction")
        q.set_specs(weight_spec, input_spec)
        changed.append(q.name)
    return changed


def quantization_table(model: nn.Module) -> Table:
    """A rich table: per role, how many layers, and their weight / activation specs."""
    rows: dict[tuple[str, str, str], int] = {}
    for m in quant_layers(model):
        key = (m.role or "?", m.weight_quantizer.spec.label("w"), m.input_quantizer.spec.label("a"))
        rows[key] = rows.get(key, 0) + 1
    attention = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    if attention:
        rows[("attention matmuls", "-", attention[0].query_quantizer.spec.label("a"))] = len(attention)
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
