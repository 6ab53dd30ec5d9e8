"""BlockReconstructor: optimise a quantized DiT's rounding and step sizes unit by unit, one step at a time.

Plain PyTorch (no Lightning), so notebooks and tests can drive it; ``DiTQuantization`` runs it as its fit loop.
Every step is a pure function of (the model state, the stage, the step index): the batch drawn at step k of stage s
comes from a generator seeded by (seed, s, k), the unit's cache is rebuilt deterministically when a stage (re)starts,
so a run resumed from ``state_dict()`` + the model's state dict continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ditquant import interrupt
from ditquant.calibration.dataset import calibration_batches
from ditquant.errors import UserError
from ditquant.models.adapters import adapter_for
from ditquant.quant.adaround import RoundingSchedule
from ditquant.quant.modules import activation_quantizers, activations_unquantized, quant_disabled, quant_layers
from ditquant.quant.timesteps import timesteps
from ditquant.reconstruction.cache import UnitCache
from ditquant.calibration.capture import CallSignature, capture_input, replay, run_until_output
from ditquant.reconstruction.config import ReconstructionConfig

TIMESTEPS = "__timesteps__"  # the cached rows' timesteps (not an argument of the unit)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One optimisation of one unit."""

    unit: str
    learn_weights: bool
    learn_activations: bool
    quantize_activations: bool
    iterations: int

    def describe(self) -> str:
        what = "+".join(w for w, on in (("rounding", self.learn_weights), ("act steps", self.learn_activations)) if on)
        return f"{self.unit} ({what})"


def plan_stages(model: nn.Module, config: ReconstructionConfig) -> list[Stage]:
    """The stages of a reconstruction, in order; units with nothing to learn are left out."""
    units = adapter_for(model).units(model)

    def learnable(unit: nn.Module, weights: bool, activations: bool) -> tuple[bool, bool]:
        w = weights and any(m.learns_rounding for m in quant_layers(unit))
        a = activations and config.learn_activations and bool(activation_quantizers(unit))
        return w, a

    stages = []
    if config.mode == "joint":
        for name, unit in units:
            w, a = learnable(unit, True, True)
            if w or a:
                stages.append(Stage(name, w, a, True, config.iterations))
        return stages
    for name, unit in units:  # sequential: rounding with FP activations, then activation step sizes
        w, _ = learnable(unit, True, False)
        if w:
            stages.append(Stage(name, True, False, False, config.iterations))
    act_iterations = config.iterations if config.activation_iterations is None else config.activation_iterations
    for name, unit in units:
        _, a = learnable(unit, False, True)
        if a and act_iterations > 0:
            stages.append(Stage(name, False, True, True, act_iterations))
    return stages


class _ActiveStage:
    """The state of the stage being optimised: its cache, call signature, trainable tensors and optimizer."""

    def __init__(self, index: int, stage: Stage, unit: nn.Module):
        self.index, self.stage, self.unit = index, stage, unit
        self.cache: Optional[UnitCache] = None
        self.signature: Optional[CallSignature] = None
        self.layers = [m for m in quant_layers(unit) if m.learns_rounding] if stage.learn_weights else []
        self.steps = activation_quantizers(unit) if stage.learn_activations else []
        self.schedule: Optional[RoundingSchedule] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.start_loss: Optional[float] = None


class BlockReconstructor:
    """Runs the stages of ``plan_stages`` over a calibration set, one ``run_step()`` at a time.

    Args:
        model: a DiT already quantized (``quantize_model``) with calibrated activation quantizers, in eval mode.
        config: the reconstruction settings.
        calibration: the calibration dataset (rows of x_t, t, y).
        spill_dir: where caches over the memory budget go.
    """

    def __init__(self, model: nn.Module, config: ReconstructionConfig, calibration: Dataset,
                 spill_dir: Optional[Path] = None):
        self.model, self.config, self.calibration, self.spill_dir = model, config, calibration, spill_dir
        self.adapter = adapter_for(model)
        self.units = dict(self.adapter.units(model))
        self.stages = plan_stages(model, config)
        self.starts = [0]
        for s in self.stages:
            self.starts.append(self.starts[-1] + s.iterations)
        self.step = 0
        self.summary: list[dict] = []  # per finished stage: unit, loss before and after (fixed evaluation rows)
        self._active: Optional[_ActiveStage] = None
        self._pending_optimizer_state: Optional[dict] = None
        self._pending_start_loss: Optional[float] = None
        for p in model.parameters():  # only the variables of the active stage are ever trained
            p.requires_grad_(False)

    @property
    def total_steps(self) -> int:
        return self.starts[-1]

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def locate(self, step: int) -> tuple[int, int]:
        """(stage index, iteration within the stage) of a global step."""
        for i, s in enumerate(self.stages):
            if step < self.starts[i + 1]:
                return i, step - self.starts[i]
        raise IndexError(f"step {step} is past the end of the reconstruction ({self.total_steps} steps)")

    # ---- one step ----

    def run_step(self) -> dict[str, float]:
        index, k = self.locate(self.step)
        if self._active is None or self._active.index != index:
            self._begin(index)
        active = self._active
        stage = active.stage
        rows = active.cache.batch(self._draw(index, k), self._device)
        with self._activation_mode(stage):
            out = self._replay(active, rows)
        rec = (out - rows["target"]).square().sum(1).mean()  # summed over dim 1, as BRECQ / PTQ4DiT
        loss = rec
        reg = torch.zeros(())
        if active.layers:
            weight, beta = active.schedule.at(k)
            if weight > 0:
                reg = weight * sum(m.adaround.regularizer(beta) for m in active.layers)
                loss = rec + reg
        if active.steps:  # cosine annealing of the activation step-size learning rate, to 0 at the stage's end
            active.optimizer.param_groups[-1]["lr"] = (
                self.config.activation_lr * 0.5 * (1 + math.cos(math.pi * k / stage.iterations)))
        if not torch.isfinite(loss):
            raise UserError(f"reconstruction of {stage.unit} (stage {index + 1} of {len(self.stages)}, iteration "
                            f"{k}): the loss is {loss.item()} (reconstruction term {rec.item()}); the model or its "
                            "calibration data produce non-finite values")
        active.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        active.optimizer.step()
        loss, rec = loss.detach(), rec.detach()
        self.step += 1
        if k == stage.iterations - 1:
            self._finish()
        return {"loss": loss.item(), "rec": rec.item(), "reg": reg.detach().item(), "stage": index,
                "iteration": k, "num_stages": len(self.stages)}

    def run(self, on_step=None) -> None:
        while not self.done:
            metrics = self.run_step()
            if on_step is not None:
                on_step(metrics)

    def _activation_mode(self, stage: Stage):
        """Quantized activations, or FP ones during a weight-only (sequential) pass."""
        return contextlib.nullcontext() if stage.quantize_activations else activations_unquantized(self.model)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _draw(self, index: int, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((self.config.seed, index, k)) & 0x7FFF_FFFF_FFFF_FFFF)
        n = self._active.cache.num_rows
        return torch.randperm(n, generator=gen)[:self.config.batch_size]

    # ---- stage begin / end ----

    def _begin(self, index: int) -> None:
        stage = self.stages[index]
        active = _ActiveStage(index, stage, self.units[stage.unit])
        for m in active.layers:
            if m.adaround is None:  # a resumed stage already holds its soft rounding (from the checkpoint)
                m.start_adaround()
        active.schedule = RoundingSchedule(stage.iterations, self.config.rounding_weight, self.config.warmup,
                                           self.config.beta_start, self.config.beta_end)
        self._fill_cache(active)
        if self._pending_start_loss is None:
            active.start_loss = self._evaluate(active)
        else:
            active.start_loss, self._pending_start_loss = self._pending_start_loss, None
        groups = []
        if active.layers:
            alphas = [m.adaround.alpha.requires_grad_(True) for m in active.layers]
            groups.append({"params": alphas, "lr": self.config.weight_lr})
        if active.steps:
            for q in active.steps:
                q.scale.requires_grad_(True)
            groups.append({"params": [q.scale for q in active.steps], "lr": self.config.activation_lr})
        active.optimizer = torch.optim.Adam(groups)
        if self._pending_optimizer_state is not None:
            active.optimizer.load_state_dict(self._pending_optimizer_state)
            self._pending_optimizer_state = None
        self._active = active
        log.info("reconstructing %s: stage %d/%d, %d rows cached%s", stage.describe(), index + 1, len(self.stages),
                 active.cache.num_rows, " (on disk)" if active.cache.on_disk else "")

    @torch.no_grad()
    def _fill_cache(self, active: _ActiveStage) -> None:
        """FP outputs of the unit (targets) and its inputs from the quantized prefix, over the calibration set."""
        loader = calibration_batches(self.calibration, self.config.batch_size)
        num_rows = len(self.calibration) * self.calibration[0]["t"].numel()  # an entry is one row or a guidance pair
        spill = self.spill_dir / f"stage{active.index:03d}" if self.spill_dir is not None else None
        active.cache = UnitCache(num_rows, int(self.config.cache_memory_gb * 2**30), spill)
        for batch in loader:
            interrupt.check()
            x, t, y = (batch[k].to(self._device) for k in ("x", "t", "y"))

            def forward():
                return self.adapter.forward(self.model, x, t, y)
            with quant_disabled(self.model):
                target = run_until_output(forward, active.unit)
            with self._activation_mode(active.stage):
                signature, rows = capture_input(forward, active.unit, batch=len(t))
            active.signature = active.signature or signature
            try:
                active.cache.write({**rows, "target": target, TIMESTEPS: t})
            except UserError as e:
                raise UserError(f"reconstruction of {active.stage.unit} (stage {active.index + 1} of "
                                f"{len(self.stages)}): {e}") from None

    @staticmethod
    def _replay(active: _ActiveStage, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unit on cached rows, with the rows' timesteps current (timestep-aware activation ranges)."""
        with timesteps(rows[TIMESTEPS]):
            return replay(active.unit, active.signature, rows)

    @torch.no_grad()
    def _evaluate(self, active: _ActiveStage) -> float:
        """The unit's reconstruction loss with hard rounding on fixed rows (the first ones, up to 8 batches): before
        optimisation this is round-to-nearest with the initial step sizes, after it the hardened result."""
        rows = active.cache.batch(torch.arange(min(active.cache.num_rows, 8 * self.config.batch_size)), self._device)
        soft = [m.adaround for m in active.layers if m.adaround is not None]
        for a in soft:
            a.hard = True
        try:
            with self._activation_mode(active.stage):
                out = self._replay(active, rows)
        finally:
            for a in soft:
                a.hard = False
        return (out - rows["target"]).square().sum(1).mean().item()

    def _finish(self) -> None:
        active, self._active = self._active, None
        for m in active.layers:
            m.finish_adaround()
        for q in active.steps:
            q.scale.requires_grad_(False)
        final = self._evaluate(active)
        active.cache.close()
        self.summary.append({"unit": active.stage.unit, "stage": active.stage.describe(),
                             "start_loss": active.start_loss, "final_loss": final})

    # ---- resume ----

    def state_dict(self) -> dict:
        """Progress and optimizer state (the model's own state dict holds the quantization parameters)."""
        return {"step": self.step, "summary": list(self.summary),
                "optimizer": self._active.optimizer.state_dict() if self._active is not None else None,
                "stage_start_loss": self._active.start_loss if self._active is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.summary = list(state["summary"])
        self._active = None
        self._pending_optimizer_state = state["optimizer"]
        self._pending_start_loss = state.get("stage_start_loss")
