"""Rotation of linear inputs (QuaRot-style, issue 16): x·Q at run time in front of a layer's input quantizer with the
weight's W·Q folded offline, Q orthogonal (Hadamard, or seeded random for widths without one). The FP function is
unchanged; an outlier channel is spread over all channels, which is what 4-bit activations need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import nn

from ditquant.errors import UserError
from ditquant.methods.base import Method, MethodContext, register
from ditquant.models.adapters import adapter_for
from ditquant.models.layout import BLOCK_LINEAR_ROLES
from ditquant.quant.modules import quant_layers
from ditquant.quant.pieces import ROTATION_KINDS, Rotation


@register
@dataclass
class InputRotation(Method):
    """Rotate the inputs of the layers of ``roles``. Where the model's adapter has an exact fold point for a
    rotation (the attention output projection's input: a per-head rotation folds into V's rows) it is folded there
    and costs nothing at run time; every other input is rotated online (each layer its own x·Q: q, k and v each
    rotate their shared input). List it after smoothing or balancing (their per-channel factors come first) and
    before methods that fix the weights.

    Args:
        kind: ``hadamard`` (orders 2^k·m, m = 1 or a Paley order: DiT-XL/2's 1152, 4608 and head size 72
            included) or ``random`` (a seeded random orthogonal matrix, any width).
        roles: the layer roles whose inputs are rotated (default: the four block linears).
        fold: fold where the adapter can (false: every input online, the full-width rotation).
        seed: seeds the random rotation.
    """

    name: ClassVar[str] = "input_rotation"
    changes: ClassVar[frozenset] = frozenset({"fp_weights"})
    kind: Literal["hadamard", "random"] = "hadamard"
    roles: list[str] = field(default_factory=lambda: list(BLOCK_LINEAR_ROLES))
    fold: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ROTATION_KINDS:
            raise UserError(f"InputRotation.kind must be one of {ROTATION_KINDS}, got {self.kind!r}")

    def _plan(self, model: nn.Module) -> tuple[list, list]:
        """(fold points to rotate there, layers to rotate online)."""
        selected = adapter_for(model).selected_roles(model, self.roles)
        layers = [q for q in quant_layers(model) if q.role in selected]
        if not layers:
            raise UserError(f"InputRotation: no quantized layer has a role in {self.roles}")
        rotation, folds = Rotation.of(self.kind, self.seed), []
        if self.fold:
            for point in adapter_for(model).rescalable_inputs(model):
                if point.rotate is not None and point.role in selected and _has_rotation(rotation, point.head_dim):
                    folds.append(point)
        folded = {id(m) for point in folds for m in point.consumers}
        return folds, [q for q in layers if id(q) not in folded]

    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        _, online = self._plan(model)
        rotation = Rotation.of(self.kind, self.seed)
        for width in sorted({q.layer.weight.shape[1] for q in online}):
            try:
                rotation.matrix(width)
            except UserError as e:
                raise UserError(f"InputRotation.kind: {e}") from None

    def apply(self, model: nn.Module, calibration=None, ctx=None) -> dict:
        folds, online = self._plan(model)
        rotation = Rotation.of(self.kind, self.seed)
        for point in folds:
            point.rotate(rotation.matrix(point.head_dim))
        for q in online:
            q.rotate_input(Rotation.of(self.kind, self.seed))
        return {"kind": self.kind, "folded": [f"{p.block}.{p.name}" for p in folds],
                "rotated": [q.name for q in online]}


def _has_rotation(rotation: Rotation, n: int) -> bool:
    try:
        rotation.matrix(n)
        return True
    except UserError:
        return False
