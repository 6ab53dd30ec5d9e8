"""QuantConfig: which layers of a model are quantized, and how (data, YAML-friendly). Layers are named by role;
which roles a model has is its family adapter's business (``ditquant.models.adapters``)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Optional

from ditquant.errors import UserError
from ditquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class LayerOverride:
    """Different specs for some layers (e.g. keep the final layer at 8 bits): those of ``roles`` and those whose
    name matches one of ``layers``.

    Args:
        roles: layer roles this override applies to.
        layers: layer names or shell patterns (``transformer_blocks.27.*``) this override applies to.
        weight: weight spec for those layers (None keeps the default).
        activation: input-activation spec for those layers (None keeps the default).
        attention: attention-matmul spec of the attention modules whose name matches one of ``layers`` (e.g.
            ``transformer_blocks.*.attn2``, PixArt's cross-attentions; bits 16 keeps their matmuls in floating
            point; None keeps ``quant.attention``).
    """

    roles: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    weight: Optional[QuantSpec] = None
    activation: Optional[QuantSpec] = None
    attention: Optional[QuantSpec] = None

    def applies(self, role: str, name: str) -> bool:
        return role in self.roles or any(fnmatch.fnmatchcase(name, p) for p in self.layers)


@dataclass(frozen=True)
class QuantConfig:
    """How a DiT is fake-quantized.

    Args:
        weight: spec of every quantized layer's weight (the papers: per-channel).
        activation: spec of every quantized layer's input (the papers: per-tensor, static, asymmetric).
        roles: layer roles to quantize; null = every role of the model's family (for DiT, see
            ``ditquant.models.layout``). PTQ4DiT quantizes all of them, Q-DiT and DiTAS only the four block linears
            (qkv, attn_out, fc1, fc2).
        overrides: per-role exceptions, applied in order.
        attention: spec of the attention matmul operands (Q, K, softmax probabilities, V), per tensor; null keeps
            the matmuls in floating point (Q-DiT, DiTAS). PTQ4DiT quantizes them at the activation bit width.
        layer_group_sizes: per-layer group size (layer name -> g) replacing ``group_size`` in that layer's weight
            and input specs where they are group-wise (Q-DiT: a layer and its input share g). Written by the
            granularity search (method ``granularity_search``) as a config a later fit loads.
        layer_activation_bits: per-layer input bit width (layer name -> bits) replacing the activation spec's
            ``bits`` in that layer. Written by the mixed-precision search (method ``mixed_precision``).
    """

    weight: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, symmetric=False, granularity="channel"))
    activation: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, symmetric=False, granularity="tensor"))
    roles: Optional[list[str]] = None
    overrides: list[LayerOverride] = field(default_factory=list)
    attention: Optional[QuantSpec] = None
    layer_group_sizes: dict[str, int] = field(default_factory=dict)
    layer_activation_bits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for where, roles in [("quant.roles", self.roles)] + [("quant.overrides.roles", o.roles) for o in self.overrides]:
            if roles is not None and not all(isinstance(r, str) for r in roles):
                raise UserError(f"{where}: a list of role names, got {roles!r}")  # known names: at quantize time
        if self.weight.granularity in ("token", "sample"):
            raise UserError(f"quant.weight.granularity {self.weight.granularity!r} is for activations; use "
                            "'channel', 'group' or 'column_group'")
        if self.activation.granularity in ("channel", "column_group"):
            raise UserError(f"quant.activation.granularity {self.activation.granularity!r} is for weights; use "
                            "'tensor', 'token', 'sample' or 'group'")

        weights = [("quant.weight", self.weight)] + [(f"quant.overrides[{i}].weight", o.weight)
                                                     for i, o in enumerate(self.overrides) if o.weight is not None]
        attention = [("quant.attention", self.attention)] + [(f"quant.overrides[{i}].attention", o.attention)
                                                             for i, o in enumerate(self.overrides)]
        for where, spec in weights + attention:
            if spec is not None and spec.timestep_groups > 1:
                raise UserError(f"{where}.timestep_groups: per-timestep ranges are for layer inputs (quant.activation "
                                "or an override's activation), not for weights or attention operands")

        bad = {name: g for name, g in self.layer_group_sizes.items() if not isinstance(g, int) or g < 1}
        if bad:
            raise UserError(f"quant.layer_group_sizes: group sizes must be positive integers, got {bad}")
        bad = {name: b for name, b in self.layer_activation_bits.items()
               if not isinstance(b, int) or not (2 <= b <= 8 or b == 16)}
        if bad:
            raise UserError(f"quant.layer_activation_bits: bit widths must be 2–8 or 16, got {bad}")

    def specs_for(self, role: str, name: str = "") -> tuple[QuantSpec, QuantSpec]:
        """The weight and input specs of the layer ``name`` of ``role`` (overrides, then per-layer group sizes and
        activation bits)."""
        weight, activation = self.weight, self.activation
        for o in self.overrides:
            if o.applies(role, name):
                weight = o.weight or weight
                activation = o.activation or activation
        g = self.layer_group_sizes.get(name)
        if g is not None:
            weight, activation = (replace(s, group_size=g) if s.granularity == "group" else s
                                  for s in (weight, activation))
        bits = self.layer_activation_bits.get(name)
        if bits is not None:
            activation = replace(activation, bits=bits)
        return weight, activation

    def attention_spec_for(self, name: str) -> Optional[QuantSpec]:
        """The matmul spec of the attention module ``name`` (``quant.attention``, then the overrides whose
        ``layers`` match the name); None where its matmuls stay in floating point."""
        spec = self.attention
        for o in self.overrides:
            if o.attention is not None and any(fnmatch.fnmatchcase(name, p) for p in o.layers):
                spec = o.attention
        return spec if spec is not None and spec.enabled else None

    def label(self) -> str:
        return f"W{self.weight.bits}A{self.activation.bits}"


def quant_config_from_dict(d: dict) -> QuantConfig:
    """The QuantConfig ``dataclasses.asdict`` wrote (as stored in quantized.yaml / integer.yaml)."""
    spec = lambda s: None if s is None else QuantSpec(**s)  # noqa: E731
    return QuantConfig(weight=spec(d["weight"]), activation=spec(d["activation"]), roles=None if d.get("roles") is None else list(d["roles"]),
                       overrides=[LayerOverride(roles=list(o.get("roles") or []), layers=list(o.get("layers") or []),
                                                weight=spec(o.get("weight")),
                                                activation=spec(o.get("activation")),
                                                attention=spec(o.get("attention"))) for o in d.get("overrides", [])],
                       attention=spec(d.get("attention")),
                       layer_group_sizes={k: int(v) for k, v in (d.get("layer_group_sizes") or {}).items()},
                       layer_activation_bits={k: int(v) for k, v in (d.get("layer_activation_bits") or {}).items()})
