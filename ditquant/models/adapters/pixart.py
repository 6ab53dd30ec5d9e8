"""The text-to-image PixArt family: diffusers ``PixArtTransformer2DModel`` (adaLN-single blocks, cross-attention to
T5 text features), loaded by ``ditquant.models.pixart``; names and folds from ``ditquant.models.pixart_layout``.

The condition ``y`` of a batch is a row index into the model's prompt table (``attach_prompts``), whose last row is
the empty prompt, so the denoiser call, guidance pairs and calibration rows look exactly as for DiT.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.io import yaml_plain
from ditquant.models import folding, pixart_layout
from ditquant.models.adapters.base import Adapter, RescalableInput
from ditquant.models.pixart import PromptTable
from ditquant.quant.apply import RoleMap

_PROMPTS = "_ditquant_prompts"  # where the prompt table lives on the model (a plain attribute: never saved)


def attach_prompts(model: nn.Module, table: PromptTable) -> None:
    """Make ``table`` the prompts the model's condition indices refer to."""
    width = model.config.caption_channels
    if table.embeddings.shape[-1] != width:
        raise UserError(f"the prompt embeddings are {table.embeddings.shape[-1]} wide, but the transformer's caption "
                        f"projection takes caption_channels={width}")
    model.__dict__[_PROMPTS] = table


def prompts_of(model: nn.Module) -> PromptTable:
    table = model.__dict__.get(_PROMPTS)
    if table is None:
        raise UserError("this PixArt model has no prompt table: encode the prompts (ditquant.models.pixart."
                        "encode_prompts) and attach them (attach_prompts) before calling it")
    return table


class PixArtAdapter(Adapter):
    family = "pixart"
    roles = pixart_layout.ROLES

    def matches(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return hasattr(model, "adaln_single") and getattr(config, "norm_type", None) == "ada_norm_single"

    def load(self, source):
        from ditquant.models.pixart import load_pixart

        return load_pixart(source)

    def architecture(self, model: nn.Module) -> dict:
        return {k: yaml_plain(v) for k, v in model.config.items()
                if not k.startswith("_") and k != "quantization_config"}  # diffusers' bookkeeping, an export's own

    def build(self, architecture: dict) -> nn.Module:
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel.from_config(architecture)
        pixart_layout.install_modulation_multipliers(model)  # calibrated states hold the folded multipliers
        return model

    def prepare_pretrained(self, model: nn.Module, architecture: dict, where: str, **options) -> None:
        if (built := self.architecture(model)) != architecture:
            differ = sorted(k for k in built.keys() | architecture.keys() if built.get(k) != architecture.get(k))
            raise UserError(f"{where}: config.json and its quantization_config describe different PixArt "
                            f"transformers (they differ in {differ})")
        pixart_layout.install_modulation_multipliers(model)

    def condition(self, model: nn.Module, y: torch.Tensor, x: torch.Tensor) -> dict:
        """The transformer's keyword arguments for condition indices ``y`` at inputs ``x``: the prompts'
        embeddings and masks, and for PixArt-α 1024 the resolution / aspect-ratio condition the pipeline passes."""
        table = prompts_of(model)
        index = y.long().cpu()
        if index.min() < 0 or index.max() > table.null_index:
            raise UserError(f"condition index out of range: the prompt table has {table.null_index} prompts and the "
                            f"empty prompt at {table.null_index}")
        kwargs = {"encoder_hidden_states": table.embeddings[index].to(x.device, model.dtype),
                  "encoder_attention_mask": table.mask[index].to(x.device)}
        sizes = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            height, width = (side * table.vae_scale_factor for side in x.shape[-2:])
            batch = x.shape[0]
            sizes = {"resolution": torch.tensor([height, width], dtype=model.dtype, device=x.device).repeat(batch, 1),
                     "aspect_ratio": torch.tensor([height / width], dtype=model.dtype,
                                                  device=x.device).repeat(batch, 1)}
        kwargs["added_cond_kwargs"] = sizes
        return kwargs

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x.to(model.dtype), timestep=t, return_dict=False, **self.condition(model, y, x))[0]
        return out.to(x.dtype)

    def timestep_of(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        return kwargs["timestep"] if "timestep" in kwargs else (args[2] if len(args) > 2 else None)

    def null_condition(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, prompts_of(model).null_index)

    def num_classes(self, model: nn.Module) -> int:
        return prompts_of(model).null_index  # the prompts play the classes' part

    def role_map(self, model: nn.Module) -> RoleMap:
        return RoleMap(roles=pixart_layout.ROLES, layers=pixart_layout.layer_roles(model),
                       implies=pixart_layout.IMPLIED_ROLES)

    def units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return pixart_layout.reconstruction_units(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer_blocks)

    def rescalable_inputs(self, model: nn.Module) -> list[RescalableInput]:
        pixart_layout.install_modulation_multipliers(model)  # a model not loaded through load_pixart
        points = []
        for b, block in enumerate(self.blocks(model)):
            for name, (consumer_names, fold) in pixart_layout.RESCALABLE_INPUTS.items():
                value = fold == "value"
                attention = block.get_submodule(pixart_layout.VALUES[name][0].rpartition(".")[0]) if value else None
                points.append(RescalableInput(
                    block=b, name=name, role=pixart_layout.role_of(f"transformer_blocks.{b}.{consumer_names[0]}"),
                    consumers=tuple(block.get_submodule(c) for c in consumer_names), consumer_names=consumer_names,
                    fold=fold, rescale=self._rescaler(block, name, fold, consumer_names),
                    head_dim=attention.inner_dim // attention.heads if value else None,
                    rotate=self._rotator(block, name) if value else None))
        return points

    def require_exact_folds(self, model: nn.Module) -> None:
        pixart_layout.install_modulation_multipliers(model)  # adaLN-single folds through them (exact)

    @staticmethod
    def _rescaler(block: nn.Module, name: str, fold: str, consumer_names: tuple[str, ...]):
        if fold == "modulation":
            return lambda s: pixart_layout.fold_into_block_modulation(block, name, s)
        if fold == "value":
            return lambda s: pixart_layout.fold_into_value(block, name, s)

        def online(s: torch.Tensor) -> None:
            for consumer in consumer_names:  # q alone, or k and v reading the same caption features
                folding.divide_online(block.get_submodule(consumer), s)
        return online

    @staticmethod
    def _rotator(block: nn.Module, name: str):
        value_name, output_name = pixart_layout.VALUES[name]
        return lambda q: folding.rotate_into_value(block, q, value_name=value_name, output_name=output_name)
