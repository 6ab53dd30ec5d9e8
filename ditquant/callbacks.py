"""The one Lightning callback that runs a method (``ditquant.methods``) during ``ditquant fit``.

    trainer:
      callbacks:
        - class_path: ditquant.MethodCallback
          init_args: {method: salience_balancing, options: {salience: ssc}}

``method`` is a registered name (``ditquant.methods.METHODS``) or a Method subclass by import path. The method runs
once, at the first training batch: after the model is wrapped in quantized layers (folds re-initialise the weight
quantizers) and before activation ranges are observed, so its cost counts in the fit time and its result travels
in the model's state. The callback's own state records that it ran (and a method's resumable progress, such as a
search's finished generations), so a resumed fit neither applies it twice nor starts it over.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import lightning as L

from ditquant.checkpointing import save_last
from ditquant.errors import UserError
from ditquant.methods.base import Method, method_class
from ditquant.options import build

log = logging.getLogger(__name__)


class MethodCallback(L.Callback):
    """Run the method ``method`` with ``options`` (its dataclass fields) once, at the start of fit.

    Args:
        method: a registered method's name (``salience_balancing``, ``temporal_smoothing``,
            ``low_rank_compensation``, ``granularity_search``, ``gptq``, or one registered by your code), or a
            Method subclass by import path (``package.module.Class``).
        options: the method's options (see its class); omitted ones take the method's defaults.
    """

    def __init__(self, method: str, options: Optional[dict] = None):
        self.method: Method = build(method_class(method, "init_args.method"), dict(options or {}),
                                    "init_args.options", strict=True)
        self.done = False
        self.report: dict = {}
        self.progress: Optional[dict] = None  # the method's resumable state (MethodContext.save_progress)
        self._restored = False  # this callback's state came from the checkpoint being resumed

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method.name,
                                        options=json.dumps(self.method.options(), sort_keys=True, default=str))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        if trainer.ckpt_path is not None and not self._restored:
            raise UserError(f"method {self.name}: the checkpoint being resumed ({trainer.ckpt_path}) was made "
                            "without it; start a new fit to apply it")

        def save_progress(state: dict) -> None:
            self.progress = state
            save_last(trainer)

        self.report = pl_module.run_method(self.method, resume=self.progress, save_progress=save_progress)
        self.done = True
        log.info("%s done in %.1f s", self.name, self.report["seconds"])

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report, "progress": self.progress}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done, self.report = state_dict["done"], state_dict["report"]
        self.progress = state_dict.get("progress")
        self._restored = True
