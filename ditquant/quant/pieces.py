"""The pieces a quantized layer is made of besides its quantizers: input transforms and branches.

A quantized layer computes y = Q_w(W)·Q_a(T(x)) + Σ_b B_b(·) + bias:

- **input transforms** T (``QuantLayer.input_transforms``, applied in order in front of the input quantizer), whose
  inverse is folded into W offline: ``ChannelDivisor`` (x / s per channel, DiTAS's smoothing of an input with
  nothing linear in front of it) and ``Rotation`` (x·Q with Q orthogonal: Hadamard or seeded random);
- **branches** B (``QuantLayer.branches``), full-precision paths added to the output: ``LowRankBranch`` L·(R·x),
  reading the quantized input (DiTAS's training-free LoRA), and ``FloatLowRankBranch``, SVDQuant's, reading the
  transformed FP input instead (``reads = "fp"``).

Each piece is a module that owns its state (its buffers, saved under ``input_transforms.<i>.`` / ``branches.<i>.``),
and is the same object in the fake-quantized layer and in the integer layer (``to_integer`` is a copy): transforms
and branches run in floating point in both. ``prepare_pieces`` makes room for the pieces a saved state holds, so a
fresh layer loads any state of the same configuration — including those saved before pieces existed.
"""

from __future__ import annotations

import copy
import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ditquant.errors import UserError
from ditquant.quant.hadamard import fast_hadamard, hadamard_factors, rotation_matrix


class InputTransform(nn.Module):
    """x -> T(x) in front of the input quantizer (its inverse already folded into the weight)."""

    state_names: ClassVar[tuple[str, ...]] = ()

    def to_integer(self) -> "InputTransform":
        return copy.deepcopy(self)


class ChannelDivisor(InputTransform):
    """x / s per input channel (the weight's columns were multiplied by s)."""

    state_names = ("divisor",)

    def __init__(self, divisor: torch.Tensor):
        super().__init__()
        self.register_buffer("divisor", divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.divisor


ROTATION_KINDS = ("hadamard", "random")


# Up to this width the n×n matmul is faster than the fast transform's log2(n) passes over memory (2-core CPU, fp32:
# 4.9 vs 34.7 ms at n = 128, 11.8 vs 42.6 ms at 512; even at 1152; 528.6 vs 183.2 ms at 4608).
DENSE_UP_TO = 1024


@functools.lru_cache(maxsize=32)
def _rotation(kind: str, n: int, seed: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return rotation_matrix(kind, n, seed).to(dtype=dtype, device=device)


class Rotation(InputTransform):
    """x·Q with Q an orthogonal n×n matrix (the weight was multiplied by Q: (x·Q)·(W·Q)ᵀ = x·Wᵀ). Only (kind,
    seed) is state: Q is rebuilt from them (and cached), so a model rotating hundreds of inputs stores no matrix."""

    state_names = ("rotation",)

    def __init__(self, rotation: torch.Tensor):
        super().__init__()
        self.register_buffer("rotation", rotation)  # int64 [kind index, seed]

    @classmethod
    def of(cls, kind: str, seed: int = 0) -> "Rotation":
        if kind not in ROTATION_KINDS:
            raise UserError(f"rotation kind must be one of {ROTATION_KINDS}, got {kind!r}")
        return cls(torch.tensor([ROTATION_KINDS.index(kind), seed]))

    @property
    def kind(self) -> str:
        return ROTATION_KINDS[int(self.rotation[0])]

    def matrix(self, n: int, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
        return _rotation(self.kind, n, int(self.rotation[1]), dtype, str(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard" and x.shape[-1] > DENSE_UP_TO:  # the fast transform: no n×n matmul
            power, base = _hadamard_factors(x.shape[-1], x.dtype, str(x.device))
            return fast_hadamard(x, power, base)
        return x @ self.matrix(x.shape[-1], x.dtype, x.device)


@functools.lru_cache(maxsize=32)
def _hadamard_factors(n: int, dtype: torch.dtype, device: str) -> tuple[int, torch.Tensor]:
    power, base = hadamard_factors(n)
    return power, base.to(dtype=dtype, device=device)


class Branch(nn.Module):
    """A full-precision path added to the layer's output; ``reads`` the quantized input or the (transformed) FP
    one. Present only while the weight is quantized: the FP model (quantizers off) has no branch."""

    state_names: ClassVar[tuple[str, ...]] = ()
    reads: str = "quantized"

    def dense(self) -> torch.Tensor:
        """The branch as an (out, in) matrix (what it adds to the effective weight)."""
        raise NotImplementedError

    def to_integer(self) -> "Branch":
        return copy.deepcopy(self)


class LowRankBranch(Branch):
    """L·(R·x) on the quantized input (DiTAS): ``left`` (out, r), ``right`` (r, in)."""

    state_names = ("left", "right")

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        # contiguous as a loaded state is: a transposed SVD factor takes another GEMM kernel on some CPUs (AVX2),
        # and the saved-and-loaded model would not compute bit for bit what the calibrated one did
        self.register_buffer(self.state_names[0], left.contiguous())
        self.register_buffer(self.state_names[1], right.contiguous())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.state_names[0]), getattr(self, self.state_names[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.factors()
        return F.linear(F.linear(x, right), left)

    def dense(self) -> torch.Tensor:
        left, right = self.factors()
        return left @ right


class FloatLowRankBranch(LowRankBranch):
    """L·(R·x) on the unquantized (transformed) input (SVDQuant): ``fp_left`` (out, r), ``fp_right`` (r, in)."""

    state_names = ("fp_left", "fp_right")
    reads = "fp"


# Which piece a saved state holds, by the names of its tensors; and the names ditquant 0.1 saved them under.
_PIECES = {"input_transforms": {("divisor",): ChannelDivisor, ("rotation",): Rotation},
           "branches": {("left", "right"): LowRankBranch, ("fp_left", "fp_right"): FloatLowRankBranch}}
_LEGACY = {"input_divisor": "input_transforms.0.divisor", "lora_left": "branches.0.left",
           "lora_right": "branches.0.right"}


def prepare_pieces(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Before ``module`` (with ``input_transforms`` / ``branches`` lists) loads ``state_dict``: rename legacy keys
    and create empty pieces for the ones the state holds."""
    for old, new in _LEGACY.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    for kind, classes in _PIECES.items():
        pieces: nn.ModuleList = getattr(module, kind)
        for i in range(len(pieces), _count(state_dict, prefix + kind + ".")):
            names, cls = next((names, cls) for names, cls in classes.items()
                              if prefix + f"{kind}.{i}.{names[0]}" in state_dict)
            pieces.append(cls(*(torch.empty_like(state_dict[prefix + f"{kind}.{i}.{n}"]) for n in names)))


def _count(state_dict: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0
