"""The LightningModule behind ``ditquant fit`` / ``ditquant test``.

fit: wrap the DiT's layers per the QuantConfig (weights round-to-nearest); the methods named in YAML
(``ditquant.MethodCallback``, e.g. PTQ4DiT's balancing) rewrite the weights at the first step, which then
observes the activation ranges of the FP model over the calibration set (static quantizers); every further step is
one step of block reconstruction (``BlockReconstructor``), whose progress and optimizer state travel in the Lightning checkpoint so
that ``--ckpt_path last`` resumes mid-unit. At the end the calibrated model is saved to
``<default_root_dir>/quantized``. test: paired, seeded sampling of the quantized and FP models, FID / PSNR, samples
written to ``<default_root_dir>/test``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from rich.console import Console

from ditquant import interrupt
from ditquant.calibration.observe import observe_activation_ranges
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError
from ditquant.evaluation.sampling import EvaluationConfig, SampleEvaluator, write_json
from ditquant.integer.convert import to_integer
from ditquant.export.integer import load_integer as load_integer_model
from ditquant.evaluation.sample_fid import sample_set_scorer
from ditquant.methods.base import Method, MethodContext, run_method
from ditquant.io import InputPath, check_same, check_writable_dir, remove_stale_temporaries, yaml_plain
from ditquant.models.dit import DiTConfig
from ditquant.models.loading import DiTSource, load_dit, weights_fingerprint
from ditquant.models.adapters import quantize_model
from ditquant.quant.apply import (apply_group_sizes, quantization_table, uncalibrated_layers, unwrapped,
                                  weight_sqnr_db)
from ditquant.export.calibrated import load_quantized, save_quantized, saved_layer_group_sizes
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import activation_quantizers, quant_layers
from ditquant.reconstruction.config import ReconstructionConfig
from ditquant.reconstruction.reconstructor import BlockReconstructor, plan_stages

log = logging.getLogger(__name__)
BACKENDS = ("fake", "integer")


class DiTQuantization(L.LightningModule):
    """Quantize a pretrained DiT and evaluate it.

    Args:
        dit: the pretrained model (bundled, original checkpoint, diffusers folder or hub id).
        quant: how to quantize; null evaluates the FP model.
        sampler: the evaluation sampler (also used to record the calibration set).
        evaluation: what ``ditquant test`` measures and writes.
        reconstruction: block reconstruction after initialisation; null = round-to-nearest weights and
            min–max activation ranges (RTN).
        load_quantized: a folder written by ``ditquant fit`` (``<default_root_dir>/quantized``) to test without a
            Lightning checkpoint; it must have been made with the same model and quant config.
        backend: what ``ditquant test`` samples the quantized model with: ``fake`` (simulated quantization, float
            GEMMs) or ``integer`` (int8 / int4 weights and ``torch._int_mm``, see ``ditquant.integer``).
        load_integer: a folder written by ``ditquant export`` to test (implies the integer backend); it must have
            been made with the same model and quant config. ``dit`` is then loaded only as the FP reference.
        allow_partial: let ``ditquant test`` evaluate a checkpoint whose calibration did not finish (refused by
            default); every output is then labelled partial, with the step it reached.
    """

    def __init__(self, dit: DiTSource = DiTSource(), quant: Optional[QuantConfig] = QuantConfig(),
                 sampler: SamplerConfig = SamplerConfig(), evaluation: EvaluationConfig = EvaluationConfig(),
                 reconstruction: Optional[ReconstructionConfig] = None, load_quantized: Optional[InputPath] = None,
                 backend: Literal["fake", "integer"] = "fake", load_integer: Optional[InputPath] = None,
                 allow_partial: bool = False):
        super().__init__()
        if quant is None and (reconstruction is not None or load_quantized is not None or load_integer is not None
                              or backend != "fake"):
            raise UserError("model.reconstruction / load_quantized / load_integer / backend need model.quant (it is "
                            "null)")
        if backend not in BACKENDS:
            raise UserError(f"model.backend must be one of {BACKENDS}, got {backend!r}")
        if load_integer is not None and load_quantized is not None:
            raise UserError("model.load_quantized and model.load_integer are exclusive: give one")
        self.dit_source, self.quant, self.sampler, self.evaluation = dit, quant, sampler, evaluation
        self.reconstruction = reconstruction
        self.load_quantized = None if load_quantized is None else str(load_quantized)
        self.allow_partial = allow_partial
        self._partial: Optional[dict] = None  # the progress of a partial checkpoint under test
        self.backend = "integer" if load_integer is not None else backend
        self.load_integer = None if load_integer is None else str(load_integer)
        self._integer: Optional[torch.nn.Module] = None
        self.automatic_optimization = False
        self.transformer: Optional[torch.nn.Module] = None
        self.vae = None
        self.evaluator: Optional[SampleEvaluator] = None
        self.reconstructor: Optional[BlockReconstructor] = None
        self._resume_state: Optional[dict] = None
        self._fit_started = None
        self._fit_seconds_before = 0.0  # fit time of the segments before a resume
        self._start_step = 0  # fit_step when this segment started
        self._num_fit_steps: Optional[int] = None
        self._activations_observed = False

    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        loaded = self._loaded = load_dit(self.dit_source)  # the run's only copy of the model
        self.dit_config: DiTConfig = loaded.config
        self.latent_scale = loaded.latent_scale
        self.vae = loaded.vae  # not a submodule: never quantized, never checkpointed
        self.transformer = loaded.transformer
        self._fingerprint = weights_fingerprint(self.transformer)  # the FP weights, before any method folds into them
        if self.load_integer is not None:  # the exported model samples; the transformer stays FP, as the reference
            self._set_integer_transformer(load_integer_model(self.load_integer, self.quant, self.dit_config))
        elif self.quant is not None:
            if self.load_quantized is not None and not self.quant.layer_group_sizes:  # a searched layout
                self.quant = replace(self.quant, layer_group_sizes=saved_layer_group_sizes(self.load_quantized))
            try:
                quantize_model(self.transformer, self.quant)
            except UserError as e:  # name the option as the user wrote it
                raise UserError(f"model.{e}" if str(e).startswith("quant.") else str(e)) from None
            if self.load_quantized is not None:
                load_quantized(self.transformer, self.load_quantized, self.dit_source, self.quant)
            Console(stderr=True).print(quantization_table(self.transformer))

    @contextlib.contextmanager
    def fp_view(self):
        """The loaded model exactly as loaded (quantized layers unwrapped) for the block: what the calibration set
        is recorded with, before any method changed the weights."""
        if self.quant is None or self.load_integer is not None:
            yield self._loaded
            return
        with unwrapped(self.transformer):
            yield self._loaded

    def train(self, mode: bool = True) -> "DiTQuantization":
        # Lightning switches to train mode for fit; the DiT must keep inference behaviour (its class-label dropout
        # would otherwise replace calibration labels with the null label at random).
        super().train(mode)
        if self.transformer is not None:
            self.transformer.eval()
        return self

    # ---- fit: activation ranges, then block reconstruction, one step per training batch ----

    def configure_optimizers(self):
        return None  # the reconstructor owns one optimizer per stage (its state is in the checkpoint)

    @property
    def integer_transformer(self) -> Optional[torch.nn.Module]:
        """The integer model the test samples with (backend ``integer``)."""
        return self._integer

    def _set_integer_transformer(self, model: torch.nn.Module) -> None:
        # Outside the module tree (nn.Module.__setattr__ would register it), so that Lightning checkpoints and their
        # loading see only the fake-quantized transformer.
        self.__dict__["_integer"] = model

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

    def set_layer_group_sizes(self, sizes: dict[str, int]) -> None:
        """Adopt per-layer group sizes (a granularity search's result): the config and the model's quantizers."""
        self.quant = replace(self.quant, layer_group_sizes=dict(sizes))
        apply_group_sizes(self.transformer, self.quant)

    # ---- methods (``ditquant.MethodCallback``): what they may use of this run ----

    def method_context(self, resume: Optional[dict] = None, save_progress=lambda state: None) -> MethodContext:
        attached = self._trainer is not None
        data = self.trainer.datamodule if attached else None
        return MethodContext(
            batches=data.calibration_loader if data is not None else None,
            batch_size=data.batch_size if data is not None else 32, quant=self.quant,
            reconstruction=self.reconstruction,
            set_quant=lambda quant: self.set_layer_group_sizes(quant.layer_group_sizes),
            scorer=sample_set_scorer(self.dit_config, self.dit_source, self.sampler, self.evaluation.fid_features,
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

    def _header(self) -> dict:
        """What a checkpoint was made with (every option that changes its numbers) and how far it got."""
        dit = dataclasses.asdict(self.dit_source)
        model = {"dit": {k: v for k, v in dit.items() if k not in ("source", "vae")},  # paths may move
                 "quant": {k: v for k, v in dataclasses.asdict(self.quant).items() if k != "layer_group_sizes"}
                 if self.quant is not None else None,
                 "reconstruction": dataclasses.asdict(self.reconstruction) if self.reconstruction else None,
                 "sampler": dataclasses.asdict(self.sampler)}  # the calibration set is recorded with it
        header = {"weights": self._fingerprint, "model": model}
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and hasattr(data, "recipe_args"):
            header["data"] = dict(data.recipe_args, batch_size=data.batch_size)
        return yaml_plain(header)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.quant is not None and self.quant.layer_group_sizes:
            checkpoint["layer_group_sizes"] = dict(self.quant.layer_group_sizes)
        if self.reconstructor is not None:
            checkpoint["reconstruction"] = self.reconstructor.state_dict()
        elif self._resume_state is not None:
            checkpoint["reconstruction"] = self._resume_state
        progress = self.progress()
        seconds = self._fit_seconds_before + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)
        checkpoint["ditquant"] = {"made_with": self._header(), "fit_seconds": seconds,
                                  "progress": {k: progress[k] for k in ("step", "total", "finished", "where")}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before the state is loaded: the quantizers must first have the checkpoint's group sizes.
        path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        info = checkpoint.get("ditquant")
        if not isinstance(info, dict) or "made_with" not in info:
            raise UserError(f"{path}: not a ditquant checkpoint, or made by a ditquant older than its header (start "
                            "a new fit)")
        made_with, expected = info["made_with"], self._header()
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if made_with.get("weights", expected["weights"]) != expected["weights"]:
            raise UserError(f"{path} was made from different FP weights than model.dit.source "
                            f"{self.dit_source.source} (weights fingerprint {made_with.get('weights')} there, "
                            f"{expected.get('weights')} here)")
        if not fitting:  # test needs the model and quant config; how it was calibrated is fit's business
            made_with, expected = ({"model": {k: d["model"][k] for k in ("dit", "quant")}} for d in (made_with,
                                                                                                    expected))
        check_same(made_with, expected, str(path))
        progress = info["progress"]
        if not fitting and not progress["finished"]:
            if not self.allow_partial:
                raise UserError(f"{path}: calibration did not finish (stopped at {progress['where']}); resume it "
                                "with `ditquant fit <same --config> --ckpt_path last`, or evaluate the partial model "
                                "with --model.allow_partial true (its outputs are then labelled partial)")
            self._partial = progress
        self._fit_seconds_before = float(info.get("fit_seconds") or 0.0)
        saved = checkpoint.get("layer_group_sizes") or {}
        if self.quant is not None and saved != self.quant.layer_group_sizes:
            if self.quant.layer_group_sizes:
                raise UserError("model.quant.layer_group_sizes differ from the ones the checkpoint was made with; "
                                "drop them from the config (the checkpoint knows its own) or start a new fit")
            self.set_layer_group_sizes(saved)
        self._resume_state = checkpoint.get("reconstruction")

    def on_train_end(self) -> None:
        if self.fit_step < self.num_fit_steps():
            return  # stopped early (max_steps / max_time): the checkpoint holds the progress, the CLI says so
        missing = uncalibrated_layers(self.transformer)
        if missing:
            raise RuntimeError(f"{len(missing)} quantizers saw no calibration data, e.g. {missing[:3]}")
        root = Path(self.trainer.default_root_dir)
        seconds = self._fit_seconds_before + (time.perf_counter() - self._fit_started if self._fit_started else 0.0)
        if self.trainer.is_global_zero:
            save_quantized(self.transformer, root / "quantized", self.dit_source, self.quant)
            summary = {"label": self.quant.label(), "weight_sqnr_db": weight_sqnr_db(self.transformer),
                       "fit_seconds": seconds,
                       "preprocessing": {cb.method.name: cb.report for cb in self.trainer.callbacks
                                         if isinstance(getattr(cb, "method", None), Method)},
                       "reconstruction": self.reconstructor.summary if self.reconstructor is not None else []}
            write_json(summary, root / "quantized" / "fit_summary.json")
        log.info("weight SQNR %.2f dB; calibrated model saved to %s", weight_sqnr_db(self.transformer),
                 root / "quantized")

    # ---- test: paired sampling and metrics ----

    def on_test_start(self) -> None:
        out = Path(self.trainer.default_root_dir) / "test"
        if self.trainer.is_global_zero:  # nothing of an earlier test may pass for this one's result
            (out / "metrics.json").unlink(missing_ok=True)
            remove_stale_temporaries(out)
        if self.quant is not None and (missing := uncalibrated_layers(self.transformer)):
            raise UserError(f"the quantized model is not calibrated ({len(missing)} layers, e.g. {missing[0]}): "
                            "run `ditquant fit` with this config first, or pass --ckpt_path")
        if self.backend == "integer" and self.integer_transformer is None:
            self._set_integer_transformer(to_integer(self.transformer))
        if self.integer_transformer is not None:
            self.integer_transformer.to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        self.evaluator = SampleEvaluator(self.evaluation, self.sampler, self.dit_config, self.dit_source,
                                         vae=self.vae, latent_scale=self.latent_scale,
                                         compare_fp=self.quant is not None)
        log.info("test: sampling %d images (%s, %d steps)", self.trainer.datamodule.num_test_samples,
                 self.sampler.kind, self.sampler.num_steps)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        model = self.integer_transformer if self.integer_transformer is not None else self.transformer
        labels = batch["index"] % self.dit_config.num_classes  # classes in turn: each equally represented
        self.evaluator.update(model, batch["index"], labels, reference=self.transformer)

    def on_test_epoch_end(self) -> None:
        interrupt.check()  # a stop during the last batch: no metrics file
        out_dir = self.trainer.default_root_dir + "/test"
        label = (self.quant.label() + (" integer" if self.backend == "integer" else "")) if self.quant else "FP"
        if self._partial is not None:
            label += f" PARTIAL ({self._partial['where']})"
        metrics = self.evaluator.finish(out_dir, label=label, write=self.trainer.is_global_zero,
                                        extra={"partial": self._partial} if self._partial is not None else None)
        for name, value in metrics.items():
            if isinstance(value, float):
                self.log(f"test/{name}", value, rank_zero_only=True)

