"""The class-conditional DiT family: diffusers ``DiTTransformer2DModel`` (adaLN-Zero blocks), loaded from original
checkpoints, diffusers folders and pipelines, the hub, or the bundled model (``ditquant.models.loading``); layer
names and block structure from ``ditquant.models.layout``, exact folds from ``ditquant.models.folding``."""

from __future__ import annotations

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.models import folding, layout
from ditquant.models.dit import DiTConfig, build_dit, config_of, set_class_dropout, use_original_numerics
from ditquant.models.adapters.base import Adapter, RescalableInput
from ditquant.quant.apply import RoleMap

# Per block, the inputs a method may rescale: name -> (role of its readers, fold).
_INPUTS = {"attention": ("qkv", "modulation"), "attn_out": ("attn_out", "value"), "mlp": ("fc1", "modulation"),
           "fc2": ("fc2", "online")}


class DiTAdapter(Adapter):
    family = "dit"
    roles = layout.ROLES

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (hasattr(model, "transformer_blocks") and getattr(config, "norm_type", None) == "ada_norm_zero"
                and getattr(config, "num_embeds_ada_norm", None) is not None)

    def load(self, source):
        from ditquant.models.loading import load_dit

        return load_dit(source)

    def architecture(self, model: nn.Module) -> dict:
        return config_of(model).to_dict()

    def build(self, architecture: dict) -> nn.Module:
        return build_dit(DiTConfig(**architecture))

    def prepare_pretrained(self, model: nn.Module, architecture: dict, where: str,
                           original_numerics: bool = True) -> None:
        config = DiTConfig(**architecture)
        set_class_dropout(model, config.class_dropout_prob)  # a module attribute diffusers' config lacks
        if config_of(model) != config:
            raise UserError(f"{where}: config.json describes {config_of(model)}, but its quantization_config was "
                            f"made for {config}")
        if original_numerics:
            use_original_numerics(model)

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # a model whose float parts run in another dtype (bf16) gets its input in it and gives float32 back
        return model(x.to(model.dtype), t, y).sample.to(x.dtype)

    def timestep_of(self, args: tuple, kwargs: dict):
        return kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)

    def null_condition(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, model.config.num_embeds_ada_norm)  # the label table's extra row

    def num_classes(self, model: nn.Module) -> int:
        return model.config.num_embeds_ada_norm

    def role_map(self, model: nn.Module) -> RoleMap:
        layers = {name: layout.role_of(name) for name in layout.layers_by_role(model, layout.ROLES)}
        return RoleMap(roles=layout.ROLES, layers=layers)

    def units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return layout.reconstruction_units(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return layout.transformer_blocks(model)

    def rescalable_inputs(self, model: nn.Module) -> list[RescalableInput]:
        points = []
        for b, block in enumerate(self.blocks(model)):
            for name, consumers in layout.SMOOTHED_INPUTS.items():
                role, fold = _INPUTS[name]
                value = fold == "value"
                points.append(RescalableInput(
                    block=b, name=name, role=role, consumers=tuple(block.get_submodule(c) for c in consumers),
                    consumer_names=consumers, fold=fold, rescale=self._rescaler(block, name, fold),
                    head_dim=block.attn1.inner_dim // block.attn1.heads if value else None,
                    rotate=(lambda q, block=block: folding.rotate_into_value(block, q)) if value else None))
        return points

    def require_exact_folds(self, model: nn.Module) -> None:
        folding.require_modulation(model)

    @staticmethod
    def _rescaler(block: nn.Module, name: str, fold: str):
        if fold == "modulation":
            return lambda s: folding.fold_into_modulation(block, name, s)
        if fold == "value":
            return lambda s: folding.fold_into_value(block, s)
        return lambda s: folding.divide_online(block.get_submodule(layout.SMOOTHED_INPUTS[name][0]), s)
