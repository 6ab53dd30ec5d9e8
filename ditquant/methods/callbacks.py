"""Lightning callbacks that carry a method's pre-processing of the FP model, run once at the start of ``fit``.

A pre-processing step (PTQ4DiT's salience balancing, DiTAS's smoothing) rewrites the DiT's weights so that the FP
function is unchanged but the quantizers see friendlier ranges. It must run after the model is wrapped in
QuantLayers (the folds re-initialise the weight quantizers) and before activation ranges are observed, so it runs
at the first training batch, ahead of the LightningModule's step: its cost counts in the fit time, and its result
(the folded weights) travels in the model's state. The callback's own state records that it ran, so a resumed fit
does not apply it twice.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import lightning as L
from torch import nn
from torch.utils.data import Dataset

from ditquant.methods.balancing import balance_model
from ditquant.quant.modules import quant_disabled

log = logging.getLogger(__name__)


class Preprocessing(L.Callback):
    """Run ``apply`` once on the FP model (quantizers bypassed) before calibration; keep its report."""

    name = "preprocessing"

    def __init__(self):
        self.done = False
        self.report: dict = {}

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        if pl_module.activations_observed:
            raise ValueError(f"{type(self).__name__}: the checkpoint being resumed was calibrated without it "
                             "(its activation ranges are already observed); start a new fit to apply it")
        started = time.perf_counter()
        with quant_disabled(pl_module.transformer):
            self.report = self.apply(pl_module.transformer, trainer.datamodule.calibration)
        self.report["seconds"] = time.perf_counter() - started
        self.done = True
        log.info("%s done in %.1f s", self.name, self.report["seconds"])

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done, self.report = state_dict["done"], state_dict["report"]


class SalienceBalancing(Preprocessing):
    """PTQ4DiT's channel-wise salience balancing (CSB), folded into the weights (no online division).

    For q/k/v (one factor, shared input), the attention output projection and fc1 of every block, the activation
    is divided by f_j = √(s(X_j)/s(W_j)) and the weight columns multiplied by it; the division is folded into the
    adaLN modulation (q/k/v, fc1) and the V projection's rows (attention output). Statistics come from FP forwards
    over the whole calibration set.

    Args:
        salience: ``ssc``: s(X) = Σ_t softmax(−ρ)_t s(X^(t)) with ρ_t the Spearman correlation of activation and
            weight salience at calibration timestep t (PTQ4DiT); ``mid``: s(X) of the middle calibration timestep
            (the paper's "CSB only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name = "salience_balancing"

    def __init__(self, salience: Literal["ssc", "mid"] = "ssc", batch_size: int = 32):
        super().__init__()
        if salience not in ("ssc", "mid"):
            raise ValueError(f"SalienceBalancing.salience must be 'ssc' or 'mid', got {salience!r}")
        if batch_size < 1:
            raise ValueError(f"SalienceBalancing.batch_size must be >= 1, got {batch_size}")
        self.salience, self.batch_size = salience, batch_size

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        report = balance_model(model, calibration, salience=self.salience, batch_size=self.batch_size)
        return {"salience": self.salience, **report}
