"""The per-layer plan: a QuantConfig resolved once against a model's layers (name -> role, weight spec, input spec).

Every layer's specs come from here: the default specs, then each override naming its role or matching its name (in
order), then its own group size from ``layer_group_sizes`` (a granularity search's result: a per-layer override of
``group_size`` wherever a spec is group-wise) and its own input bit width from ``layer_activation_bits`` (a
mixed-precision search's result). A calibrated model is saved with its plan, and loading compares plans
layer by layer — what the layers are, not how the config that made them was written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from ditquant.errors import UserError
from ditquant.quant.config import QuantConfig
from ditquant.quant.spec import QuantSpec


@dataclass(frozen=True)
class LayerPlan:
    role: str
    weight: QuantSpec
    input: QuantSpec


def resolve_plan(config: QuantConfig, layers: dict[str, str], attentions: Iterable[str] = ()) -> dict[str, LayerPlan]:
    """The plan of the layers ``config`` quantizes among ``layers`` (name -> role, forward order); bad per-layer
    options (a name that is no quantized layer — nor, for an override with an attention spec, one of the model's
    ``attentions`` —, a group size where no spec is group-wise) are refused here."""
    attentions = list(attentions)
    for i, o in enumerate(config.overrides):
        for pattern in o.layers:
            names = [*layers, *(attentions if o.attention is not None else ())]
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                what = "quantized layer or attention" if o.attention is not None else "quantized layer"
                raise UserError(f"quant.overrides[{i}].layers: {pattern!r} matches no {what} of this model "
                                f"(e.g. {', '.join(names[:3])})")
    for option in ("layer_group_sizes", "layer_activation_bits"):
        unknown = sorted(set(getattr(config, option)) - set(layers))
        if unknown:
            raise UserError(f"quant.{option}: {len(unknown)} name(s) are not quantized layers of this model, e.g. "
                            f"{unknown[:3]} (quantized: {len(layers)} layers of roles {sorted(set(layers.values()))})")
    plan = {}
    for name, role in layers.items():
        if name in config.layer_group_sizes and all(s.granularity != "group" for s in config.specs_for(role)):
            raise UserError(f"quant.layer_group_sizes: {name} has neither a group-wise weight nor a group-wise "
                            "input spec (granularity 'group'), so a group size means nothing for it")
        plan[name] = LayerPlan(role, *config.specs_for(role, name))
    return plan


def model_plan(model: nn.Module) -> dict[str, LayerPlan]:
    """The plan a quantized model's layers carry (what its quantizers were built with)."""
    from ditquant.quant.modules import quant_layers

    return {q.name: LayerPlan(q.role, q.weight_quantizer.spec, q.input_quantizer.spec) for q in quant_layers(model)}


def plan_as_dict(plan: dict[str, LayerPlan]) -> dict:
    """Plain data (YAML / JSON)."""
    return {name: {"role": p.role, "weight": dataclasses.asdict(p.weight), "input": dataclasses.asdict(p.input)}
            for name, p in plan.items()}
