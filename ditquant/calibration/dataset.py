"""Timestep-stratified calibration sets recorded from the FP model's own sampler (PTQ4DiT §5.1 protocol).

The FP sampler runs ``samples_per_timestep`` trajectories (random classes, seeded) and records the model input x_t
at ``num_timesteps`` uniformly spaced sampling steps (PTQ4DiT/Q-Diffusion positions ``i * (S // N)``, noisiest
first). With guidance each entry is served as its pair — (x_t, y) and (x_t, null) — in the same batch, as the model
sees them at sampling time. The file records its recipe and is reused only when the recipe matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.progress import MofNCompleteColumn, Progress
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ditquant.errors import UserError
from ditquant.io import atomic_write
from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.models.adapters import adapter_for
from ditquant.models.loading import weights_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationRecipe:
    """What a calibration set is made of; equal recipes give bit-identical files.

    Args:
        model: description of the FP model (source and architecture) the trajectories come from.
        sampler: the FP sampler (kind, steps, guidance) — the papers use their evaluation sampler.
        num_timesteps: N, how many sampling steps are recorded (PTQ4DiT: 25 at 256 px, 10 at 512 px).
        samples_per_timestep: M, trajectories recorded at each of those steps (PTQ4DiT: 32).
        seed: seeds the classes, the initial noise and the DDPM step noise.
        classes: class ids to draw from (None: all classes of the model).
    """

    model: str
    sampler: SamplerConfig
    num_timesteps: int = 25
    samples_per_timestep: int = 32
    seed: int = 0
    classes: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if not 1 <= self.num_timesteps <= self.sampler.num_steps:
            raise UserError(f"calibration num_timesteps={self.num_timesteps} must be in [1, sampler.num_steps="
                            f"{self.sampler.num_steps}]")
        if self.samples_per_timestep < 1:
            raise UserError(f"calibration samples_per_timestep must be >= 1, got {self.samples_per_timestep}")

    def step_positions(self) -> list[int]:
        stride = self.sampler.num_steps // self.num_timesteps
        return [i * stride for i in range(self.num_timesteps)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@torch.no_grad()
def record_calibration_set(model: torch.nn.Module, recipe: CalibrationRecipe, latent_shape: tuple[int, int, int],
                           batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Run the FP sampler and record x_t at the recipe's steps: xs (N, M, C, H, W), ts (N,), ys (M,)."""
    num_classes = adapter_for(model).num_classes(model)
    classes = torch.tensor(recipe.classes if recipe.classes is not None else range(num_classes))
    if classes.numel() == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise UserError(f"calibration classes must lie in [0, {num_classes}), got {recipe.classes}")
    gen = torch.Generator().manual_seed(recipe.seed)
    m = recipe.samples_per_timestep
    ys = classes[torch.randint(len(classes), (m,), generator=gen)]
    noise = torch.randn(m, *latent_shape, generator=gen)
    positions = set(recipe.step_positions())
    xs, ts = [], []
    progress = Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True)
    task = progress.add_task("recording calibration set (sampling steps)",
                             total=recipe.sampler.num_steps * -(-m // batch_size))
    with progress:
        for start in range(0, m, batch_size):
            chunk, ts = _record_chunk(model, recipe, noise, ys, slice(start, start + batch_size), positions,
                                      lambda *_: progress.advance(task))
            xs.append(chunk)
    return {"xs": torch.cat(xs, dim=1).contiguous(), "ts": torch.tensor(ts, dtype=torch.long), "ys": ys}


def _record_chunk(model, recipe, noise, ys, chunk: slice, positions: set[int], tick) -> tuple[torch.Tensor, list]:
    """Sample trajectories ``chunk``; return x_t at the recorded positions (N, len(chunk), C, H, W) and their t."""
    device = next(model.parameters()).device
    start = chunk.start
    step_gens = [torch.Generator(device).manual_seed(recipe.seed * 1_000_003 + start + i)
                 for i in range(noise[chunk].shape[0])]
    recorded, times = [], []

    def on_step(i, t, x):
        tick()
        if i in positions:
            recorded.append(x.cpu())
            times.append(t)

    sample(model, noise[chunk].to(device), ys[chunk].to(device), recipe.sampler, step_gens, on_step)
    return torch.stack(recorded), times


def calibration_path(directory: Path, recipe: CalibrationRecipe) -> Path:
    return Path(directory) / f"calib-{recipe.digest()}.safetensors"


def tensors_sha256(data: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (the file's checksum, stored in its own metadata)."""
    digest = hashlib.sha256()
    for name in sorted(data):
        t = data[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_finite_calibration(data: dict[str, torch.Tensor], where: str) -> None:
    """Refuse calibration data holding NaN / inf, naming the first bad recorded step."""
    xs = data["xs"]
    bad = ~torch.isfinite(xs.flatten(2)).all(dim=2)  # (N, M)
    if bad.any():
        step, j = (int(i) for i in bad.nonzero()[0])
        raise UserError(f"{where}: calibration data holds NaN or inf values ({int(bad.sum())} of {bad.numel()} "
                        f"entries, first at recorded step {step} (t = {int(data['ts'][step])}), trajectory {j}); the "
                        "FP model produced them: check its weights")


def save_calibration_set(data: dict[str, torch.Tensor], recipe: CalibrationRecipe, path: Path) -> None:
    """Write atomically, with the recipe and the tensors' checksum in the safetensors metadata."""
    with atomic_write(path) as tmp:
        # one metadata entry: safetensors stores metadata as a hash map, so two keys would be written in any order
        header = json.dumps({"recipe": recipe.to_json(), "sha256": tensors_sha256(data)}, sort_keys=True)
        save_file(data, str(tmp), metadata={"calibration": header})


def load_calibration_set(path: Path, recipe: Optional[CalibrationRecipe] = None) -> dict[str, torch.Tensor]:
    """Load a calibration file; with a recipe, refuse a file recorded with a different one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = json.loads((f.metadata() or {}).get("calibration", "{}"))
        stored = metadata.get("recipe")
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read calibration file ({exc})") from None
    if missing := {"xs", "ts", "ys"} - set(data):
        raise UserError(f"{path}: not a calibration file (missing {sorted(missing)})")
    if metadata.get("sha256") != tensors_sha256(data):
        what = "has no checksum (recorded by an older ditquant)" if "sha256" not in metadata else \
            "does not match its checksum (damaged on disk)"
        raise UserError(f"{path}: calibration file {what}; delete it to record it again")
    check_finite_calibration(data, f"{path}")
    if recipe is not None and stored != recipe.to_json():
        raise UserError(f"{path}: recorded with a different recipe\n  file:   {stored}\n  wanted: {recipe.to_json()}")
    return data


class CalibrationSet(Dataset):
    """(x_t, t, y) entries; with guidance each index yields its conditional/null pair (2 rows)."""

    def __init__(self, data: dict[str, torch.Tensor], null_label: int, guidance: bool):
        self.xs, self.ts, self.ys = data["xs"], data["ts"], data["ys"]
        self.null_label = null_label
        self.guidance = guidance
        self.num_timesteps, self.per_timestep = self.xs.shape[:2]

    def __len__(self) -> int:
        return self.num_timesteps * self.per_timestep

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        step, j = divmod(index, self.per_timestep)
        x, t, y = self.xs[step, j], self.ts[step], self.ys[j]
        if not self.guidance:
            return {"x": x[None], "t": t[None], "y": y[None]}
        return {"x": torch.stack([x, x]), "t": torch.stack([t, t]), "y": torch.stack([y, torch.tensor(self.null_label)])}


def collate_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate entries (each one row, or a cond/null pair) into one batch."""
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


def calibration_batches(calibration: Dataset, batch_size: int) -> DataLoader:
    """The one way to feed a calibration set (or a subset) to a model: in order, ``batch_size`` entries per batch
    (a guidance pair counts once and yields two rows), as {x, t, y} batches."""
    return DataLoader(calibration, batch_size=batch_size, shuffle=False, collate_fn=collate_pairs)


def load_or_record(loaded, sampler: SamplerConfig, cache_dir: str | Path, num_timesteps: Optional[int] = 25,
                   samples_per_timestep: int = 32, seed: int = 0, classes: Optional[tuple[int, ...]] = None,
                   device: Optional[torch.device] = None) -> tuple["CalibrationSet", Path]:
    """The calibration set of ``loaded`` (a ``LoadedDiT`` or ``LoadedPixArt``, FP) for this recipe: reused from
    ``cache_dir`` when a file with the same recipe exists there, else recorded from the FP sampler and saved. Returns
    it and its file.

    The FP weights' fingerprint is part of the recipe, so retrained or edited weights never reuse a stale set.
    ``num_timesteps`` None records every step of the sampler's trajectory (DiTAS)."""
    recipe = CalibrationRecipe(model=f"{loaded.description}; weights {weights_fingerprint(loaded.transformer)}",
                               sampler=sampler, num_timesteps=sampler.num_steps if num_timesteps is None
                               else num_timesteps, samples_per_timestep=samples_per_timestep, seed=seed,
                               classes=tuple(classes) if classes is not None else None)
    path = calibration_path(Path(cache_dir), recipe)
    if path.is_file():
        log.info("reusing calibration set %s", path)
        data = load_calibration_set(path, recipe)
    else:
        log.info("recording calibration set %s (%d steps x %d samples)", path, recipe.num_timesteps,
                 recipe.samples_per_timestep)
        c = loaded.config
        data = record_calibration_set(loaded.transformer.to(device or torch.device("cpu")), recipe,
                                      (c.in_channels, c.input_size, c.input_size))
        check_finite_calibration(data, "recording the calibration set")
        save_calibration_set(data, recipe, path)
    model = loaded.transformer
    null = int(adapter_for(model).null_condition(model, torch.zeros(1, dtype=torch.long)))
    return CalibrationSet(data, null_label=null, guidance=recipe.sampler.cfg_scale > 1.0), path
