"""The adapter interface every model family implements (see ``ditquant.models.adapters``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import nn

from ditquant.quant.apply import RoleMap


@dataclass(frozen=True)
class RescalableInput:
    """A linear input a method may divide per channel by s (its readers' weight columns multiplied by s).

    ``fold`` says where the division goes: ``modulation`` (the adaLN shift/scale rows in front of it), ``value``
    (V's rows, in front of the attention output projection) — both exact and free at run time — or ``online`` (a
    per-channel division in the layer's forward: nothing linear precedes the input)."""

    block: int
    name: str                           # the input's name within the block (attention, attn_out, mlp, fc2)
    role: str                           # the role of the layers reading it
    consumers: tuple[nn.Module, ...]    # the layers reading it (q, k, v share one input)
    consumer_names: tuple[str, ...]     # their names within the block
    fold: Literal["modulation", "value", "online"]
    rescale: Callable[[torch.Tensor], None]  # divide the input by s and compensate, in place
    head_dim: Optional[int] = None  # value folds: a rotation folds exactly if it is per head of this size
    rotate: Optional[Callable[[torch.Tensor], None]] = None  # fold a per-head rotation (value folds), in place

    @property
    def exact(self) -> bool:
        return self.fold != "online"


class Adapter:
    """What ditquant needs of a model family (the DiT adapter is the reference implementation)."""

    family: str = ""
    roles: tuple[str, ...] = ()  # the layer roles this family defines

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def load(self, source):
        """A loaded model (transformer, VAE, config) from any source this family supports."""
        raise NotImplementedError

    def architecture(self, model: nn.Module) -> dict:
        """A plain description of ``model``'s architecture (what an exported model records, and ``build`` takes)."""
        raise NotImplementedError

    def build(self, architecture: dict) -> nn.Module:
        """An untrained model of ``architecture``, made under the caller's device context (meta, to assign a saved
        state), with everything a calibrated model's state holds beyond the family's own modules."""
        raise NotImplementedError

    def prepare_pretrained(self, model: nn.Module, architecture: dict, where: str, **options) -> None:
        """Make a model diffusers built from an exported ``config.json`` the model ``architecture`` describes
        (in place; a clear error naming ``where`` if it is another architecture)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for inputs x at timesteps t under condition y."""
        raise NotImplementedError

    def timestep_of(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The timestep argument of a call ``model(*args, **kwargs)`` (timestep-aware activation ranges)."""
        raise NotImplementedError

    def forward_batch(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward`` on a calibration batch ({x, t, y}), moved to the model's device."""
        device = next(model.parameters()).device
        return self.forward(model, *(batch[k].to(device) for k in ("x", "t", "y")))

    def null_condition(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of condition ``y`` (classifier-free guidance)."""
        raise NotImplementedError

    def role_map(self, model: nn.Module) -> RoleMap:
        raise NotImplementedError

    def units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, module) of the reconstruction units, in forward order."""
        raise NotImplementedError

    def rescalable_inputs(self, model: nn.Module) -> list[RescalableInput]:
        """Every input a method may rescale, block by block, in forward order."""
        raise NotImplementedError

    def require_exact_folds(self, model: nn.Module) -> None:
        """Refuse (before any work) a model whose modulated inputs have no exact fold point."""
        raise NotImplementedError

    def selected_roles(self, model: nn.Module, roles) -> set[str]:
        """The roles a method's ``roles`` option selects in this model (with the roles they imply)."""
        implies = self.role_map(model).implies
        return set(roles).union(*(implies.get(r, ()) for r in roles))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in forward order."""
        raise NotImplementedError

    def input_groups(self, model: nn.Module, exact_only: bool = False) -> dict[str, tuple[str, ...]]:
        """Input name -> the names (within a block) of the layers reading it, for every rescalable input of a
        block (``exact_only``: those with an exact fold)."""
        return {p.name: p.consumer_names for p in self.rescalable_inputs(model)
                if p.block == 0 and (p.exact or not exact_only)}

    def rescale_inputs(self, model: nn.Module, factors: dict[tuple[int, str], torch.Tensor]) -> None:
        """Divide each input (block, name) by its factor, folded where the adapter can (in forward order)."""
        for p in self.rescalable_inputs(model):
            if (p.block, p.name) in factors:
                p.rescale(factors[(p.block, p.name)])
