"""What the bundled models' training scripts share: the EMA update with warm-up, the loss log line, and the
resumable checkpoint (model, EMA, optimizer, step and RNG state, written atomically)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ditquant.io import atomic_write


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, the decay warmed up so that early weights fade out quickly."""
    decay = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


class LossLog:
    """Prints the mean loss and the time per step every ``every`` steps."""

    def __init__(self, prefix: str = "", every: int = 50):
        self.prefix, self.every = prefix, every
        self.start, self.running = time.time(), 0.0

    def add(self, step: int, loss: float) -> None:
        self.running += loss
        if step % self.every == 0:
            print(f"{self.prefix}step {step} loss {self.running / self.every:.4f} "
                  f"{(time.time() - self.start) / self.every:.2f}s/step", flush=True)
            self.start, self.running = time.time(), 0.0


def save_checkpoint(checkpoint: Path, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                    step: int) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(checkpoint) as tmp:
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": torch.get_rng_state()}, tmp)


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, ema: torch.nn.Module,
                    opt: torch.optim.Optimizer) -> int:
    """Resume from ``checkpoint`` if it exists (states and RNG restored); the step to continue from."""
    if not checkpoint.is_file():
        return 0
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    print(f"resumed at step {state['step']}", flush=True)
    return state["step"]
