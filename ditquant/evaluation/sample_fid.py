"""FID of one fixed, seeded sample set: every model scored sees the same initial noise, step noise and labels, so
two scores differ only by what differs between the models (Q-DiT's search fitness; the paper re-seeds per
candidate for the same effect)."""

from __future__ import annotations

from typing import Literal

import torch

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.errors import UserError
from ditquant.evaluation import metrics
from ditquant.evaluation.sampling import check_feature_input, feature_kind, seeded_noise, step_generators
from ditquant.models.dit import DiTConfig
from ditquant.quant.modules import quant_disabled


class SampleSetFID:
    """Score a model by the FID of ``num_samples`` seeded samples (labels: classes in turn).

    Args:
        reference: ``fp``: against the FP model's samples of the same seeds (sampled once; any feature extractor);
            ``data``: against the shipped real-image statistics (the bundled domain only).
        features: ``auto``, ``fashion-mnist`` or ``inception`` (see ``EvaluationConfig.fid_features``).
    """

    def __init__(self, dit: DiTConfig, source, sampler: SamplerConfig, num_samples: int, batch_size: int, seed: int,
                 reference: Literal["fp", "data"] = "fp", features: str = "auto", vae=None, latent_scale: float = 1.0):
        if num_samples < 2:
            raise UserError(f"an FID needs at least 2 samples, got num_samples={num_samples}")
        if reference not in ("fp", "data"):
            raise UserError(f"reference must be 'fp' or 'data', got {reference!r}")
        kind = feature_kind(features, source)
        if kind not in ("fashion-mnist", "inception"):
            raise UserError(f"the sample-set FID needs a feature extractor (fashion-mnist or inception), got {kind!r}")
        if reference == "data" and kind != "fashion-mnist":
            raise UserError("reference 'data' needs shipped real-image statistics, which exist for the bundled "
                            "Fashion-MNIST domain only; use reference 'fp'")
        self.dit, self.sampler, self.seed, self.batch_size = dit, sampler, seed, batch_size
        self.vae, self.latent_scale = vae, latent_scale
        self.indices = torch.arange(num_samples)
        self.labels = self.indices % dit.num_classes
        check_feature_input(kind, dit, vae, option="the sample-set FID's features")
        if kind == "inception":
            try:
                self.fid = metrics.inception_fid(normalize=True, reset_real_features=False)
            except ImportError as e:
                raise UserError(f"the sample-set FID's features: {e}") from None
        else:
            self.fid = metrics.domain_fid() if reference == "data" else metrics.domain_fid_metric()
        self.reference = reference
        self._reference_ready = reference == "data"

    @torch.no_grad()
    def _images(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's samples of the fixed set, in [0, 1], batch by batch."""
        device = next(model.parameters()).device
        shape = (self.dit.in_channels, self.dit.input_size, self.dit.input_size)
        out = []
        for idx in self.indices.split(self.batch_size):
            noise = seeded_noise(idx, shape, self.seed, 0).to(device)
            x = sample(model, noise, self.labels[idx].to(device), self.sampler,
                       step_generators(idx, self.seed, device))
            if self.vae is not None:
                x = self.vae.decode(x / self.latent_scale).sample
            out.append(((x.clamp(-1, 1) + 1) / 2).float().cpu())
        return out

    def __call__(self, model: torch.nn.Module) -> float:
        """FID of ``model``'s samples (quantizers as they are)."""
        if not self._reference_ready:  # the FP samples of the same seeds, once
            with quant_disabled(model):
                for images in self._images(model):
                    self.fid.update(images, real=True)
            self._reference_ready = True
        self.fid.reset()  # keeps the reference (reset_real_features=False)
        for images in self._images(model):
            self.fid.update(images, real=False)
        return float(self.fid.compute())



def sample_set_scorer(dit: DiTConfig, source, default_sampler: SamplerConfig, default_features: str = "auto",
                      vae=None, latent_scale: float = 1.0, features_option: str = "features"):
    """``MethodContext.scorer`` for one model: builds a ``SampleSetFID`` from a searching method's options, whose
    ``sampler: null`` means ``default_sampler`` and ``features: auto`` means ``default_features``
    (``features_option`` names where that default comes from, for error messages)."""
    def scorer(sampler: SamplerConfig | None = None, num_samples: int = 800, batch_size: int = 64, seed: int = 0,
               reference: Literal["fp", "data"] = "fp", features: str = "auto") -> SampleSetFID:
        resolved = default_features if features == "auto" else features
        try:
            return SampleSetFID(dit, source, sampler or default_sampler, num_samples, batch_size, seed, reference,
                                resolved, vae, latent_scale)
        except UserError as e:
            where = f"features: auto = {features_option}" if features == "auto" else "features"
            raise UserError(f"{where} ({resolved!r}): {e}") from None

    return scorer
