"""LightningDataModule serving the calibration set (fit) and the seeded evaluation sample indices (test).

It is given what it needs: its options at construction, and for fit the run's FP model, sampler and step count
(``prepare_fit``, called by ``ditquant fit`` once the model is loaded and the methods' options are checked). It
never reads the LightningModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ditquant.calibration.dataset import CalibrationRecipe, CalibrationSet, calibration_batches, load_or_record
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError


class EvaluationIndices(Dataset):
    """Sample i of the evaluation set (its condition is the model's business: classes in turn for DiT)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i)}


class ShardSampler(DistributedSampler):
    """Sample indices rank, rank + world, ... without the padding DistributedSampler adds (duplicated samples would
    bias FID). Being a DistributedSampler, Lightning leaves it in place."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class FitSteps(Dataset):
    """Step i of ``ditquant fit`` (the data of every step is chosen by the LightningModule)."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, i: int) -> int:
        return i


class CalibrationData(L.LightningDataModule):
    """Builds (or reuses) the timestep-stratified calibration set of the FP model and serves it.

    The FP model and the sampler recorded from are the run's (``model.dit``, ``model.sampler``, given to
    ``prepare_fit``): the papers calibrate with their evaluation sampler.

    Args:
        num_timesteps: N recorded sampling steps (PTQ4DiT: 25 at 256 px, 10 at 512 px); null records every step
            of the sampler's trajectory (DiTAS), whatever its step count.
        samples_per_timestep: M trajectories (PTQ4DiT: 32).
        seed: seeds classes and noise of the calibration trajectories.
        classes: restrict calibration classes (default: all).
        batch_size: calibration entries per batch when observing activation ranges and filling reconstruction caches
            (a guidance pair counts once and yields two rows).
        cache_dir: where calibration files live; a file is reused when its recipe matches.
        num_test_samples: images sampled by ``ditquant test``.
        test_batch_size: images per test batch (results do not depend on it: noise is seeded per image).
    """

    def __init__(self, num_timesteps: Optional[int] = 25, samples_per_timestep: int = 32, seed: int = 0,
                 classes: Optional[list[int]] = None, batch_size: int = 32, cache_dir: str = "runs/calibration",
                 num_test_samples: int = 1000, test_batch_size: int = 250):
        super().__init__()
        self.recipe_args = dict(num_timesteps=num_timesteps,
                                samples_per_timestep=samples_per_timestep, seed=seed,
                                classes=tuple(classes) if classes is not None else None)
        if (num_timesteps is not None and num_timesteps < 1) or samples_per_timestep < 1:
            raise UserError(f"data.num_timesteps and data.samples_per_timestep must be >= 1, got {num_timesteps} "
                            f"and {samples_per_timestep}")
        for name, value in (("batch_size", batch_size), ("num_test_samples", num_test_samples),
                            ("test_batch_size", test_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"data.{name} must be a positive integer, got {value!r}")
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir)
        self.num_test_samples = num_test_samples
        self.test_batch_size = test_batch_size
        self.calibration: Optional[CalibrationSet] = None
        self.path: Optional[Path] = None
        self.num_fit_steps: Optional[int] = None

    def check_recipe(self, sampler: SamplerConfig) -> None:
        """Refuse a recipe that cannot be recorded with ``sampler``, before any model is loaded."""
        CalibrationRecipe(model="", sampler=sampler, **self._recipe(sampler))

    def _recipe(self, sampler: SamplerConfig) -> dict:
        args = dict(self.recipe_args)
        if args["num_timesteps"] is None:
            args["num_timesteps"] = sampler.num_steps
        return args

    def prepare_fit(self, loaded, sampler: SamplerConfig, num_fit_steps: int,
                    device: Optional[torch.device] = None) -> None:
        """Reuse or record the calibration set of ``loaded`` (the run's FP model, a ``LoadedDiT``) with ``sampler``;
        fit then takes ``num_fit_steps`` training batches."""
        self.check_recipe(sampler)
        self.calibration, self.path = load_or_record(loaded, sampler, self.cache_dir, device=device,
                                                     **self._recipe(sampler))
        self.num_fit_steps = num_fit_steps

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.calibration is None:
            raise RuntimeError("CalibrationData.prepare_fit must run before fit (ditquant fit calls it)")

    def train_dataloader(self) -> DataLoader:
        # fit's batches are step numbers: the LightningModule draws calibration data itself (a full pass to observe
        # activation ranges, then seeded reconstruction batches), so a resumed run needs no dataloader state.
        return DataLoader(FitSteps(self.num_fit_steps), batch_size=None)

    def calibration_loader(self) -> DataLoader:
        """The calibration set in a fixed order, ``batch_size`` entries per batch."""
        return calibration_batches(self.calibration, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        dataset = EvaluationIndices(self.num_test_samples)
        sampler = None
        if self.trainer.world_size > 1:
            sampler = ShardSampler(dataset, self.trainer.world_size, self.trainer.global_rank)
        return DataLoader(dataset, batch_size=self.test_batch_size, sampler=sampler)
