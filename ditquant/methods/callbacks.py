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
from typing import Literal, Optional

import lightning as L
from torch import nn
from torch.utils.data import Dataset

from ditquant.methods.balancing import balance_model
from ditquant.methods.smoothing import ALPHA_GRID, check_alphas, smooth_model
from ditquant.models.layout import BLOCK_LINEAR_ROLES, ROLES, role_of
from ditquant.quant.lora import check_rank
from ditquant.quant.modules import quant_disabled, quant_layers
from ditquant.quant.quantizer import quantize_tensor

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
        if trainer.ckpt_path is not None:
            raise ValueError(f"{type(self).__name__}: the checkpoint being resumed ({trainer.ckpt_path}) was made "
                             "without it; start a new fit to apply it")
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


class TemporalSmoothing(Preprocessing):
    """DiTAS's temporal-aggregated smoothing with a per-input α grid search, folded into the weights.

    For q/k/v (shared input), the attention output projection, fc1 and fc2 of every block: a_j = max |X_j| over
    the whole calibration trajectory, s_j = a_j^α / w_j^(1−α); α per input minimises the layer's quantized output
    MSE over the calibration set (see ``ditquant.methods.smoothing``). q/k/v's and fc1's s fold into the adaLN
    modulation, the attention output's into V's rows, fc2's is divided on the fly (GELU sits in front of it).

    Args:
        alphas: the α grid searched per input (default 0, 0.05, …, 1).
        alpha: a fixed α for every input instead of the search (the "smoothing only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name = "temporal_smoothing"

    def __init__(self, alphas: Optional[list[float]] = None, alpha: Optional[float] = None, batch_size: int = 32):
        super().__init__()
        self.alphas = check_alphas(list(ALPHA_GRID) if alphas is None else alphas)
        if alpha is not None:
            check_alphas([alpha])
        if batch_size < 1:
            raise ValueError(f"TemporalSmoothing.batch_size must be >= 1, got {batch_size}")
        self.alpha, self.batch_size = alpha, batch_size

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        return smooth_model(model, calibration, self.alphas, self.alpha, self.batch_size)


class LowRankCompensation(Preprocessing):
    """DiTAS's training-free LoRA for weights: per layer, W_q = Q(W − L·R) and L·R the rank-r SVD of W − W_q,
    alternated ``iterations`` times (best iterate kept); the FP branch L·R reads the quantized activation. List it
    after a smoothing callback: it fixes the quantized weights, so folds must come first.

    Args:
        rank: r (DiTAS: 32).
        iterations: alternations (DiTAS: 10).
        roles: layer roles to compensate (DiTAS: the four block linears).
    """

    name = "low_rank_compensation"

    def __init__(self, rank: int = 32, iterations: int = 10, roles: Optional[list[str]] = None):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"LowRankCompensation.iterations must be >= 1, got {iterations}")
        self.rank, self.iterations = rank, iterations
        self.roles = list(roles) if roles is not None else list(BLOCK_LINEAR_ROLES)
        if unknown := sorted(set(self.roles) - set(ROLES)):
            raise ValueError(f"LowRankCompensation.roles: unknown role(s) {unknown}; known roles: {', '.join(ROLES)}")

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        wrapped = {m.name: m for m in quant_layers(model) if role_of(m.name) in self.roles}
        if not wrapped:
            raise ValueError(f"LowRankCompensation: no quantized layer has a role in {self.roles}")
        for name, layer in wrapped.items():  # every rank checked before any work
            check_rank(self.rank, layer.layer.weight, f"LowRankCompensation.rank ({name})")
        report = {"rank": self.rank, "rtn_error": {}, "error": {}}
        for name, layer in wrapped.items():
            w = layer.layer.weight
            report["rtn_error"][name] = (w - quantize_tensor(w, layer.weight_quantizer.spec, True)).norm().item()
            report["error"][name] = min(layer.compensate_low_rank(self.rank, self.iterations))
        return report
