"""Checkpoints that survive a kill and never run code: written atomically, during fit every ``every_n_steps`` steps
and when a stop signal arrives; always read with ``torch.load(weights_only=True)``.

Manual optimization leaves Lightning's ``global_step`` at 0, so step-based saving counts the LightningModule's own
``fit_step`` (activation observation + reconstruction steps) instead.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ditquant import interrupt
from ditquant.errors import StoppedEarly, UserError
from ditquant.io import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file and rename: a killed run leaves the previous checkpoint intact. Read with
    ``weights_only=True`` whatever the caller or the torch version asks for: a checkpoint holding pickled code is
    refused in one line."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_write(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--ckpt_path {path}: no such checkpoint file")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            code = re.search(r"GLOBAL (\S+)", str(e))
            if code:
                raise UserError(f"{path}: refused, it holds pickled code ({code.group(1)}) that loading would run; "
                                "ditquant reads checkpoints with weights_only=True only") from None
            raise UserError(f"{path}: cannot read the checkpoint: damaged or not a Lightning checkpoint") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise UserError(f"{path}: cannot read the checkpoint ({str(e).splitlines()[0][:200]}): damaged or not a "
                            "Lightning checkpoint") from None


def save_last(trainer: L.Trainer) -> None:
    """Save ``last.ckpt`` now (atomically), if the fit has a checkpoint callback."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None):
        trainer.save_checkpoint(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST), weights_only=False)


class FitCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (``last.ckpt`` at the end of fit) that also saves ``last.ckpt`` every ``every_n_steps``
    fit steps, so ``--ckpt_path last`` resumes a killed reconstruction mid-unit, and when SIGINT / SIGTERM asked
    the run to stop (then the fit ends with ``Interrupted``) or a step / time limit ended it before its last unit
    (``StoppedEarly``).

    Args:
        every_n_steps: fit steps between saves (0: only at the end and on a stop signal).
    """

    def __init__(self, every_n_steps: int = 500, **kwargs):
        super().__init__(**kwargs)
        if every_n_steps < 0:
            raise UserError(f"checkpoint.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        progress = pl_module.progress()
        signalled = interrupt.requested() is not None
        # max_steps / max_time: saved mid-epoch, so that a resumed fit continues (an epoch-end checkpoint would
        # mark the one fit epoch as done and the resumed fit would end at once)
        limited = trainer.should_stop and not progress["finished"]
        periodic = self.every_n_steps and progress["step"] % self.every_n_steps == 0 and not progress["finished"]
        if signalled or limited or periodic:
            save_last(trainer)
        if signalled:
            log.info("stop requested: checkpoint saved at %s", progress["where"])
            interrupt.check()
        if limited:
            raise StoppedEarly(progress["where"])
