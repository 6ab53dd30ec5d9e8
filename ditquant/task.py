"""The LightningModule behind ``ditquant fit`` / ``ditquant test``: what both share — the model (loaded once,
quantized per the QuantConfig, or loaded from a calibrated or integer artifact) and the checkpoint header (what a
checkpoint was made with and how far it got) with its checks. What fit does is ``ditquant.fit_loop.FitLoop``
(methods, activation ranges, block reconstruction, the calibrated model); what test does is
``ditquant.eval_loop.EvalLoop`` (paired seeded sampling, metrics)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import replace
from typing import Literal, Optional

import lightning as L
import torch
from rich.console import Console

from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError
from ditquant.eval_loop import EvalLoop
from ditquant.evaluation.sampling import EvaluationConfig, SampleEvaluator
from ditquant.export.calibrated import SEARCHED_LAYOUT, load_quantized, saved_searched_layout
from ditquant.export.integer import load_integer as load_integer_model
from ditquant.fit_loop import FitLoop
from ditquant.io import InputPath, check_same, yaml_plain
from ditquant.models.adapters import adapter_for, quantize_model
from ditquant.models.adapters.pixart import attach_prompts
from ditquant.models.dit import DiTConfig
from ditquant.models.loading import DiTSource, load_dit, weights_fingerprint
from ditquant.models.pixart import PixArtSource, load_pixart
from ditquant.quant.apply import apply_plan, quantization_table, unwrapped
from ditquant.quant.config import QuantConfig
from ditquant.reconstruction.config import ReconstructionConfig
from ditquant.reconstruction.reconstructor import BlockReconstructor

log = logging.getLogger(__name__)
BACKENDS = ("fake", "integer")


class DiTQuantization(FitLoop, EvalLoop, L.LightningModule):
    """Quantize a pretrained DiT and evaluate it.

    Args:
        dit: the pretrained DiT (bundled, original checkpoint, diffusers folder or hub id).
        pixart: a pretrained PixArt text-to-image pipeline instead of a DiT (bundled mini PixArt, pipeline or
            transformer folder, hub id) and the prompts its conditions are; given, ``dit`` is not used.
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
        integer_float_dtype: the integer backend's float parts (attention, GELU, norms, embeddings, unquantized
            layers): ``float32``, or ``bfloat16`` (faster on CPUs with bf16 support; the integer layers' own
            arithmetic stays int8 / float32).
    """

    def __init__(self, dit: DiTSource = DiTSource(), pixart: Optional[PixArtSource] = None,
                 quant: Optional[QuantConfig] = QuantConfig(),
                 sampler: SamplerConfig = SamplerConfig(), evaluation: EvaluationConfig = EvaluationConfig(),
                 reconstruction: Optional[ReconstructionConfig] = None, load_quantized: Optional[InputPath] = None,
                 backend: Literal["fake", "integer"] = "fake", load_integer: Optional[InputPath] = None,
                 allow_partial: bool = False, integer_float_dtype: Literal["float32", "bfloat16"] = "float32"):
        super().__init__()
        if quant is None and (reconstruction is not None or load_quantized is not None or load_integer is not None
                              or backend != "fake"):
            raise UserError("model.reconstruction / load_quantized / load_integer / backend need model.quant (it is "
                            "null)")
        if backend not in BACKENDS:
            raise UserError(f"model.backend must be one of {BACKENDS}, got {backend!r}")
        if integer_float_dtype not in ("float32", "bfloat16"):
            raise UserError(f"model.integer_float_dtype must be float32 or bfloat16, got {integer_float_dtype!r}")
        if integer_float_dtype != "float32" and backend == "fake" and load_integer is None:
            raise UserError("model.integer_float_dtype is for the integer backend (model.backend integer)")
        if load_integer is not None and load_quantized is not None:
            raise UserError("model.load_quantized and model.load_integer are exclusive: give one")
        self.dit_source, self.quant, self.sampler, self.evaluation = dit, quant, sampler, evaluation
        self.pixart_source = pixart
        self.reconstruction = reconstruction
        self.load_quantized = None if load_quantized is None else str(load_quantized)
        self.allow_partial = allow_partial
        self._partial: Optional[dict] = None  # the progress of a partial checkpoint under test
        self.backend = "integer" if load_integer is not None else backend
        self.load_integer = None if load_integer is None else str(load_integer)
        self.integer_float_dtype = getattr(torch, integer_float_dtype)
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
        if self.pixart_source is not None:
            loaded = self._loaded = load_pixart(self.pixart_source)
            if loaded.prompts is None:
                raise UserError(f"model.pixart.source {self.pixart_source.source}: no text encoder to encode the "
                                "prompts with (set model.pixart.text_encoder for a bare transformer folder)")
            attach_prompts(loaded.transformer, loaded.prompts)
        else:
            loaded = self._loaded = load_dit(self.dit_source)  # the run's only copy of the model
        self.dit_config: DiTConfig = loaded.config
        self.latent_scale = loaded.latent_scale
        self.vae = loaded.vae  # not a submodule: never quantized, never checkpointed
        self.transformer = loaded.transformer
        self._fingerprint = weights_fingerprint(self.transformer)  # the FP weights, before any method folds into them
        if self.load_integer is not None:  # the exported model samples; the transformer stays FP, as the reference
            integer = load_integer_model(self.load_integer, self.quant,
                                         adapter_for(self.transformer).architecture(self.transformer))
            if self.pixart_source is not None:
                attach_prompts(integer, loaded.prompts)
            self._set_integer_transformer(integer)
        elif self.quant is not None:
            if self.load_quantized is not None and not any(getattr(self.quant, f) for f in SEARCHED_LAYOUT):
                self.quant = replace(self.quant, **saved_searched_layout(self.load_quantized))
            try:
                quantize_model(self.transformer, self.quant)
            except UserError as e:  # name the option as the user wrote it
                raise UserError(f"model.{e}" if str(e).startswith("quant.") else str(e)) from None
            if self.load_quantized is not None:
                load_quantized(self.transformer, self.load_quantized, self.model_source, self.quant)
            Console(stderr=True).print(quantization_table(self.transformer))

    @property
    def model_source(self):
        """What the model was loaded from: ``pixart`` when given, else ``dit``."""
        return self.pixart_source if self.pixart_source is not None else self.dit_source

    def condition_names(self) -> Optional[list[str]]:
        """The prompts a PixArt model's condition indices stand for (None for class-conditional DiT)."""
        return list(self._loaded.prompts.prompts) if self.pixart_source is not None else None

    def conditions_are_classes(self) -> bool:
        """Condition i asks for Fashion-MNIST class i: the bundled DiT's labels, the mini PixArt's class prompts."""
        source = self.model_source
        return source.source == "bundled" and getattr(source, "prompts", None) is None

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

    def configure_optimizers(self):
        return None  # the reconstructor owns one optimizer per stage (its state is in the checkpoint)

    def set_searched_layout(self, layout: dict[str, dict]) -> None:
        """Adopt a searched per-layer layout (``SEARCHED_LAYOUT`` fields: group sizes, activation bits), in the
        config and in the model's quantizers."""
        self.quant = replace(self.quant, **{f: dict(v) for f, v in layout.items()})
        apply_plan(self.transformer, self.quant)

    # ---- checkpoints: what they were made with, how far they got ----

    def _header(self) -> dict:
        """What a checkpoint was made with (every option that changes its numbers) and how far it got."""
        family = "pixart" if self.pixart_source is not None else "dit"
        source = dataclasses.asdict(self.model_source)
        model = {family: {k: v for k, v in source.items() if k not in ("source", "vae", "prompts", "text_encoder")},
                 # paths may move; what they hold is in the weights fingerprint (and, for prompts, below)
                 "quant": {k: v for k, v in dataclasses.asdict(self.quant).items() if k not in SEARCHED_LAYOUT}
                 if self.quant is not None else None,
                 "reconstruction": dataclasses.asdict(self.reconstruction) if self.reconstruction else None,
                 "sampler": dataclasses.asdict(self.sampler)}  # the calibration set is recorded with it
        if self.pixart_source is not None:
            model["pixart"]["prompts"] = list(self._loaded.prompts.prompts)
        header = {"weights": self._fingerprint, "model": model}
        data = self.trainer.datamodule if self._trainer is not None else None
        if data is not None and hasattr(data, "recipe_args"):
            header["data"] = dict(data.recipe_args, batch_size=data.batch_size)
        return yaml_plain(header)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for field in SEARCHED_LAYOUT:
            if self.quant is not None and getattr(self.quant, field):
                checkpoint[field] = dict(getattr(self.quant, field))
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
            family = "pixart" if self.pixart_source is not None else "dit"
            raise UserError(f"{path} was made from different FP weights than model.{family}.source "
                            f"{self.model_source.source} (weights fingerprint {made_with.get('weights')} there, "
                            f"{expected.get('weights')} here)")
        if not fitting:  # test needs the model and quant config; how it was calibrated is fit's business
            made_with, expected = ({"model": {k: d["model"].get(k) for k in ("dit", "pixart", "quant")
                                              if k in d["model"]}} for d in (made_with, expected))
        check_same(made_with, expected, str(path))
        progress = info["progress"]
        if not fitting and not progress["finished"]:
            if not self.allow_partial:
                raise UserError(f"{path}: calibration did not finish (stopped at {progress['where']}); resume it "
                                "with `ditquant fit <same --config> --ckpt_path last`, or evaluate the partial model "
                                "with --model.allow_partial true (its outputs are then labelled partial)")
            self._partial = progress
        self._fit_seconds_before = float(info.get("fit_seconds") or 0.0)
        for field in SEARCHED_LAYOUT:
            saved = checkpoint.get(field) or {}
            if self.quant is not None and saved != getattr(self.quant, field):
                if getattr(self.quant, field):
                    raise UserError(f"model.quant.{field} differ from the ones the checkpoint was made with; drop "
                                    "them from the config (the checkpoint knows its own) or start a new fit")
                self.set_searched_layout({field: saved})
        self._resume_state = checkpoint.get("reconstruction")
