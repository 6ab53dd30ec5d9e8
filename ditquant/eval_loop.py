"""What ``ditquant test`` does, as a mixin of the LightningModule (``ditquant.task.DiTQuantization``): paired,
seeded sampling of the quantized (fake or integer) and FP models, FID / PSNR, samples written to
``<default_root_dir>/test``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ditquant import interrupt
from ditquant.errors import UserError
from ditquant.evaluation.sampling import SampleEvaluator, load_fp_reference
from ditquant.integer.convert import to_integer
from ditquant.io import remove_stale_temporaries
from ditquant.quant.apply import uncalibrated_layers

log = logging.getLogger(__name__)


class EvalLoop:
    """The test half of DiTQuantization (state set up by its ``__init__`` / ``configure_model``)."""

    @property
    def integer_transformer(self) -> Optional[torch.nn.Module]:
        """The integer model the test samples with (backend ``integer``)."""
        return self._integer

    def _set_integer_transformer(self, model: torch.nn.Module) -> None:
        # Outside the module tree (nn.Module.__setattr__ would register it), so that Lightning checkpoints and their
        # loading see only the fake-quantized transformer.
        self.__dict__["_integer"] = model

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
            self.integer_transformer.to(self.device, self.integer_float_dtype)
        if self.vae is not None:
            self.vae.to(self.device)
        num_samples = self.trainer.datamodule.num_test_samples
        fp_reference = None
        if self.quant is not None and self.evaluation.compare_fp and self.evaluation.fp_reference:
            fp_reference = load_fp_reference(self.evaluation.fp_reference, self._fingerprint, self.sampler,
                                             self.evaluation.seed, num_samples)
        self.evaluator = SampleEvaluator(self.evaluation, self.sampler, self.dit_config, self.model_source,
                                         vae=self.vae, latent_scale=self.latent_scale,
                                         compare_fp=self.quant is not None, fp_reference=fp_reference,
                                         condition_names=self.condition_names(),
                                         conditions_are_classes=self.conditions_are_classes())
        log.info("test: sampling %d images (%s, %d steps)%s", num_samples, self.sampler.kind, self.sampler.num_steps,
                 f"; FP samples from {self.evaluation.fp_reference}" if fp_reference is not None else "")

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
        extra = {"weights": self._fingerprint}  # an FP test's samples can then serve as a later fp_reference
        if self.evaluator.fp_reference is not None:
            extra["fp_reference"] = self.evaluation.fp_reference
        if self._partial is not None:
            extra["partial"] = self._partial
        metrics = self.evaluator.finish(out_dir, label=label, write=self.trainer.is_global_zero, extra=extra)
        for name, value in metrics.items():
            if isinstance(value, float):
                self.log(f"test/{name}", value, rank_zero_only=True)
