"""What ``ditquant fit`` does, as a mixin of the LightningModule (``ditquant.task.DiTQuantization``): one training
batch observes the activation ranges over the calibration set (after the methods named in YAML ran at the first
batch, see ``ditquant.MethodCallback``), every further batch is one block-reconstruction step; at the end the
calibrated model is saved to ``<default_root_dir>/quantized``. What the methods may use of the run
(``method_context``) is built here too."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from ditquant.calibration.observe import observe_activation_ranges
from ditquant.errors import UserError
from ditquant.evaluation.sample_fid import sample_set_scorer
from ditquant.evaluation.sampling import write_json
from ditquant.export.calibrated import SEARCHED_LAYOUT, save_quantized
from ditquant.io import check_writable_dir, remove_stale_temporaries
from ditquant.methods.base import Method, MethodContext, run_method
from ditquant.quant.apply import uncalibrated_layers, weight_sqnr_db
from ditquant.quant.modules import activation_quantizers, quant_layers
from ditquant.reconstruction.reconstructor import BlockReconstructor, plan_stages

log = logging.getLogger(__name__)


class FitLoop:
    """The fit half of DiTQuantization (state set up by its ``__init__`` / ``configure_model``)."""

    def num_fit_steps(self) -> int:
        """Training batches fit needs: one to observe activation ranges, then one per reconstruction step."""
        if self.load_integer is not None:
            raise UserError("model.load_integer is for `ditquant test`; fit calibrates from model.dit")
        if self.quant is None:
            raise UserError("model.quant is null: there is nothing to calibrate (ditquant test evaluates the FP model)")
        if self.reconstruction is None:
            return 1
        if self._num_fit_steps is None:  # the stages depend only on the quantized structure, fixed during fit
            self._num_fit_steps = 1 + sum(s.iterations for s in plan_stages(self.transformer, self.reconstruction))
        return self._num_fit_steps

    @property
    def activations_observed(self) -> bool:
        # Walks the model until true (a resumed run finds the ranges in its checkpoint), then stays true.
        if not self._activations_observed:
            self._activations_observed = not uncalibrated_layers(self.transformer)
        return self._activations_observed

    @property
    def fit_step(self) -> int:
        """Completed fit steps (activation observation counts as one)."""
        return int(self.activations_observed) + (self.reconstructor.step if self.reconstructor is not None else 0)

    def progress(self) -> dict:
        """Where the fit stands: steps done and needed, whether calibration finished, and in words."""
        step, total = self.fit_step, self.num_fit_steps()
        short = "observing activations" if step == 0 else "done" if step >= total else ""
        if step >= total:
            where = f"fit step {step} of {total} (finished)"
        elif step == 0:
            where = f"fit step 0 of {total} (before activation observation)"
        elif self.reconstruction is None:
            where = f"fit step {step} of {total}"
        else:
            reconstructor = self._reconstructor()
            index, k = reconstructor.locate(reconstructor.step)
            stage = reconstructor.stages[index]
            where = (f"fit step {step} of {total}: reconstruction of {stage.unit}, stage {index + 1} of "
                     f"{len(reconstructor.stages)}, iteration {k} of {stage.iterations}")
            short = f"unit {index + 1}/{len(reconstructor.stages)} {stage.unit}"
        return {"step": step, "total": total, "finished": step >= total, "where": where, "short": short,
                "start_step": self._start_step}

    def on_fit_start(self) -> None:
        root = Path(self.trainer.default_root_dir)
        # A calibrated model from an earlier fit in this folder must not outlive a fit that does not finish.
        shutil.rmtree(root / "quantized", ignore_errors=True)
        remove_stale_temporaries(root / "checkpoints")
        if self.reconstruction is not None and self.reconstruction.cache_dir:
            check_writable_dir(Path(self.reconstruction.cache_dir), "model.reconstruction.cache_dir")

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()
        self._start_step = self.fit_step
        if self.trainer.is_global_zero:
            Console(stderr=True).print(self._training_summary())

    def _training_summary(self) -> str:
        """What fit trains (in place of Lightning's parameter count, which is 0: nothing here is an nn.Parameter
        with a gradient until its unit's stage starts)."""
        if self.reconstruction is None:
            return (f"fit: {self.num_fit_steps()} step: activation ranges observed over the calibration set; "
                    "weights round-to-nearest (or set by the method's pre-processing); nothing is trained")
        stages = plan_stages(self.transformer, self.reconstruction)
        rounding = sum(m.layer.weight.numel() for m in quant_layers(self.transformer) if m.learns_rounding)
        steps = sum(q.scale.numel() for q in activation_quantizers(self.transformer) if q.scale is not None)
        return (f"fit: {self.num_fit_steps()} steps over {len(stages)} reconstruction stages "
                f"({self.reconstruction.mode}): trains {rounding:,} AdaRound rounding variables and "
                f"{steps:,} activation step sizes, one unit at a time")

    def training_step(self, batch, batch_idx: int) -> None:
        if not self.activations_observed:
            self._observe_activations()
        elif self.reconstruction is not None:
            reconstructor = self._reconstructor()
            if not reconstructor.done:
                m = reconstructor.run_step()
                self.log_dict({"unit": float(m["stage"] + 1), "loss": m["rec"]}, prog_bar=True, on_step=True)
        max_steps = self.trainer.max_steps
        # Lightning counts optimizer steps of its own optimizers (none here), so max_steps is applied to fit steps.
        if self.fit_step >= self.num_fit_steps() or (max_steps is not None and 0 <= max_steps <= self.fit_step):
            self.trainer.should_stop = True

    def _observe_activations(self) -> None:
        observe_activation_ranges(self.transformer, self.trainer.datamodule.calibration_loader())

    def _reconstructor(self) -> BlockReconstructor:
        if self.reconstructor is None:
            spill = Path(self.reconstruction.cache_dir or Path(self.trainer.default_root_dir) / "cache")
            self.reconstructor = BlockReconstructor(self.transformer, self.reconstruction,
                                                    self.trainer.datamodule.calibration, spill_dir=spill)
            if self._resume_state is not None:
                self.reconstructor.load_state_dict(self._resume_state)
                self._resume_state = None
        return self.reconstructor

    def method_context(self, resume: Optional[dict] = None, save_progress=lambda state: None) -> MethodContext:
        attached = self._trainer is not None
        data = self.trainer.datamodule if attached else None
        return MethodContext(
            batches=data.calibration_loader if data is not None else None,
            batch_size=data.batch_size if data is not None else 32, quant=self.quant,
            reconstruction=self.reconstruction,
            set_quant=lambda quant: self.set_searched_layout(
                {f: getattr(quant, f) for f in SEARCHED_LAYOUT}),
            scorer=sample_set_scorer(self.dit_config, self.model_source, self.sampler, self.evaluation.fid_features,
                                     self.vae, self.latent_scale, features_option="model.evaluation.fid_features"),
            output_dir=Path(self.trainer.default_root_dir) if attached else Path("."),
            resume=resume, save_progress=save_progress)

    def check_method(self, method: Method) -> None:
        """Refuse a method that cannot fit this model before any work (``ditquant fit`` calls it first)."""
        method.check(self.transformer, self.method_context())

    def run_method(self, method: Method, resume: Optional[dict] = None, save_progress=lambda state: None) -> dict:
        ctx = self.method_context(resume, save_progress)
        method.check(self.transformer, ctx)
        return run_method(self.transformer, self.trainer.datamodule.calibration, method, ctx)

    def on_train_end(self) -> None:
        if self.fit_step < self.num_fit_steps():
            return  # stopped early (max_steps / max_time): the checkpoint holds the progress, the CLI says so
        missing = uncalibrated_layers(self.transformer)
        if missing:
            raise RuntimeError(f"{len(missing)} quantizers saw no calibration data, e.g. {missing[:3]}")
        root = Path(self.trainer.default_root_dir)
        seconds = self._fit_seconds_before + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)
        if self.trainer.is_global_zero:
            save_quantized(self.transformer, root / "quantized", self.model_source, self.quant)
            summary = {"label": self.quant.label(), "weight_sqnr_db": weight_sqnr_db(self.transformer),
                       "fit_seconds": seconds,
                       "preprocessing": {cb.method.name: cb.report for cb in self.trainer.callbacks
                                         if isinstance(getattr(cb, "method", None), Method)},
                       "reconstruction": self.reconstructor.summary if self.reconstructor is not None else []}
            write_json(summary, root / "quantized" / "fit_summary.json")
        log.info("weight SQNR %.2f dB; calibrated model saved to %s", weight_sqnr_db(self.transformer),
                 root / "quantized")
