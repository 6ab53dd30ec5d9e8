"""Static activation ranges from the FP model's forward passes over the calibration set."""

from __future__ import annotations

from typing import Iterable

import torch

from ditquant import interrupt
from ditquant.errors import UserError
from ditquant.models.adapters import adapter_for
from ditquant.quant.modules import observing_activations


@torch.no_grad()
def observe_activation_ranges(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """Run ``model`` (quantized, static quantizers uncalibrated) over ``batches`` ({x, t, y} rows) with every
    quantizer observing its input range; refuse ranges that come out NaN / inf."""
    adapter = adapter_for(model)
    with observing_activations(model):
        for batch in batches:
            interrupt.check()
            adapter.forward_batch(model, batch)
    check_finite_quantizers(model)


def check_finite_quantizers(model: torch.nn.Module) -> None:
    """Refuse quantization ranges that came out NaN / inf (the model produced non-finite activations)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("scale", "zero_point")) and t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"activation observation: {name} is NaN/inf: the model produced non-finite activations "
                            "on the calibration set")
