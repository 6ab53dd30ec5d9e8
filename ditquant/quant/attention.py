"""Quantized attention matmuls: Q·Kᵀ and softmax(·)·V with fake-quantized operands (PTQ4DiT / Q-Diffusion style).

The processor replaces diffusers' ``AttnProcessor2_0`` on self-attention and on cross-attention to text (K and V
from the text features, the text mask added to the scores as diffusers does). Q is quantized after the 1/√d
scaling (as PTQ4DiT does); the softmax probabilities use an unsigned grid whose zero point is 0 (they are ≥ 0, so a
min–max range starts at 0). The softmax itself, the head split and the output projection's input stay as they are
(the projection is a QuantLayer with its own input quantizer).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.quantizer import UniformQuantizer
from ditquant.quant.spec import QuantSpec

OPERANDS = ("query", "key", "probs", "value")


class QuantAttnProcessor(nn.Module):
    """A diffusers attention processor with one quantizer per matmul operand."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if spec.granularity != "tensor":
            raise UserError(f"attention operands support per-tensor quantization only, got {spec.granularity!r}")
        for operand in OPERANDS:
            setattr(self, f"{operand}_quantizer", UniformQuantizer(spec, is_weight=False))

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                temb=None, **kwargs) -> torch.Tensor:
        batch = hidden_states.shape[0]
        heads = attn.heads
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # cross-attention: text

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        query = self.query_quantizer(query / math.sqrt(query.shape[-1]))
        key = self.key_quantizer(key)
        scores = query @ key.transpose(-1, -2)
        if attention_mask is not None:  # an additive bias (PixArt's text mask: -10000 on padding), as diffusers'
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            scores = scores + mask.view(batch, heads, -1, mask.shape[-1])
        probs = self.probs_quantizer(scores.softmax(dim=-1))
        out = probs @ self.value_quantizer(value)
        out = out.transpose(1, 2).reshape(batch, hidden_states.shape[1], -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def attention_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s attention modules (what ``quant.overrides[].layers`` patterns with an attention
    spec match)."""
    from diffusers.models.attention_processor import Attention

    return [name for name, m in model.named_modules() if isinstance(m, Attention)]


def quantize_attention(model: nn.Module, spec_for: Callable[[str], Optional[QuantSpec]]) -> int:
    """Install a QuantAttnProcessor in every attention of ``model`` (self and cross) that ``spec_for`` (attention
    module name -> spec, or None to keep its matmuls in floating point) gives a spec; returns how many."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention) and (spec := spec_for(name)) is not None:
            processor = QuantAttnProcessor(spec)
            processor.__dict__["replaced"] = module.processor  # not a submodule: never saved (see wrapped_view)
            module.set_processor(processor)
            count += 1
    return count
