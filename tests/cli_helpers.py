"""Running the CLI from tests: a runner that treats exit 0 as success, and the arguments of a small bundled run."""

import sys
from pathlib import Path

import torch

from ditquant.cli import main


def run(*args: str) -> None:
    """``ditquant ARGS`` in-process; a non-zero exit propagates as SystemExit (its message is the user's error)."""
    try:
        main(list(args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise


def small_run(config: str, root: Path, calib: Path, test_samples: int, test_batch: int, *extra: str) -> list[str]:
    """fit/test arguments for a quick run on the bundled model: 10 sampling steps, 5 calibration timesteps × 4."""
    return ["--config", config, "--trainer.default_root_dir", str(root), "--data.cache_dir", str(calib),
            "--model.sampler.num_steps", "10", "--data.num_timesteps", "5", "--data.samples_per_timestep", "4",
            "--data.num_test_samples", str(test_samples), "--data.test_batch_size", str(test_batch), *extra,
            "--trainer.enable_progress_bar", "false"]


def fit_command(root: Path, calib: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ditquant", "fit", "--config", "configs/qdiff_w4a8.yaml",
            "--trainer.default_root_dir", str(root), "--data.cache_dir", str(calib),
            "--model.sampler.num_steps", "10", "--data.num_timesteps", "3", "--data.samples_per_timestep", "4",
            "--model.reconstruction.iterations", "12", "--model.reconstruction.activation_iterations", "5",
            "--model.reconstruction.batch_size", "8", "--checkpoint.every_n_steps", "10",
            "--trainer.enable_progress_bar", "false", *extra]


def checkpointed_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["reconstruction"]["step"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return -1
