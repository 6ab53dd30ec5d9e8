"""Quantized drop-in replacements for nn.Linear / nn.Conv2d, and scoped switches for a model's quantizers."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.adaround import AdaRoundWeight
from ditquant.quant.affine import integer_codes
from ditquant.quant.lora import check_rank, low_rank_quantize
from ditquant.quant.pieces import ChannelDivisor, FloatLowRankBranch, LowRankBranch, Rotation, prepare_pieces
from ditquant.quant.quantizer import UniformQuantizer, grouped, quantize_tensor, ungrouped
from ditquant.quant.spec import QuantSpec


def scale_shape(spec: QuantSpec, weight: torch.Tensor, is_weight: bool) -> tuple[int, ...]:
    fan_in = weight[0].numel() if is_weight else weight.shape[1]
    if spec.granularity == "channel":
        return (weight.shape[0], 1)
    if spec.granularity == "column_group" and is_weight:
        if weight.shape[0] % spec.group_size:
            raise UserError(f"column group size {spec.group_size} does not divide out_features={weight.shape[0]}")
        return (weight.shape[0] * fan_in // spec.group_size, 1)
    if spec.granularity == "group":
        if fan_in % spec.group_size:
            raise UserError(f"group size {spec.group_size} does not divide in_features={fan_in}")
        return ((weight.shape[0], fan_in // spec.group_size, 1) if is_weight else (fan_in // spec.group_size, 1))
    return (1, 1) if is_weight else (spec.timestep_groups, 1)


class QuantLayer(nn.Module):
    """Wraps one Linear or Conv2d: y = layer(Q_a(x)) with weight Q_w(W). Keeps the FP weight for reconstruction.

    The quantized weight (the weight source) is, in order of precedence: the soft AdaRound weight while a
    reconstruction learns it (``adaround``), stored integer codes (``weight_codes``: AdaRound's hardened rounding,
    GPTQ's or low-rank compensation's), or round-to-nearest of W. Around it, the layer's pieces
    (``ditquant.quant.pieces``): ``input_transforms`` applied to x in front of the input quantizer (their inverse
    folded into W), and full-precision ``branches`` added to the output. With low-rank compensation
    (``compensate_low_rank``, DiTAS) the codes quantize W − L·R and a branch L·R reads the same quantized input:
    y = Q_w(W − L·R)·Q_a(x) + L·(R·Q_a(x)) + b.
    """

    def __init__(self, layer: nn.Module, weight_spec: QuantSpec, input_spec: QuantSpec, name: str = "",
                 role: Optional[str] = None):
        super().__init__()
        if isinstance(layer, nn.Conv2d) and input_spec.enabled and input_spec.granularity not in ("tensor",):
            raise UserError(f"{name}: convolution inputs support only per-tensor activation quantization")
        self.name, self.role = name, role  # role: what the family adapter calls this layer (qkv, fc1, ...)
        self.layer = layer
        self._make_quantizers(weight_spec, input_spec)
        self.adaround: Optional[AdaRoundWeight] = None
        self.register_buffer("weight_codes", None)
        self.input_transforms = nn.ModuleList()
        self.branches = nn.ModuleList()
        self._inference_weight: Optional[tuple[tuple, torch.Tensor]] = None

    def _make_quantizers(self, weight_spec: QuantSpec, input_spec: QuantSpec) -> None:
        w = self.layer.weight
        self.weight_quantizer = UniformQuantizer(weight_spec, True, scale_shape(weight_spec, w, True)).to(w.device)
        self.input_quantizer = UniformQuantizer(input_spec, False, scale_shape(input_spec, w, False)).to(w.device)

    @torch.no_grad()
    def set_specs(self, weight_spec: QuantSpec, input_spec: QuantSpec) -> None:
        """New quantizers (e.g. another group size), weights round-to-nearest; input ranges need observing again."""
        self._make_quantizers(weight_spec, input_spec)
        self._inference_weight = None
        self.init_weight_quantizer()

    @torch.no_grad()
    def init_weight_quantizer(self) -> None:
        if self.weight_quantizer.scale is not None:
            self.weight_quantizer.init_from(self.layer.weight)

    @property
    def learns_rounding(self) -> bool:
        """Whether AdaRound can apply: a static, enabled weight quantizer."""
        return self.weight_quantizer.scale is not None

    def start_adaround(self) -> AdaRoundWeight:
        """Attach learnable rounding on the weight quantizer's grid (soft start = the FP weight, hard = RTN)."""
        q = self.weight_quantizer
        self.adaround = AdaRoundWeight(grouped(self.layer.weight, q.spec, True), q.scale, q.zero_point, q.spec)
        self.weight_codes = None
        return self.adaround

    @torch.no_grad()
    def finish_adaround(self) -> None:
        """Harden the learned rounding into integer codes and drop the soft variables."""
        self.store_codes(self.adaround.hard_codes())
        self.adaround = None

    def store_codes(self, codes: torch.Tensor) -> None:
        self.weight_codes = codes.to(torch.int8 if self.weight_quantizer.spec.symmetric else torch.uint8)

    @property
    def frozen_weight(self) -> bool:
        """The quantized weight is no longer a function of the FP weight alone (codes or a low-rank branch): a
        re-parameterization of W must come before whatever produced it."""
        return self.weight_codes is not None or len(self.branches) > 0 or self.adaround is not None

    @torch.no_grad()
    def rotate_input(self, rotation: "Rotation") -> None:
        """x·Q at run time in front of the input quantizer, W ← W·Q (the FP function is unchanged); checked and done
        before the weight is fixed."""
        if not isinstance(self.layer, nn.Linear):
            raise UserError(f"{self.name}: only Linear inputs can be rotated")
        if self.frozen_weight:
            raise UserError(f"{self.name}: its quantized weight is already fixed; rotate the input before that")
        w = self.layer.weight
        q = rotation.matrix(w.shape[1])  # float64: the fold itself adds no error beyond the final rounding
        w.copy_((w.double() @ q).to(w.dtype))
        self.input_transforms.append(rotation)
        self.init_weight_quantizer()

    def divide_input(self, s: torch.Tensor) -> None:
        """x / s per channel at run time (the caller multiplied W's columns by s): merged into a trailing divisor."""
        last = self.input_transforms[-1] if len(self.input_transforms) else None
        if isinstance(last, ChannelDivisor):
            last.divisor = s * last.divisor
        else:
            self.input_transforms.append(ChannelDivisor(s.clone()))

    @torch.no_grad()
    def compensate_low_rank(self, rank: int, iterations: int) -> list[float]:
        """DiTAS's training-free LoRA: codes of Q(W − L·R) and the FP branch L·R; returns the error per iterate."""
        if not isinstance(self.layer, nn.Linear) or not self.learns_rounding:
            raise UserError(f"{self.name}: low-rank compensation needs a Linear with a static weight quantizer")
        q = self.weight_quantizer

        def quantize(w: torch.Tensor) -> torch.Tensor:  # explicit parameters: works while quantizers are bypassed
            q.init_from(w)
            return quantize_tensor(w, q.spec, True, q.scale, q.zero_point)

        result = low_rank_quantize(self.layer.weight, quantize, rank, iterations)
        q.init_from(result.quantized_input)
        self.store_codes(integer_codes(grouped(result.quantized_input, q.spec, True), q.scale, q.zero_point, q.spec))
        self.branches.append(LowRankBranch(result.left, result.right))
        return result.errors

    @torch.no_grad()
    def split_low_rank(self, rank: int) -> float:
        """SVDQuant's split: W = L·R + E with L·R the rank-``rank`` SVD of W kept in full precision as a branch
        that reads the FP input (after the input transforms), and only the residual E quantized (stored codes).
        Returns ‖W − (Q(E) + L·R)‖_F."""
        if not isinstance(self.layer, nn.Linear) or not self.learns_rounding:
            raise UserError(f"{self.name}: a low-rank branch needs a Linear with a static weight quantizer")
        if self.frozen_weight:
            raise UserError(f"{self.name}: its quantized weight is already fixed; split it before that")
        w, q = self.layer.weight, self.weight_quantizer
        check_rank(rank, w, f"low-rank branch ({self.name})")
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        left, right = (u[:, :rank] * s[:rank]).to(w.dtype), vh[:rank].to(w.dtype)
        residual = w - left @ right
        q.init_from(residual)
        codes = integer_codes(grouped(residual, q.spec, True), q.scale, q.zero_point, q.spec)
        self.store_codes(codes)
        self.branches.append(FloatLowRankBranch(left, right))
        return (w - self._fake_quantized_weight() - left @ right).norm().item()

    def quantized_weight(self) -> torch.Tensor:
        q, w = self.weight_quantizer, self.layer.weight
        if not q.enabled or q.bypass:
            return w
        if self.adaround is not None:
            return ungrouped(self.adaround(), w.shape, q.spec)
        if torch.is_grad_enabled():
            return self._fake_quantized_weight()
        # Sampling calls every layer hundreds of times with the same weight: reuse it while no tensor it depends on
        # has changed (in-place updates, including load_state_dict, bump a tensor's version).
        codes = self.weight_codes
        key = tuple((t.data_ptr(), t._version) for t in (w, q.scale, q.zero_point, codes) if t is not None)
        if self._inference_weight is None or self._inference_weight[0] != key:
            self._inference_weight = (key, self._fake_quantized_weight())
        return self._inference_weight[1]

    def effective_weight(self) -> torch.Tensor:
        """What the layer multiplies its quantized input by: Q_w(·) plus the low-rank branch, if any."""
        w = self.quantized_weight()
        if w is not self.layer.weight:
            for branch in self.branches:
                if branch.reads == "quantized":
                    w = w + branch.dense().reshape(w.shape)
        return w

    def _fake_quantized_weight(self) -> torch.Tensor:
        q, w = self.weight_quantizer, self.layer.weight
        if self.weight_codes is not None:
            return ungrouped((self.weight_codes.to(w.dtype) - q.zero_point) * q.scale, w.shape, q.spec)
        return q(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.input_transforms:
            x = transform(x)
        fp_input = x
        x = self.input_quantizer(x)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        out = F.linear(x, w, self.layer.bias)
        if w is not self.layer.weight:  # the FP model (quantizers off) has no branch
            for branch in self.branches:
                out = out + branch(x if branch.reads == "quantized" else fp_input)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint may hold codes (finished reconstruction), pieces, or soft rounding (a unit in progress): make
        # room for them before loading, so that a fresh model loads any checkpoint of the same configuration.
        saved = state_dict.get(prefix + "weight_codes")
        if saved is not None and self.weight_codes is None:
            self.weight_codes = torch.empty_like(saved)
        prepare_pieces(self, state_dict, prefix)
        if prefix + "adaround.alpha" in state_dict and self.adaround is None:
            self.start_adaround()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.name}: W {self.weight_quantizer.spec.label('w')}, A {self.input_quantizer.spec.label('a')}"


def fp_layer(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv2d behind a module, whether or not it is wrapped in a QuantLayer."""
    return module.layer if isinstance(module, QuantLayer) else module


def quant_layers(model: nn.Module) -> Iterator[QuantLayer]:
    return (m for m in model.modules() if isinstance(m, QuantLayer))


def quantizers(model: nn.Module) -> Iterator[UniformQuantizer]:
    return (m for m in model.modules() if isinstance(m, UniformQuantizer))


def activation_quantizers(model: nn.Module) -> list[UniformQuantizer]:
    """Every static activation quantizer (layer inputs and attention operands): the ones calibration observes."""
    return [q for q in quantizers(model) if q.learnable]


@contextlib.contextmanager
def bypassing(quantizer_list: list[UniformQuantizer]):
    """Let the given quantizers pass values through unchanged inside the block."""
    saved = [q.bypass for q in quantizer_list]
    for q in quantizer_list:
        q.bypass = True
    try:
        yield
    finally:
        for q, b in zip(quantizer_list, saved):
            q.bypass = b


@contextlib.contextmanager
def quant_disabled(model: nn.Module):
    """Run ``model`` in full precision inside the block (FP targets, FP reference samples)."""
    with bypassing(list(quantizers(model))):
        yield model


@contextlib.contextmanager
def activations_unquantized(model: nn.Module):
    """Quantized weights, FP activations (Q-Diffusion's weight-only reconstruction pass)."""
    with bypassing([q for q in quantizers(model) if not q.is_weight]):
        yield model


@contextlib.contextmanager
def observing_activations(model: nn.Module):
    """Record activation ranges (static quantizers) while running FP inputs through the layers."""
    observed = activation_quantizers(model)
    with quant_disabled(model):
        for q in observed:
            q.bypass, q.observing = False, True  # an observing quantizer sees its input and passes it on unchanged
        try:
            yield model
        finally:
            for q in observed:
                q.observing = False
                q.finish_observing()
