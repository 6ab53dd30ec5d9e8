"""The Python API: every step ``ditquant fit`` / ``ditquant test`` run, as plain functions (no Lightning).

    import ditquant as dq

    loaded = dq.load("bundled")                                          # a LoadedDiT: transformer, VAE, config
    sampler = dq.SamplerConfig(kind="ddpm", num_steps=50, cfg_scale=1.5)
    calibration = dq.calibration_set(loaded, sampler, num_timesteps=25, samples_per_timestep=32)
    model = dq.quantize(loaded.transformer, dq.QuantConfig(weight=dq.QuantSpec(bits=4, granularity="channel")))
    dq.balance(model, calibration)                                       # PTQ4DiT's CSB + SSC, folded (optional)
    dq.calibrate(model, calibration)                                     # static activation ranges
    dq.reconstruct(model, calibration, dq.ReconstructionConfig(iterations=500))
    images = dq.generate(model, labels=torch.arange(10), sampler=sampler)  # noise seeded per index, as ditquant test
    dq.save_quantized(model, "runs/mine/quantized", dq.DiTSource("bundled"), config)

Each function does what the CLI does at that step, in the same order, so a script built from them reproduces a
``ditquant fit`` of the same settings exactly (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ditquant.calibration.dataset import CalibrationSet, calibration_batches, load_or_record
from ditquant.calibration.observe import observe_activation_ranges
from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.evaluation.sampling import seeded_noise, step_generators
from ditquant.evaluation.sample_fid import sample_set_scorer
from ditquant.methods import (GPTQ, GranularitySearch, LowRankCompensation, Method, MethodContext, SalienceBalancing,
                              TemporalSmoothing, run_methods)
from ditquant.methods.smoothing import ALPHA_GRID
from ditquant.models.layout import BLOCK_LINEAR_ROLES
from ditquant.models.loading import DiTSource, LoadedDiT, load_dit
from ditquant.models.adapters import quantize_model
from ditquant.models.adapters.pixart import attach_prompts
from ditquant.models.pixart import LoadedPixArt, PixArtSource, load_pixart as _load_pixart
from ditquant.errors import UserError
from ditquant.quant.config import QuantConfig
from ditquant.reconstruction.config import ReconstructionConfig
from ditquant.reconstruction.reconstructor import BlockReconstructor


def load(source: str | Path = "bundled", **options) -> LoadedDiT:
    """A pretrained DiT: ``bundled``, an original checkpoint, a diffusers folder or pipeline, or a hub id;
    ``options`` are ``DiTSource``'s (``name``, ``vae``, architecture checks, ...)."""
    return load_dit(DiTSource(source=str(source), **options))


def load_pixart(source: str | Path = "bundled", **options) -> LoadedPixArt:
    """A PixArt text-to-image pipeline (``bundled``: the mini PixArt; a pipeline folder, a transformer folder, a hub
    id) with its prompts encoded and attached, so ``loaded.transformer`` takes prompt indices as conditions;
    ``options`` are ``PixArtSource``'s (``prompts``, ``text_encoder``, ``vae``, ``max_sequence_length``)."""
    loaded = _load_pixart(PixArtSource(source=str(source), **options))
    if loaded.prompts is None:
        raise UserError(f"{source}: no text encoder to encode the prompts with (pass text_encoder=...)")
    attach_prompts(loaded.transformer, loaded.prompts)
    return loaded


def calibration_set(loaded: LoadedDiT, sampler: SamplerConfig = SamplerConfig(), num_timesteps: Optional[int] = 25,
                    samples_per_timestep: int = 32, seed: int = 0, classes: Optional[Sequence[int]] = None,
                    cache_dir: str | Path = "runs/calibration") -> CalibrationSet:
    """The timestep-stratified calibration set of the FP model ``loaded`` (recorded from ``sampler``, or reused from
    ``cache_dir`` when the same recipe was recorded before). Call it before quantizing ``loaded.transformer``."""
    device = next(loaded.transformer.parameters()).device
    calibration, _ = load_or_record(loaded, sampler, cache_dir, num_timesteps, samples_per_timestep, seed,
                                    tuple(classes) if classes is not None else None, device)
    return calibration


def quantize(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Wrap ``model``'s layers in quantized layers per ``config``, in place (weights round-to-nearest)."""
    return quantize_model(model, config)


def calibrate(model: nn.Module, calibration: CalibrationSet, batch_size: int = 32) -> None:
    """Observe the static activation ranges over the calibration set (``data.batch_size`` entries per batch)."""
    observe_activation_ranges(model, calibration_batches(calibration, batch_size))


def reconstruct(model: nn.Module, calibration: CalibrationSet, config: ReconstructionConfig,
                spill_dir: Optional[str | Path] = None, on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Block reconstruction (AdaRound + activation step sizes) of a calibrated model; returns the per-unit losses."""
    reconstructor = BlockReconstructor(model, config, calibration, Path(spill_dir) if spill_dir else None)
    reconstructor.run(on_step)
    return reconstructor.summary


def balance(model: nn.Module, calibration: CalibrationSet, salience: str = "ssc", batch_size: int = 32) -> dict:
    """PTQ4DiT's salience balancing (CSB, with SSC or the middle timestep), folded into the weights. Run it after
    ``quantize`` and before ``calibrate``."""
    return _run(model, calibration, SalienceBalancing(salience=salience, batch_size=batch_size))


def smooth(model: nn.Module, calibration: CalibrationSet, alphas: Sequence[float] = ALPHA_GRID,
           alpha: Optional[float] = None, batch_size: int = 32) -> dict:
    """DiTAS's temporal-aggregated smoothing with the per-input α search (or one fixed ``alpha``), folded."""
    return _run(model, calibration, TemporalSmoothing(alphas=list(alphas), alpha=alpha, batch_size=batch_size))


def low_rank(model: nn.Module, rank: int = 32, iterations: int = 10,
             roles: Sequence[str] = BLOCK_LINEAR_ROLES) -> dict:
    """DiTAS's training-free LoRA for the weights of the layers of ``roles`` (after any smoothing)."""
    return _run(model, None, LowRankCompensation(rank=rank, iterations=iterations, roles=list(roles)))


def gptq(model: nn.Module, calibration: CalibrationSet, batch_size: int = 32, blocksize: int = 128,
         damping: float = 0.01) -> dict:
    """GPTQ weights (Q-DiT), Hessians from the calibration set in batches of ``batch_size``; replaces
    round-to-nearest."""
    return _run(model, calibration, GPTQ(blocksize=blocksize, damping=damping), MethodContext(batch_size=batch_size))


def search_group_sizes(model: nn.Module, loaded: LoadedDiT, quant: QuantConfig, sampler: SamplerConfig,
                       search: Optional[GranularitySearch] = None, output_dir: str | Path = ".") -> QuantConfig:
    """Q-DiT's group-size search (``search``'s options; default the paper's), candidates scored by the sample-set
    FID of ``loaded``'s model sampled with ``sampler``; applies the best sizes to ``model`` and returns the config
    with them (also written to ``output_dir/group_sizes.yaml``)."""
    found = {}
    ctx = MethodContext(quant=quant, set_quant=lambda q: found.setdefault("quant", q), output_dir=Path(output_dir),
                        scorer=sample_set_fid(loaded, sampler))
    _run(model, None, search or GranularitySearch(), ctx)
    return found.get("quant", quant)


def sample_set_fid(loaded: LoadedDiT, sampler: SamplerConfig, features: str = "auto"):
    """``MethodContext.scorer`` for ``loaded``'s model: a searching method's options -> a FID-of-a-seeded-sample-set
    score of a model (lower is better)."""
    return sample_set_scorer(loaded.config, loaded.source, sampler, features, loaded.vae, loaded.latent_scale)


def _run(model: nn.Module, calibration, method: Method, ctx: Optional[MethodContext] = None) -> dict:
    return run_methods(model, calibration, [method], ctx)[0]


@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
           indices: Optional[torch.Tensor] = None, vae=None, latent_scale: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] for ``labels``; sample i gets the noise of (seed, indices[i]) exactly as ``ditquant test``
    draws it (default indices 0, 1, ...), so FP and quantized models can be compared sample by sample."""
    config = model.config
    device = labels.device
    indices = torch.arange(len(labels)) if indices is None else indices
    shape = (config.in_channels, config.sample_size, config.sample_size)
    x = sample(model, seeded_noise(indices, shape, seed, 0).to(device), labels, sampler,
                step_generators(indices, seed, device))
    return (vae.decode(x / latent_scale).sample if vae is not None else x).clamp(-1, 1)

