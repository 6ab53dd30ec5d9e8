"""What ditquant prints while it works: a rich progress bar on a terminal, periodic log lines without one, and no
third-party tips or deprecation noise unless ``--verbose`` asks for them."""

from __future__ import annotations

import logging
import sys
import time
import warnings

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

log = logging.getLogger(__name__)

# Third-party chatter that says nothing about this run.
NOISE = [r".*litlogger.*", r".*tensorboardX.*", r".*LeafSpec.*", r".*configure_optimizers.*returned.*None.*",
         r"Found \d+ module\(s\) in eval mode.*", r".*does not have many workers.*", r".*num_workers.*",
         r".*`training_step` returned `None`.*", r".*GPU available but not used.*", r".*ckpt_path.*",
         r".*dirpath has changed.*", r".*Checkpoint directory .* exists and is not empty.*",
         r".*args parameter is intended to run from within Python.*"]


def quiet() -> None:
    """Hide third-party tips and deprecation warnings (``--verbose`` skips this)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def on_terminal() -> bool:
    return sys.stderr.isatty()


class FitProgressBar(RichProgressBar):
    """Lightning's rich bar (steps done, elapsed, time left), labelled with the unit being reconstructed."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "calibrating"

    def get_metrics(self, trainer, pl_module) -> dict:
        items = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k not in ("unit", "v_num")}
        if trainer.state.fn == "fit" and hasattr(pl_module, "progress"):  # test has only sample batches
            p = pl_module.progress()
            items = {"step": f"{p['step']}/{p['total']}", "at": p["short"], **items}
        return items


class ProgressLines(L.Callback):
    """Where the fit stands, as a plain log line every ``every_s`` seconds, for runs without a terminal (a batch
    job's log); on a terminal the progress bar shows the same."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._last = 0.0
        self._started = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = self._last = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        p = pl_module.progress()
        done, total = p["step"], p["total"]
        left = (now - self._started) / max(done - p["start_step"], 1) * (total - done)
        loss = trainer.callback_metrics.get("loss")
        log.info("fit step %d/%d, %s%s, about %s left", done, total, p["short"],
                 f", loss {float(loss):.4g}" if loss is not None else "", duration(left))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
