"""The LightningModule behind ``ditquant fit`` / ``ditquant test``.

fit: wrap the DiT's layers per the QuantConfig (weights round-to-nearest), then one pass over the calibration set
observes the activation ranges of the FP model (static quantizers). test: paired, seeded sampling of the quantized
and FP models, FID / PSNR, samples written to ``<default_root_dir>/test``.
"""

from __future__ import annotations

import logging
from typing import Optional

import lightning as L
import torch
from rich.console import Console

from ditquant.diffusion.samplers import SamplerConfig
from ditquant.evaluation.sampling import EvaluationConfig, SampleEvaluator
from ditquant.models.dit import DiTConfig
from ditquant.models.loading import DiTSource, load_dit
from ditquant.quant.apply import quantization_table, quantize_model, uncalibrated_layers, weight_sqnr_db
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations

log = logging.getLogger(__name__)


class DiTQuantization(L.LightningModule):
    """Quantize a pretrained DiT and evaluate it.

    Args:
        dit: the pretrained model (bundled, original checkpoint, diffusers folder or hub id).
        quant: how to quantize; null evaluates the FP model.
        sampler: the evaluation sampler (also used to record the calibration set).
        evaluation: what ``ditquant test`` measures and writes.
    """

    def __init__(self, dit: DiTSource = DiTSource(), quant: Optional[QuantConfig] = QuantConfig(),
                 sampler: SamplerConfig = SamplerConfig(), evaluation: EvaluationConfig = EvaluationConfig()):
        super().__init__()
        self.dit_source, self.quant, self.sampler, self.evaluation = dit, quant, sampler, evaluation
        self.automatic_optimization = False
        self.transformer: Optional[torch.nn.Module] = None
        self.vae = None
        self.evaluator: Optional[SampleEvaluator] = None

    def configure_model(self) -> None:
        if self.transformer is not None:
            return
        loaded = load_dit(self.dit_source)
        self.dit_config: DiTConfig = loaded.config
        self.latent_scale = loaded.latent_scale
        self.vae = loaded.vae  # not a submodule: never quantized, never checkpointed
        self.transformer = loaded.transformer
        if self.quant is not None:
            quantize_model(self.transformer, self.quant)
            Console(stderr=True).print(quantization_table(self.transformer))

    def train(self, mode: bool = True) -> "DiTQuantization":
        # Lightning switches to train mode for fit; the DiT must keep inference behaviour (its class-label dropout
        # would otherwise replace calibration labels with the null label at random).
        super().train(mode)
        if self.transformer is not None:
            self.transformer.eval()
        return self

    # ---- fit: round-to-nearest weights, activation ranges observed on the calibration set ----

    def configure_optimizers(self):
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.quant is None:
            raise ValueError("quant is null: there is nothing to calibrate (ditquant test evaluates the FP model)")
        with torch.no_grad(), observing_activations(self.transformer):
            self.transformer(batch["x"], batch["t"], batch["y"])

    def on_train_end(self) -> None:
        missing = uncalibrated_layers(self.transformer)
        if missing:
            raise RuntimeError(f"{len(missing)} layers saw no calibration data, e.g. {missing[:3]}")
        log.info("weight SQNR %.2f dB", weight_sqnr_db(self.transformer))

    # ---- test: paired sampling and metrics ----

    def on_test_start(self) -> None:
        if self.quant is not None and (missing := uncalibrated_layers(self.transformer)):
            raise ValueError(f"the quantized model is not calibrated ({len(missing)} layers, e.g. {missing[0]}): "
                               "run `ditquant fit` with this config first, or pass --ckpt_path")
        if self.vae is not None:
            self.vae.to(self.device)
        self.evaluator = SampleEvaluator(self.evaluation, self.sampler, self.dit_config, self.dit_source,
                                         vae=self.vae, latent_scale=self.latent_scale,
                                         compare_fp=self.quant is not None)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluator.update(self.transformer, batch["index"], batch["y"])

    def on_test_epoch_end(self) -> None:
        out_dir = self.trainer.default_root_dir + "/test"
        metrics = self.evaluator.finish(out_dir, label=self.quant.label() if self.quant else "FP")
        for name, value in metrics.items():
            if isinstance(value, float):
                self.log(f"test/{name}", value)
