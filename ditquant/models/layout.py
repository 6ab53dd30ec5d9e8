"""Where things live in a diffusers DiT: the layer roles quantization configs and methods refer to.

This is the only module that knows diffusers' layer names. Roles:

- ``patch_embed``: the patchifying Conv2d (``pos_embed.proj``).
- ``timestep_mlp``: the timestep-embedder MLP (diffusers keeps one copy per block, all equal to the original's one).
- ``adaln``: each block's adaLN modulation linear (``norm1.linear``, 6 chunks: shift/scale/gate for attn and MLP).
- ``qkv``: ``attn1.to_q``, ``to_k``, ``to_v`` (three linears reading the same post-adaLN input).
- ``attn_out``: ``attn1.to_out.0``; ``fc1``: ``ff.net.0.proj``; ``fc2``: ``ff.net.2``.
- ``final_adaln``: ``proj_out_1``; ``final_linear``: ``proj_out_2``.
"""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from ditquant.errors import UserError

ROLE_PATTERNS = {
    "patch_embed": ("pos_embed.proj",),
    "timestep_mlp": ("transformer_blocks.*.norm1.emb.timestep_embedder.linear_1",
                     "transformer_blocks.*.norm1.emb.timestep_embedder.linear_2"),
    "adaln": ("transformer_blocks.*.norm1.linear",),
    "qkv": ("transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v"),
    "attn_out": ("transformer_blocks.*.attn1.to_out.0",),
    "fc1": ("transformer_blocks.*.ff.net.0.proj",),
    "fc2": ("transformer_blocks.*.ff.net.2",),
    "final_adaln": ("proj_out_1",),
    "final_linear": ("proj_out_2",),
}
ROLES = tuple(ROLE_PATTERNS)
# Reconstruction units in forward order: the patch embedding as a layer, every block, the final layers as layers.
UNIT_PATTERN = re.compile(r"pos_embed\.proj|transformer_blocks\.\d+|proj_out_1|proj_out_2")
BLOCK_LINEAR_ROLES = ("qkv", "attn_out", "fc1", "fc2")


def role_of(name: str) -> str | None:
    """The role of a module name, or None for modules no role covers."""
    for role, patterns in ROLE_PATTERNS.items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return role
    return None


def layers_by_role(model: nn.Module, roles) -> dict[str, nn.Module]:
    """Name -> module for every Linear/Conv2d of ``model`` whose role is in ``roles``, in forward order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise UserError(f"unknown layer role(s) {sorted(unknown)}; known roles: {', '.join(ROLES)}")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and role_of(name) in roles}


def reconstruction_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the units block reconstruction optimises one after the other, in forward order."""
    return [(name, m) for name, m in model.named_modules() if UNIT_PATTERN.fullmatch(name)]


# ---- the structure re-parameterizations need (PTQ4DiT balancing, DiTAS smoothing) ----

# The adaLN-Zero modulation linear (``norm1.linear``) produces six chunks of ``hidden`` channels, in this order.
ADALN_CHUNKS = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
# Which modulated activation feeds which linears: the attention input feeds q/k/v, the MLP input feeds fc1.
MODULATED_INPUTS = {"attention": ("shift_msa", "scale_msa", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                    "mlp": ("shift_mlp", "scale_mlp", ("ff.net.0.proj",))}
VALUE_PROJECTION, ATTENTION_OUTPUT = "attn1.to_v", "attn1.to_out.0"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise UserError(f"{type(model).__name__} has no transformer_blocks: not a diffusers DiT")
    return list(blocks)


def modulation_linear(block: nn.Module) -> nn.Module:
    """The block's adaLN-Zero linear (6 chunks); a clear error for blocks without one (e.g. PixArt's adaLN-single,
    whose shift/scale come from a table shared by all blocks: there is no per-block linear to fold into)."""
    norm = getattr(block, "norm1", None)
    linear = getattr(norm, "linear", None)
    weight = getattr(getattr(linear, "layer", linear), "weight", None)
    hidden = getattr(getattr(block, "attn1", None), "inner_dim", None)
    if weight is None or hidden is None or weight.shape[0] != len(ADALN_CHUNKS) * hidden:
        raise UserError(f"{type(block).__name__} with norm {type(norm).__name__} has no adaLN-Zero modulation "
                        f"(norm1.linear producing {'/'.join(ADALN_CHUNKS)}) to fold a per-channel factor into; "
                        "balancing and smoothing support DiT blocks (diffusers norm_type 'ada_norm_zero')")
    return linear
# The linears PTQ4DiT balances, grouped by the input they share (the first one is hooked to observe it).
BALANCED_INPUTS = {"attention": MODULATED_INPUTS["attention"][2], "attn_out": (ATTENTION_OUTPUT,),
                   "mlp": MODULATED_INPUTS["mlp"][2]}
# DiTAS also smooths fc2's input (after GELU: nothing to fold into, divided on the fly).
MLP_OUTPUT = "ff.net.2"
SMOOTHED_INPUTS = {**BALANCED_INPUTS, "fc2": (MLP_OUTPUT,)}
