"""IntLinear: a calibrated QuantLayer as integers — int8 or packed int4 weights, int8 activations, int8 GEMMs
(``torch._int_mm``, or oneDNN's quantized linear on x86 CPUs: ``RunOptions``).

With activation codes a (zero point z_a) and weight codes w (zero point z_w), over k input channels sharing one
activation scale s_a and one weight scale s_w:

    Σ_j s_a (a_j − z_a) · s_w (w_j − z_w) = s_a s_w · [A·Wᵀ − z_a·C_w − (R_a − k·z_a)·z_w],

with C_w = Σ_j w_j (per output, precomputed) and R_a = Σ_j a_j (per token, only when z_w ≠ 0). A·Wᵀ is one
int8 × int8 → int32 GEMM; the zero-point terms are rank-1 corrections, so asymmetric activations stay integer.
Codes are stored as int8: unsigned 8-bit activation codes (0–255) are shifted by −128 together with their zero
point; weights are stored as w − z_w whenever that fits in int8 (symmetric weights, asymmetric ones up to 7 bits,
int4 after unpacking), so z_w = 0 in the GEMM; only asymmetric 8-bit weights keep z_w − 128 as ``weight_offset``.
With group-wise scales the GEMM runs once per group of k channels and the partial results are scaled and summed.

The activation codes are computed exactly as the fake quantizer computes them (same division, rounding and clamp),
so the integer layer reproduces the fake-quantized one up to float summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ditquant.errors import UserError
from ditquant.integer.packing import unpack_int4
from ditquant.quant.affine import qparams_from_range
from ditquant.quant.pieces import prepare_pieces
from ditquant.quant.quantizer import grouped
from ditquant.quant.spec import QuantSpec
from ditquant.quant.timesteps import current_rows, group_of

INT8_SHIFT = 128  # unsigned 8-bit codes 0..255 -> int8 -128..127
log = logging.getLogger(__name__)
OPTIONAL_BUFFERS = ("weight_offset", "bias", "input_scale", "input_zero", "input_timestep_edges")


@dataclass
class RunOptions:
    """How integer layers run (``run_options``; the speed benchmark's A/B switches them).

    Args:
        fused_quantization: quantize inputs with one kernel that torch.compile (inductor) generates for the
            division, rounding, zero point, clamp and cast, instead of five eager passes; the same arithmetic, so
            the same codes (tested). Compiled once per process and input rank (seconds, cached on disk by
            inductor); where it cannot compile (no C++ compiler, no triton on CUDA) a warning, then eager.
            ``DITQUANT_FUSED_QUANTIZATION=0`` turns it off.
        keep_unpacked: unpack int4 weights once and keep the int8 copy (beside the packed one, which is what is
            saved; in oneDNN's layout where ``onednn`` runs the layer) instead of unpacking on every call. Off:
            nothing unpacked is held between calls, at the cost of speed (the benchmark's peak memory was not lower:
            README, Integer inference).
        onednn: on x86 CPUs, run layers with a static per-tensor activation range and one scale per output channel
            as oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``): the int8 weight is reordered
            once into oneDNN's blocked layout (AMX, VNNI or AVX2) and kept beside the stored one, and the rescale, bias
            and cast to the output dtype run inside the GEMM. Same integer products; the float rescale is oneDNN's
            (outputs equal ``torch._int_mm``'s up to float rounding). Off: ``torch._int_mm`` everywhere.
            On CPUs without int8 dot products (``int8_dot_products``), only where that is exact
            (``pairs_fit_int16``), with the codes made unsigned.
        float_exact_gemm: on CPU, run the int8 GEMMs as exact float32 GEMMs (``float_exact_mm``, equal to
            ``torch._int_mm`` bit for bit) instead of ``torch._int_mm``. None (default): where the CPU has no int8
            dot products, on which they are many times faster.
    """

    fused_quantization: bool = os.environ.get("DITQUANT_FUSED_QUANTIZATION", "1") != "0"
    keep_unpacked: bool = True
    onednn: bool = True
    float_exact_gemm: Optional[bool] = None


RUN = RunOptions()


@contextlib.contextmanager
def run_options(**changes):
    """Integer layers run with ``changes`` to ``RUN`` inside the block."""
    saved = dataclasses.replace(RUN)
    for name, value in changes.items():
        if not hasattr(RUN, name):
            raise TypeError(f"run_options: no option {name!r}")
        setattr(RUN, name, value)
    try:
        yield RUN
    finally:
        for f in dataclasses.fields(RUN):
            setattr(RUN, f.name, getattr(saved, f.name))


def code_shift(spec: QuantSpec) -> int:
    """What is subtracted from a spec's codes (and zero point) to make them int8."""
    return INT8_SHIFT if spec.qmax > 127 else 0


def scale_groups(spec: QuantSpec, in_features: int) -> int:
    """How many scales a row of ``in_features`` channels has under ``spec`` (1 unless group-wise)."""
    return in_features // spec.group_size if spec.granularity == "group" else 1


@functools.cache
def int8_dot_products() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI or AMX), which oneDNN's int8 kernels and
    ``torch._int_mm`` need to be fast: without them (AVX2-only CPUs such as AMD Zen 1–3) ``torch._int_mm`` is ~25×
    slower than a float32 matmul of the same shape, and oneDNN's quantized linear runs a reference kernel for signed
    activation codes (measured 12.6 s for one 256 × 1152 × 1152 GEMM) and saturates for large weights
    (``pairs_fit_int16``)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_vnni_supported", "_is_amx_tile_supported"))


def pairs_fit_int16(max_activation: int, max_abs_weight: int) -> bool:
    """Whether an int8 GEMM of unsigned activation codes (at most ``max_activation``) and int8 weights (|w| at most
    ``max_abs_weight``) is exact on a CPU without int8 dot products. There oneDNN multiplies u8 × s8 with AVX2's
    ``vpmaddubsw``, which adds each two neighbouring channels' products in int16 *with saturation*: 255 · 64 · 2
    fits, 255 · 65 · 2 does not (measured: exact at |w| ≤ 64, off by 49,024 at 65). So 4-bit weights always fit
    beside 8-bit activations, and per-channel 8-bit weights (|w| up to 127) never do."""
    return 2 * max_activation * max_abs_weight <= 2**15 - 1


FLOAT_EXACT_K = 2**24 // (128 * 128)  # int8 × int8 partial sums over this many channels are exact in float32


def float_exact_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (m, k) × int8 (k, n) -> int32, equal to ``torch._int_mm``, as float32 GEMMs over slices of at most
    ``FLOAT_EXACT_K`` channels: every |product| ≤ 2¹⁴, so each slice's sums stay below 2²⁴ and are exact in float32
    whatever the summation order; the slices are added in int32."""
    out = None
    for start in range(0, a.shape[1], FLOAT_EXACT_K):
        cols = slice(start, start + FLOAT_EXACT_K)
        part = torch.mm(a[:, cols].float(), b[cols].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (m, k) × int8 (k, n) -> int32, as ``torch._int_mm``; on CUDA, m ≤ 16 is padded (cuBLASLt needs m > 16);
    on CPU, exact float32 GEMMs (``float_exact_mm``) where ``RunOptions.float_exact_gemm`` says so."""
    if a.is_cuda and a.shape[0] <= 16:
        return torch._int_mm(F.pad(a, (0, 0, 0, 17 - a.shape[0])), b)[: a.shape[0]]
    if a.device.type == "cpu" and not torch.compiler.is_compiling() and (
            not int8_dot_products() if RUN.float_exact_gemm is None else RUN.float_exact_gemm):
        return float_exact_mm(a, b)
    return torch._int_mm(a, b)


def _eager_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int,
                 dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Codes clamp(round(g / scale) + zero, lo, hi) as ``dtype``, computed in float32 whatever g's dtype — the fake
    quantizer's arithmetic, step for step."""
    return torch.div(g.float(), scale).round_().add_(zero).clamp_(lo, hi).to(dtype)


def _eager_corrected(y: torch.Tensor, u: torch.Tensor, offset: torch.Tensor, gelu: Optional[str],
                     dtype: torch.dtype) -> torch.Tensor:
    """y − u ⊗ offset (the weight zero point's term), then the fused GELU if any, as ``dtype``."""
    y = torch.addr(y, u, offset, alpha=-1)
    return (y if gelu is None else F.gelu(y, approximate=gelu)).to(dtype)


@functools.cache
def _fused(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _maybe_fused(fn: Callable, *args):
    """``fn(*args)``, compiled into one kernel if ``RUN.fused_quantization`` (see ``RunOptions``)."""
    if RUN.fused_quantization and not torch.compiler.is_compiling():  # a compiled model fuses it by itself
        try:
            return _fused(fn)(*args)
        except (RuntimeError, OSError) as e:  # compilation unavailable here (inductor's errors are RuntimeErrors)
            log.warning("fused integer kernels unavailable (%s: %s); eager from now on", type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            RUN.fused_quantization = False
    return fn(*args)


def input_codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int,
                dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``_eager_codes``, fused into one kernel if ``RUN.fused_quantization``."""
    return _maybe_fused(_eager_codes, g, scale, zero, lo, hi, dtype)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's quantized linear for x86 CPUs (on CPUs without int8 dot products it
    is fast only for unsigned activation codes: ``IntLinear._runs_onednn``)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


@functools.cache
def onednn_writes(dtype: torch.dtype) -> torch.dtype:
    """The dtype to ask oneDNN's quantized linear for, wanting ``dtype``: bf16 / fp16 only where this CPU has them
    natively; elsewhere it runs a reference kernel for them (measured on AVX2: 24 s against 0.03 s for a 512 × 1,152
    × 1,152 GEMM), so float32, cast after."""
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return dtype if dtype not in native or native[dtype]() else torch.float32


def _version_key(tensors) -> tuple:
    """Changes whenever one of ``tensors`` is replaced or modified in place (what a derived cache depends on);
    inference tensors (made under inference_mode) have no version counter."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors if t is not None)


class IntLinear(nn.Module):
    """y = Q_a(x) · Q_w(W)ᵀ + b computed with integer GEMMs (see the module doc); optionally a patchifying Conv2d
    (kernel = stride = ``patch``, no padding), run as a linear over the image's patches.

    Buffers: ``weight`` (int8 (out, in), or uint8 (out, in/2) packed for ≤ 4 bits), ``weight_scale`` (out, groups),
    ``weight_zero`` (int8 zero points subtracted after unpacking int4), ``weight_offset`` (asymmetric 8-bit weights:
    z_w − 128), ``input_scale`` / ``input_zero`` (static activations: the fake quantizer's scale and zero point; one
    per timestep group, with the ``input_timestep_edges`` between the groups, for timestep-aware ranges),
    ``bias``; and the fake-quantized layer's pieces (``ditquant.quant.pieces``), run in floating point:
    ``input_transforms`` before quantization and ``branches`` added to the output.
    """

    def __init__(self, out_features: int, in_features: int, weight_spec: QuantSpec, input_spec: QuantSpec,
                 name: str = "", patch: Optional[int] = None):
        super().__init__()
        if not weight_spec.enabled:
            raise UserError(f"{name}: an integer layer needs a quantized weight")
        if weight_spec.granularity == "column_group":
            raise UserError(f"{name}: the 'column_group' weight layout has scales that vary along both the output and "
                            "the input channels, which no integer GEMM can rescale; use granularity 'channel' or "
                            "'group' for integer inference")
        self.name, self.patch = name, patch
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.input_spec = weight_spec, input_spec
        sizes = {s.group_size for s in (weight_spec, input_spec) if s.enabled and s.granularity == "group"}
        if len(sizes) > 1:
            raise UserError(f"{name}: weight and activation groups must have the same size, got {sorted(sizes)}")
        self.block = sizes.pop() if sizes else in_features  # channels sharing one weight and one activation scale
        self.packed = weight_spec.bits <= 4
        self.register_buffer("weight", torch.empty(out_features, in_features // 2 if self.packed else in_features,
                                                   dtype=torch.uint8 if self.packed else torch.int8))
        groups = scale_groups(weight_spec, in_features)
        self.register_buffer("weight_scale", torch.empty(out_features, groups))
        self.register_buffer("weight_zero", torch.empty(out_features, groups, dtype=torch.int8) if self.packed else None)
        for name_ in OPTIONAL_BUFFERS:
            self.register_buffer(name_, None)
        self.input_transforms = nn.ModuleList()
        self.branches = nn.ModuleList()
        self.gelu: Optional[str] = None  # a GELU that follows this layer, run by it (its ``approximate``; fuse_gelu)
        self._cache: Optional[tuple[tuple, dict]] = None
        self._unpacked: Optional[tuple[tuple, torch.Tensor]] = None
        self._prepacked: Optional[tuple[tuple, torch.Tensor]] = None  # oneDNN's blocked copy of the int8 weight

    def __getstate__(self):  # copies and pickles drop the derived caches (a oneDNN tensor has no storage to copy)
        return {**self.__dict__, "_cache": None, "_unpacked": None, "_prepacked": None}

    # ---- weights ----

    def integer_weight(self) -> torch.Tensor:
        """The int8 weight w − z_w (out, in) the GEMM reads (int4: unpacked, and kept while the packed weight does
        not change if ``RUN.keep_unpacked``; in a compiled graph, unpacked in it)."""
        if not self.packed:
            return self.weight
        if torch.compiler.is_compiling():  # no cache there: dynamo would guard on its key and recompile per layer
            return self._unpack()
        key = _version_key((self.weight, self.weight_zero))
        if RUN.keep_unpacked and self._unpacked is not None and self._unpacked[0] == key:
            return self._unpacked[1]
        w = self._unpack()
        self._unpacked = (key, w) if RUN.keep_unpacked else None
        return w

    def _unpack(self) -> torch.Tensor:
        return unpack_int4(self.weight).view(torch.int8).sub_(self._per_channel(self.weight_zero))

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group (out, groups) tensor repeated over each group's input channels: (out, in)."""
        return t.repeat_interleave(self.in_features // t.shape[1], dim=1)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weight: codes, scales, zero points."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers() if name.startswith("weight"))

    def dequantized_weight(self) -> torch.Tensor:
        """s_w (w − z_w) as float (weight-only layers, and checks)."""
        w = self.integer_weight().float()
        if self.weight_offset is not None:
            w = w - self._per_channel(self.weight_offset)
        return w * self._per_channel(self.weight_scale)

    # ---- activations ----

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int8 codes (tokens, in) of x (…, in), with the scale and shifted zero point per token (or one row for
        all tokens) and activation group: (tokens | 1, groups)."""
        spec, shift = self.input_spec, code_shift(self.input_spec)
        if self.input_timestep_edges is not None:  # one static range per timestep group: per sample
            g = x.reshape(x.shape[0], -1)
            group = group_of(current_rows(x.shape[0]).to(x.device), self.input_timestep_edges)
            scale, zero = self.input_scale[group], self.input_zero[group]
        else:
            g = grouped(x, spec, False)
            if spec.dynamic:
                g = g.float()
                scale, zero = qparams_from_range(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), spec)
            else:
                scale, zero = self.input_scale, self.input_zero
        codes = input_codes(g, scale, zero - shift, spec.qmin - shift, spec.qmax - shift).reshape(-1, self.in_features)
        groups = scale_groups(spec, self.in_features)
        scale, zero = scale.reshape(-1, groups), (zero - shift).reshape(-1, groups)
        if (spec.granularity == "sample" or self.input_timestep_edges is not None) and scale.shape[0] > 1:
            # one range per sample -> per token
            tokens = codes.shape[0] // scale.shape[0]
            scale, zero = scale.repeat_interleave(tokens, 0), zero.repeat_interleave(tokens, 0)
        return codes, scale, zero

    @staticmethod
    def _blockwise(t: torch.Tensor, size: int) -> torch.Tensor:
        return t.repeat_interleave(size // t.shape[1], dim=1) if t.shape[1] < size else t

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # the model's float parts may run in bf16; this layer's pieces and rescale run in float32
        if self.patch is not None or len(self.input_transforms) or len(self.branches) or not self.input_spec.enabled:
            x = x.float()  # otherwise the quantization kernel reads x as it is and computes in float32
        if self.patch is not None:  # (B, C, H, W) -> (B·L, C·p·p) patches in the weight's (C, kh, kw) order
            batch, _, height, width = x.shape
            x = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        lead = x.shape[:-1]
        for transform in self.input_transforms:
            x = transform(x)
        if not self.input_spec.enabled:  # weight-only quantization
            xq = x.reshape(-1, self.in_features)
            y = F.linear(xq, self.dequantized_weight(), self.bias)
        else:
            codes, scale, zero = self.quantize_input(x)
            fused_gelu = None if len(self.branches) else self.gelu  # branches are added before the GELU
            y = self._integer_matmul(codes, scale, zero, torch.float32 if len(self.branches) else dtype, fused_gelu)
            if any(b.reads == "quantized" for b in self.branches):  # those branches read the dequantized input
                xq = ((codes.float().view(codes.shape[0], scale.shape[1], -1) - zero[..., None]) * scale[..., None]
                      ).view(codes.shape)
        for branch in self.branches:
            y = y + branch(xq if branch.reads == "quantized" else x.reshape(-1, self.in_features))
        if self.gelu is not None and (len(self.branches) or not self.input_spec.enabled):
            y = F.gelu(y, approximate=self.gelu)
        y = y.reshape(*lead, self.out_features)
        if self.patch is not None:
            y = y.transpose(1, 2).reshape(batch, self.out_features, height // self.patch, width // self.patch)
        return y.to(dtype)

    def _constants(self) -> dict:
        """Per-output vectors of the rescale, per block (out, blocks), cached while no tensor they derive from
        changes: s_w, s_w·C_w, s_w·z_w and, for a static per-tensor activation range, c = s_a·s_w and
        d = −z_a·s_a·s_w·C_w (+ b). In a compiled graph they are computed in it (see ``integer_weight``)."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            key = _version_key((self.weight, self.weight_scale, self.weight_zero, self.weight_offset,
                                self.input_scale, self.input_zero, self.bias))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        blocks = self.in_features // self.block
        w_scale = self._blockwise(self.weight_scale, blocks)
        w = self._unpack() if self.packed else self.weight  # not kept: the oneDNN path keeps its own copy
        sums = w.view(self.out_features, blocks, self.block).sum(-1, dtype=torch.int32).float()
        constants = {"w_scale": w_scale, "sums": w_scale * sums, "offset": None, "c": None, "d": None,
                     "max_abs_weight": None if compiling else max(-int(w.min()), int(w.max()))}  # pairs_fit_int16
        if self.weight_offset is not None:
            constants["offset"] = w_scale * self._blockwise(self.weight_offset, blocks)
        if self.input_scale is not None and self.input_spec.granularity == "tensor" and self.input_scale.numel() == 1:
            shift = code_shift(self.input_spec)
            scale, zero = self.input_scale.reshape(()), self.input_zero.reshape(()) - shift
            constants["c"] = scale * w_scale
            constants["d"] = -zero * scale * constants["sums"]
            if self.bias is not None and blocks == 1:
                constants["d"] = constants["d"] + self.bias[:, None]
        if not compiling:
            self._cache = (key, constants)
        return constants

    def _integer_matmul(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out_dtype: torch.dtype,
                        gelu: Optional[str]) -> torch.Tensor:
        """The rescaled output (tokens, out), in ``out_dtype`` or float32, with ``gelu`` (an ``approximate``)
        applied if given."""
        k = self._constants()
        blocks = self.in_features // self.block
        if blocks == 1 and self._runs_onednn(codes, k):
            return self._onednn_matmul(codes, scale, zero, k, out_dtype, gelu)
        w = self.integer_weight()
        if blocks == 1:
            y = self._scaled(int_mm(codes, w.t()), codes, scale, zero, k, 0, with_bias=True)
        else:
            scale, zero = self._blockwise(scale, blocks), self._blockwise(zero, blocks)
            y = None
            for b in range(blocks):
                cols = slice(b * self.block, (b + 1) * self.block)
                a = codes[:, cols].contiguous()
                part = self._scaled(int_mm(a, w[:, cols].t()), a, scale[:, b:b + 1], zero[:, b:b + 1], k, b, False)
                y = part if y is None else y.add_(part)
            y = y if self.bias is None else y.add_(self.bias)
        return y if gelu is None else F.gelu(y, approximate=gelu)

    def _runs_onednn(self, codes: torch.Tensor, k: dict) -> bool:
        """``RUN.onednn`` applies: x86 CPU, eager, one static activation range; a reduction length that fills
        oneDNN's int8 tiles (64 bytes): it runs a reference kernel, about 500× slower, for the 16-channel patches;
        and, on a CPU without int8 dot products, weights small enough for its u8 × s8 kernel to be exact."""
        return (RUN.onednn and codes.device.type == "cpu" and self.in_features % 64 == 0
                and (RUN.keep_unpacked or not self.packed)
                and self.input_timestep_edges is None
                and self.input_spec.granularity == "tensor" and self.input_scale is not None
                and self.input_scale.numel() == 1 and not torch.compiler.is_compiling() and onednn_linear_available()
                and (int8_dot_products() or pairs_fit_int16(self.input_spec.qmax - code_shift(self.input_spec)
                                                             + INT8_SHIFT, k["max_abs_weight"])))

    def _onednn_matmul(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: dict,
                       out_dtype: torch.dtype, gelu: Optional[str]) -> torch.Tensor:
        # without int8 dot products oneDNN is fast for unsigned codes only: c + 128, as bytes c ^ 0x80
        unsigned = not int8_dot_products()
        key = (unsigned, *_version_key((self.weight, self.weight_zero, self.weight_scale, self.input_scale,
                                        self.input_zero)))
        if self._prepacked is None or self._prepacked[0] != key:
            w = self._unpack() if self.packed else self.weight  # the unpacked copy is not kept: oneDNN's is
            self._prepacked = (key, {
                "weight": torch.ops.onednn.qlinear_prepack(w, None),
                "w_scale": self.weight_scale[:, 0].float().contiguous(),
                "w_zero": torch.zeros(self.out_features, dtype=torch.int64, device=w.device),  # w − z_w is stored
                "x_scale": float(self.input_scale.reshape(())),
                "x_zero": int(zero.reshape(())) + (INT8_SHIFT if unsigned else 0)})
        p = self._prepacked[1]
        gemm_codes = codes.view(torch.uint8).bitwise_xor(0x80) if unsigned else codes
        if k["offset"] is None:  # the GELU runs on the float32 result inside the GEMM (a oneDNN post-op)
            return torch.ops.onednn.qlinear_pointwise(
                gemm_codes, p["x_scale"], p["x_zero"], p["weight"], p["w_scale"], p["w_zero"], self.bias, 1.0, 0,
                onednn_writes(out_dtype), "none" if gelu is None else "gelu", [], "" if gelu is None else gelu
            ).to(out_dtype)
        y = torch.ops.onednn.qlinear_pointwise(gemm_codes, p["x_scale"], p["x_zero"], p["weight"], p["w_scale"],
                                               p["w_zero"], self.bias, 1.0, 0, torch.float32, "none", [], "")
        # oneDNN took the weights as w − 128: the zero point's term, GELU and cast in one fused pass
        return _maybe_fused(_eager_corrected, y, self._centred_row_sums(codes, scale, zero), k["offset"][:, 0],
                            gelu, out_dtype)

    def _scaled(self, acc: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: dict,
                b: int, with_bias: bool) -> torch.Tensor:
        """s_a s_w [acc − z_a C_w − (R_a − k z_a) z_w] (+ b) for block b: acc (T, out) int32; scale, zero
        (T | 1, 1); k: ``_constants``."""
        y = acc.view(torch.float32)  # converted in place: a fresh (T, out) float buffer costs more than the GEMM's
        y.copy_(acc)  # epilogue itself (page faults on every call)
        if k["c"] is not None:  # static per-tensor activations: one fused pass over the output
            torch.addcmul(k["d"][:, b], y, k["c"][:, b], out=y)
        elif scale.shape[0] == 1:  # one dynamic range for every token
            c = scale[0] * k["w_scale"][:, b]
            d = -zero[0] * scale[0] * k["sums"][:, b]
            torch.addcmul(d + self.bias if with_bias and self.bias is not None else d, y, c, out=y)
        else:
            y.mul_(k["w_scale"][:, b])
            y.addr_(zero[:, 0], k["sums"][:, b], alpha=-1)
            y.mul_(scale)
            if with_bias and self.bias is not None:
                y.add_(self.bias)
        if k["offset"] is not None:
            self._offset_correction(y, codes, scale, zero, k["offset"][:, b])
        return y

    @staticmethod
    def _centred_row_sums(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """s_a (R_a − k z_a) per token: what the weight zero point multiplies (asymmetric 8-bit weights)."""
        # R_a per token as a GEMM against a ones column (several times faster than an int8 row sum)
        ones = torch.ones(codes.shape[1], 8, dtype=torch.int8, device=codes.device)
        row_sums = int_mm(codes, ones)[:, 0].float()
        return (row_sums - codes.shape[1] * zero[:, 0]) * scale[:, 0]

    def _offset_correction(self, y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           offset: torch.Tensor) -> None:
        """y −= s_a (R_a − k z_a) ⊗ s_w z_w, in place."""
        y.addr_(self._centred_row_sums(codes, scale, zero), offset, alpha=-1)

    def prepare_for_state(self, state_dict: dict, prefix: str) -> None:
        """Create the optional buffers and the pieces that ``state_dict`` holds for this layer (empty, shaped like
        the stored ones; meta tensors give meta buffers), so that loading it finds a place for every tensor."""
        for name in OPTIONAL_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(saved))
        prepare_pieces(self, state_dict, prefix)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves everything; ``.to(dtype)`` (a model's float parts to bf16) leaves this layer's
        float tensors (scales, zero points, bias, pieces) in float32: they are part of the integer arithmetic."""
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.prepare_for_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        storage = "int4 packed" if self.packed else "int8"
        return (f"{self.name}: {self.in_features} -> {self.out_features}, W {self.weight_spec.label('w')} ({storage}), "
                f"A {self.input_spec.label('a')}")
