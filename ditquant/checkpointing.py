"""Checkpoints that survive a kill: written atomically, and during fit every ``every_n_steps`` steps.

Manual optimization leaves Lightning's ``global_step`` at 0, so step-based saving counts the LightningModule's own
``fit_step`` (activation observation + reconstruction steps) instead.
"""

from __future__ import annotations

from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ditquant.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a killed run leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_write(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class FitCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (``last.ckpt`` at the end of fit) that also saves ``last.ckpt`` every ``every_n_steps``
    fit steps, so ``--ckpt_path last`` resumes a killed reconstruction mid-unit.

    Args:
        every_n_steps: fit steps between saves (0: only at the end).
    """

    def __init__(self, *args, every_n_steps: int = 500, **kwargs):
        super().__init__(*args, **kwargs)
        if every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = pl_module.fit_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < pl_module.num_fit_steps():
            trainer.save_checkpoint(self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST), weights_only=False)
