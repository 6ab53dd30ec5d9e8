"""One FP pass over the calibration set that hands every watched linear input to a visitor (no copies kept).

Balancing (PTQ4DiT) and smoothing (DiTAS) need per-channel statistics of the inputs of the block linears over all
calibration timesteps; inputs shared by several linears (q/k/v) are watched once, on the first of them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ditquant import interrupt
from ditquant.calibration.dataset import calibration_batches
from ditquant.models.adapters import adapter_for

# visit((block index, input name), input activation (rows, tokens, channels), timestep of every row)
Visitor = Callable[[tuple[int, str], torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def visit_block_inputs(model: nn.Module, calibration: Dataset, inputs: dict[str, tuple[str, ...]], visit: Visitor,
                       batch_size: int = 32) -> None:
    """Run ``model`` over ``calibration`` and call ``visit`` on the input of ``inputs[name][0]`` in every block."""
    current_t: list[torch.Tensor] = []
    handles = []
    adapter = adapter_for(model)
    for b, block in enumerate(adapter.blocks(model)):
        for name, consumers in inputs.items():
            def hook(module, args, key=(b, name)):
                visit(key, args[0], current_t[0])
            handles.append(block.get_submodule(consumers[0]).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for batch in calibration_batches(calibration, batch_size):
            interrupt.check()
            current_t[:] = [batch["t"].to(device)]
            adapter.forward_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
