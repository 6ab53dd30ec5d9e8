"""Where things live in a diffusers PixArt transformer (``PixArtTransformer2DModel``: adaLN-single blocks with
cross-attention to text), and the exact re-parameterizations its structure allows.

Roles (the DiT roles where the layer does the same job, so method configs name the same things):

- ``patch_embed``: ``pos_embed.proj``; ``timestep_mlp``: the timestep MLP of ``adaln_single`` (and, for PixArt-α
  1024, its resolution / aspect-ratio embedders); ``adaln``: ``adaln_single.linear`` — ONE modulation linear shared
  by every block (each block adds its own ``scale_shift_table``); ``caption_mlp``: ``caption_projection`` (text
  features -> model width, shared by every block's cross-attention).
- per block: ``qkv`` / ``attn_out`` (self-attention), ``cross_q`` (``attn2.to_q``, reads the residual stream),
  ``cross_kv`` (``attn2.to_k`` / ``to_v``, read the projected caption: timestep-independent), ``cross_out``
  (``attn2.to_out.0``), ``fc1`` / ``fc2``.
- ``final_linear``: ``proj_out``.

A config listing ``qkv`` / ``attn_out`` selects the cross-attention roles too (``IMPLIED_ROLES``), so the method
configs written for DiT (``roles: [qkv, attn_out, fc1, fc2]``) quantize every linear of a PixArt block; an override
by layer pattern (``transformer_blocks.*.attn2.*``) keeps the cross-attention at other bits.

adaLN-single and per-channel folds. A block's attention input is LN(x)·(1 + scale) + shift with
(shift, scale) = table_b + t, where t = adaln_single(timestep) is shared by all blocks. Dividing that input by s
cannot go into the shared linear's rows (every block would need its own s), so each block gets a per-channel
multiplier m_b on the shared modulation it reads: (table_b + m_b·t). The fold then is exact: table_scale ←
(1 + table_scale)/s − 1, table_shift ← table_shift/s, m_scale ← m_scale/s, m_shift ← m_shift/s. Its run-time cost
is one multiply of the (batch × 6·width) modulation per block — per sample, not per token (PixArt-α at 1024 px:
4,096 tokens per sample, so ~1/4096 of an elementwise pass over the block input). ``install_modulation_multipliers``
adds m_b (ones, a persistent buffer ``modulation_multiplier``) and the pre-hook applying it; with m_b = 1 the model
computes exactly what it computed before (x·1 = x in floating point).
"""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.models import folding

ROLE_PATTERNS = {
    "patch_embed": ("pos_embed.proj",),
    "timestep_mlp": ("adaln_single.emb.timestep_embedder.linear_*", "adaln_single.emb.resolution_embedder.linear_*",
                     "adaln_single.emb.aspect_ratio_embedder.linear_*"),
    "adaln": ("adaln_single.linear",),
    "caption_mlp": ("caption_projection.linear_1", "caption_projection.linear_2"),
    "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v"),
    "attn_out": ("transformer_blocks.*.attn1.to_out.0",),
    "cross_q": ("transformer_blocks.*.attn2.to_q",),
    "cross_kv": ("transformer_blocks.*.attn2.to_k", "transformer_blocks.*.attn2.to_v"),
    "cross_out": ("transformer_blocks.*.attn2.to_out.0",),
    "fc1": ("transformer_blocks.*.ff.net.0.proj",),
    "fc2": ("transformer_blocks.*.ff.net.2",),
    "final_linear": ("proj_out",),
}
ROLES = tuple(ROLE_PATTERNS)
# A config that names the block's attention roles (as the Q-DiT / DiTAS configs do: qkv, attn_out, fc1, fc2) means
# every attention's: the cross-attention's layers are quantized with the self-attention's.
IMPLIED_ROLES = {"qkv": ("cross_q", "cross_kv"), "attn_out": ("cross_out",)}
# Reconstruction units in forward order: every layer outside the blocks is a unit of its own (the shared timestep
# and caption MLPs run once, before the first block), every block is one.
UNITS_IN_ORDER = (re.compile(r"pos_embed\.proj"), re.compile(r"adaln_single\.emb\.\w+\.linear_\d"),
                  re.compile(r"adaln_single\.linear"), re.compile(r"caption_projection\.linear_\d"),
                  re.compile(r"transformer_blocks\.\d+"), re.compile(r"proj_out"))

# The shared modulation t has six chunks of ``width`` channels, in this order (as in adaLN-Zero).
MODULATION_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
MODULATED_INPUTS = {"attention": ("shift_msa", "scale_msa", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                    "mlp": ("shift_mlp", "scale_mlp", ("ff.net.0.proj",))}
# Inputs a method may rescale, per block: name -> (readers, fold).
RESCALABLE_INPUTS = {
    "attention": (MODULATED_INPUTS["attention"][2], "modulation"),
    "attn_out": (("attn1.to_out.0",), "value"),
    "cross_q": (("attn2.to_q",), "online"),      # the residual stream: nothing linear in front of it
    "cross_kv": (("attn2.to_k", "attn2.to_v"), "online"),  # the caption, shared by all blocks: text tokens only
    "cross_out": (("attn2.to_out.0",), "value"),
    "mlp": (MODULATED_INPUTS["mlp"][2], "modulation"),
    "fc2": (("ff.net.2",), "online"),
}
VALUES = {"attn_out": ("attn1.to_v", "attn1.to_out.0"), "cross_out": ("attn2.to_v", "attn2.to_out.0")}


def role_of(name: str) -> str | None:
    for role, patterns in ROLE_PATTERNS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return role
    return None


def layer_roles(model: nn.Module) -> dict[str, str]:
    """Name -> role of every Linear/Conv2d a role covers, in forward order."""
    return {name: role for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (role := role_of(name)) is not None}


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = list(model.named_modules())
    return [(name, m) for pattern in UNITS_IN_ORDER for name, m in modules if pattern.fullmatch(name)]


# ---- adaLN-single: the per-block multiplier on the shared modulation ----

def _apply_multiplier(block: nn.Module, args: tuple, kwargs: dict):
    timestep = kwargs.get("timestep")
    if timestep is None:
        raise RuntimeError("a PixArt block was called without its timestep keyword (the modulation)")
    kwargs["timestep"] = timestep * block.modulation_multiplier.to(timestep.dtype)
    return args, kwargs


def install_modulation_multipliers(model: nn.Module) -> None:
    """Give every block a multiplier m_b (ones) on the shared modulation it reads (idempotent)."""
    for block in model.transformer_blocks:
        if hasattr(block, "modulation_multiplier"):
            continue
        table = block.scale_shift_table  # (6, width)
        block.register_buffer("modulation_multiplier", torch.ones(table.numel(), dtype=table.dtype,
                                                                  device=table.device))
        block.register_forward_pre_hook(_apply_multiplier, with_kwargs=True)


def _chunk(name: str) -> int:
    return MODULATION_CHUNKS.index(name)


@torch.no_grad()
def fold_into_block_modulation(block: nn.Module, branch: str, s: torch.Tensor) -> None:
    """Divide the block's modulated ``branch`` input ("attention" or "mlp") by s: its table rows and its
    multiplier on the shared modulation, exactly; the readers' weight columns multiplied by s."""
    if not hasattr(block, "modulation_multiplier"):
        raise UserError("fold_into_block_modulation: the model has no per-block modulation multipliers; load it "
                        "through the PixArt adapter (install_modulation_multipliers)")
    shift_name, scale_name, readers = MODULATED_INPUTS[branch]
    consumers = [block.get_submodule(n) for n in readers]
    folding.ensure_foldable(consumers)
    table = block.scale_shift_table  # (6, width)
    multiplier = block.modulation_multiplier.view(len(MODULATION_CHUNKS), -1)
    s = folding.check_factor(s, table.shape[1], f"fold_into_block_modulation({branch})").to(table)
    shift, scale = _chunk(shift_name), _chunk(scale_name)
    table[shift] /= s
    table[scale] = (1 + table[scale]) / s - 1  # x·(1 + scale)/s = x·(1 + scale')
    multiplier[shift] /= s
    multiplier[scale] /= s
    folding.scale_input_columns(consumers, s)


@torch.no_grad()
def fold_into_value(block: nn.Module, name: str, s: torch.Tensor) -> None:
    """Divide an attention output projection's input (``attn_out`` or ``cross_out``) by s through V's rows."""
    value, out = VALUES[name]
    folding.fold_into_value(block, s, value_name=value, output_name=out)

