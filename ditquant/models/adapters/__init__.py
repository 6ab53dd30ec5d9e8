"""Model-family adapters: the one place that knows how a family's denoiser is called and where things live in it.

An adapter owns, for its family: loading (every checkpoint layout ditquant reads), the denoiser call on a batch
``{x, t, y}`` (``y``: the condition, class labels for DiT), the null condition for classifier-free guidance, the
layer -> role map that quantization configs refer to, the reconstruction units, and every input a method may rescale
per channel, with where its exact fold lives (or that it is divided online). Everything above this layer (samplers,
calibration recording, observation, methods, reconstruction) calls the model only through its adapter, so a new
family is a new adapter plus configs.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ditquant.errors import UserError
from ditquant.models.adapters.base import Adapter, RescalableInput
from ditquant.models.adapters.dit import DiTAdapter
from ditquant.models.adapters.pixart import PixArtAdapter
from ditquant.quant import timesteps
from ditquant.quant.apply import wrap_layers

ADAPTERS: list[Adapter] = [DiTAdapter(), PixArtAdapter()]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (a clear error for a model no adapter knows)."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UserError(f"{type(model).__name__}: no model-family adapter knows this model (known families: "
                    f"{', '.join(a.family for a in ADAPTERS)})")


def adapter_named(family: str) -> Adapter:
    """The adapter of the family called ``family`` (as exported models record it)."""
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise UserError(f"unknown model family {family!r} (known: {', '.join(a.family for a in ADAPTERS)})")


def known_roles() -> tuple[str, ...]:
    """Every layer role some family defines (options naming roles are checked against these before a model is
    loaded, and against the model's own when it is)."""
    return tuple(dict.fromkeys(r for adapter in ADAPTERS for r in adapter.roles))


def quantize_model(model: nn.Module, config, init_weights: bool = True) -> nn.Module:
    """Wrap ``model``'s layers per ``config`` (the roles its family's adapter defines), in place; weights
    round-to-nearest unless ``init_weights`` is false (a skeleton whose state is loaded afterwards). The model
    records its timestep argument on every call, for timestep-aware activation ranges (``ditquant.quant.timesteps``)."""
    wrap_layers(model, config, adapter_for(model).role_map(model), init_weights)
    model.register_forward_pre_hook(_enter_forward, with_kwargs=True)
    model.register_forward_hook(_leave_forward, always_call=True)
    return model


def _enter_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    scopes = model.__dict__.setdefault("_timestep_scopes", [])  # a stack: the model may be called re-entrantly
    scopes.append(contextlib.nullcontext())  # what _leave_forward pops, also if the adapter refuses the arguments
    scope = timesteps.timesteps(adapter_for(model).timestep_of(args, kwargs))
    scope.__enter__()
    scopes[-1] = scope


def _leave_forward(model: nn.Module, args: tuple, output) -> None:
    model.__dict__["_timestep_scopes"].pop().__exit__(None, None, None)


__all__ = ["ADAPTERS", "Adapter", "DiTAdapter", "PixArtAdapter", "RescalableInput", "adapter_for", "adapter_named",
           "known_roles", "quantize_model"]
