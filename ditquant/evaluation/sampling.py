"""Paired, seeded evaluation sampling: the quantized and FP models denoise the same noise with the same step noise.

Sample i always gets the noise seeded by (seed, i), so results do not depend on batch size or on which process
draws it, and quantized-vs-FP comparisons (PSNR, paired FID) compare like with like.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from PIL import Image

from ditquant.errors import UserError
from ditquant.io import atomic_write
from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.models.bundled.features import IMAGE_SIZE
from ditquant.models.dit import DiTConfig
from ditquant.quant.modules import quant_disabled

log = logging.getLogger(__name__)
FEATURES = ("auto", "fashion-mnist", "inception", "none")


@dataclass(frozen=True)
class EvaluationConfig:
    """What ``ditquant test`` measures.

    Args:
        seed: seeds every sample's initial and step noise (sample i: seed, i).
        fid_features: feature extractor for FID against data: ``fashion-mnist`` (the bundled domain classifier),
            ``inception`` (needs the optional extra ``ditquant[inception]``), ``none``, or ``auto`` (the
            domain classifier for the bundled model, Inception otherwise, skipped with a warning if unavailable).
        compare_fp: also sample the FP model with the same noise: FID and PSNR of quantized vs FP.
        fp_reference: the ``test`` folder of an earlier FP ``ditquant test`` of the same weights, sampler, seed and
            at least as many samples: its ``samples.npz`` stands in for the FP samples instead of sampling the FP
            model again (half the test's time). FID and PSNR vs FP then compare against those 8-bit images, which
            moves them only by the rounding to 8 bits.
        grid_per_class: samples per class in the PNG grid (one row per class, up to 16 classes).
    """

    seed: int = 0
    fid_features: Literal["auto", "fashion-mnist", "inception", "none"] = "auto"
    compare_fp: bool = True
    fp_reference: Optional[str] = None
    grid_per_class: int = 10

    def __post_init__(self):
        if self.fid_features not in FEATURES:
            raise UserError(f"evaluation.fid_features must be one of {FEATURES}, got {self.fid_features!r}")


def feature_kind(kind: str, source) -> str:
    """Resolve ``auto``: the domain classifier for the bundled model, Inception otherwise."""
    if kind == "auto":
        return "fashion-mnist" if getattr(source, "source", None) == "bundled" else "inception"
    return kind


def check_feature_input(kind: str, dit: DiTConfig, vae=None, option: str = "model.evaluation.fid_features"):
    """The domain feature net and its reference statistics are made from 28x28 grey-scale images: samples of any
    other size would be resized and scored against statistics they do not match, so that is refused."""
    if kind != "fashion-mnist":
        return
    size = dit.input_size * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    channels = vae.config.out_channels if vae is not None else dit.in_channels
    if size != IMAGE_SIZE or channels not in (1, 3):
        raise UserError(f"{option}: fashion-mnist features and their reference statistics are for "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE} images, but this model samples {size}x{size}; set it to none (or "
                        "inception with the optional extra)")


def seeded_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int, stream: int) -> torch.Tensor:
    """Noise for each sample index from its own generator (stream 0: initial noise; 1: step noise)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        (seed * 1_000_003 + int(i)) * 2 + stream)) for i in indices])


def step_generators(indices: torch.Tensor, seed: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed((seed * 1_000_003 + int(i)) * 2 + 1) for i in indices]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, the layout of ADM's sample archives."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_grid(images: np.ndarray, labels: np.ndarray, per_class: int, path: Path,
               row_names: Optional[list[str]] = None) -> None:
    """A PNG with one row per class (up to 16 classes), as many columns as every class can fill (≤ per_class);
    ``row_names`` (by class index: the prompts of a text-to-image model) are written left of their rows."""
    classes = sorted(set(labels.tolist()))[:16]
    columns = min([per_class] + [int((labels == c).sum()) for c in classes])
    if not classes or columns < 1:
        return
    grid = np.concatenate([np.concatenate(list(images[labels == c][:columns]), axis=1) for c in classes], axis=0)
    mode = "L" if grid.shape[-1] == 1 else "RGB"
    picture = Image.fromarray(grid.squeeze(-1) if mode == "L" else grid, mode)
    if row_names is not None:
        picture = _with_row_names(picture, [row_names[c] for c in classes], images.shape[1])
    with atomic_write(path) as tmp:
        picture.save(tmp, format="PNG")


def _with_row_names(grid: Image.Image, names: list[str], row_height: int) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    margin = 4 + max(int(draw.textlength(n, font=font)) for n in names)
    out = Image.new(grid.mode, (grid.width + margin, grid.height), 255 if grid.mode == "L" else (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        draw.text((2, i * row_height + max(0, row_height - 11) // 2), name, fill=0 if out.mode == "L" else (0, 0, 0),
                  font=font)
    return out


def write_samples(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """An ADM-layout sample archive: uint8 NHWC ``arr_0``, class labels ``arr_1``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, arr_0=images, arr_1=labels)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """The inverse of ``to_uint8``: (N, H, W, C) uint8 -> (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_fp_reference(folder: str, weights: str, sampler: SamplerConfig, seed: int, num_samples: int) -> np.ndarray:
    """The FP samples of an earlier FP test (``EvaluationConfig.fp_reference``), refused unless they were made
    from the same weights with the same sampler and seed, and cover ``num_samples``."""
    option, root = "model.evaluation.fp_reference", Path(folder)
    if not (root / "metrics.json").is_file() or not (root / "samples.npz").is_file():
        raise UserError(f"{option}: {root} has no metrics.json and samples.npz of a finished `ditquant test`")
    made = json.loads((root / "metrics.json").read_text())
    wanted = {"label": "FP", "weights": weights, "sampler": asdict(sampler), "seed": seed}
    for key, value in wanted.items():
        if made.get(key) != value:
            raise UserError(f"{option}: {root} was not made with {key} {value} (it has {made.get(key)}); its "
                            "samples cannot stand in for this model's FP samples")
    if made.get("num_samples", 0) < num_samples:
        raise UserError(f"{option}: {root} has {made.get('num_samples')} samples, this test draws {num_samples}")
    with np.load(root / "samples.npz") as archive:
        images = archive["arr_0"]
    if len(images) != made["num_samples"]:
        raise UserError(f"{option}: {root / 'samples.npz'} holds {len(images)} samples, its metrics.json says "
                        f"{made['num_samples']}")
    return images


def write_json(obj: dict, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


class SampleEvaluator:
    """Accumulates samples and metrics over the test batches; ``finish`` computes and writes everything."""

    def __init__(self, config: EvaluationConfig, sampler: SamplerConfig, dit: DiTConfig, source, vae=None,
                 latent_scale: float = 1.0, compare_fp: bool = True, fp_reference: Optional[np.ndarray] = None,
                 condition_names: Optional[list[str]] = None, conditions_are_classes: bool = False):
        """``fp_reference``: the FP samples (uint8, by sample index) to compare with instead of sampling FP;
        ``condition_names``: what each condition index means (a text-to-image model's prompts), shown in the grids
        and written to ``prompts.txt``; ``conditions_are_classes``: condition i asks for Fashion-MNIST class i (the
        bundled models), so the domain classifier's accuracy on the samples is reported (``class_accuracy``)."""
        self.condition_names, self.conditions_are_classes = condition_names, conditions_are_classes
        self.config, self.sampler, self.dit, self.source = config, sampler, dit, source
        self.vae, self.latent_scale = vae, latent_scale
        self.compare_fp = compare_fp and config.compare_fp
        self.fp_reference = fp_reference
        check_feature_input(self._feature_kind(), dit, vae)
        self.fid = self._make_fid()
        self.paired = self._make_fid(paired=True) if self.compare_fp else None
        self.inception_score = self._make_inception_score()
        self.indices, self.images, self.fp_images, self.labels, self.psnr = [], [], [], [], []

    def _make_fid(self, paired: bool = False):
        from ditquant.evaluation import metrics

        kind = self._feature_kind()
        if kind == "none":
            return None
        if kind == "fashion-mnist":
            return metrics.domain_fid_metric() if paired else metrics.domain_fid()
        try:
            return metrics.inception_fid(normalize=True)
        except ImportError as e:
            if self.config.fid_features == "inception":
                raise
            log.warning("FID skipped: %s", e)
            return None

    def _feature_kind(self) -> str:
        return feature_kind(self.config.fid_features, self.source)

    def _make_inception_score(self):
        """Inception Score alongside Inception FID (ImageNet models); not meaningful for the bundled domain."""
        from ditquant.evaluation import metrics

        if self._feature_kind() != "inception" or self.fid is None:
            return None
        return metrics.inception_score()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.latent_scale).sample

    @torch.no_grad()
    def update(self, model: torch.nn.Module, indices: torch.Tensor, labels: torch.Tensor,
               reference: Optional[torch.nn.Module] = None) -> None:
        """Sample ``model``; with FP comparison, also the FP model: ``reference`` (default: ``model``) with its
        quantizers off."""
        device = labels.device
        shape = (self.dit.in_channels, self.dit.input_size, self.dit.input_size)
        noise = seeded_noise(indices, shape, self.config.seed, 0).to(device)
        images = self._decode(sample(model, noise, labels, self.sampler,
                                     step_generators(indices, self.config.seed, device))).clamp(-1, 1)
        self.indices.append(indices.cpu().numpy())
        self.images.append(to_uint8(images))
        self.labels.append(labels.cpu().numpy())
        if self.fid is not None:
            self.fid.update(((images + 1) / 2).cpu(), real=False)
        if self.inception_score is not None:
            self.inception_score.update(((images + 1) / 2).cpu())
        if self.compare_fp:
            fp = self._fp_samples(model if reference is None else reference, noise, indices, labels)
            self.fp_images.append(to_uint8(fp))
            mse = (images - fp).square().flatten(1).mean(1).clamp(min=1e-12)
            self.psnr.append((10 * torch.log10(4.0 / mse)).cpu())  # data range 2 ([-1, 1])
            if self.paired is not None:
                self.paired.update(((fp + 1) / 2).cpu(), real=True)
                self.paired.update(((images + 1) / 2).cpu(), real=False)

    def _fp_samples(self, reference: torch.nn.Module, noise: torch.Tensor, indices: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """The FP samples of these indices: from ``fp_reference`` if given, else ``reference`` with its quantizers
        off, from the same noise."""
        if self.fp_reference is not None:
            return from_uint8(self.fp_reference[indices.cpu().numpy()]).to(labels.device)
        with quant_disabled(reference):
            return self._decode(sample(reference, noise, labels, self.sampler,
                                       step_generators(indices, self.config.seed, labels.device))).clamp(-1, 1)

    def _gathered(self) -> dict[str, np.ndarray]:
        """Every process's samples, in sample-index order (one process: its own)."""
        local = {"index": np.concatenate(self.indices), "images": np.concatenate(self.images),
                 "labels": np.concatenate(self.labels)}
        if self.compare_fp:
            local["fp_images"] = np.concatenate(self.fp_images)
            local["psnr"] = torch.cat(self.psnr).numpy()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
            local = {k: np.concatenate([p[k] for p in parts]) for k in local}
        order = np.argsort(local["index"], kind="stable")
        return {k: v[order] for k, v in local.items()}

    def finish(self, out_dir: str, label: str, write: bool = True, extra: Optional[dict] = None) -> dict:
        """Compute the metrics (torchmetrics syncs FID state across processes) and, if ``write``, the files
        (``metrics.json`` last, so that a complete-looking result exists only once everything is written)."""
        out = Path(out_dir)
        data = self._gathered()
        images, labels = data["images"], data["labels"]
        metrics: dict = {"label": label, "num_samples": int(len(images)), "sampler": asdict(self.sampler),
                         "seed": self.config.seed, **(extra or {})}
        if self.fid is not None and len(images) >= 2:
            metrics["fid_vs_data"] = float(self.fid.compute())
        if self.inception_score is not None and len(images) >= 2:
            metrics["inception_score"] = float(self.inception_score.compute()[0])
        if self.conditions_are_classes and len(images):
            from ditquant.evaluation.metrics import class_accuracy

            metrics["class_accuracy"] = class_accuracy(images, labels)
        if self.compare_fp:
            metrics["psnr_vs_fp"] = float(data["psnr"].mean())
            if self.paired is not None and len(images) >= 2:
                metrics["fid_vs_fp"] = float(self.paired.compute())
        if not write:
            return metrics
        out.mkdir(parents=True, exist_ok=True)
        write_samples(images, labels, out / "samples.npz")
        write_grid(images, labels, self.config.grid_per_class, out / "grid.png", self.condition_names)
        if self.condition_names is not None:  # samples.npz's labels index these lines
            with atomic_write(out / "prompts.txt") as tmp:
                tmp.write_text("".join(name + "\n" for name in self.condition_names))
        if self.compare_fp:  # the FP samples of the same seeds, for external evaluators (ADM's suite)
            write_samples(data["fp_images"], labels, out / "samples_fp.npz")
            write_grid(data["fp_images"], labels, self.config.grid_per_class, out / "grid_fp.png",
                       self.condition_names)
        write_json(metrics, out / "metrics.json")
        log.info("test metrics: %s", metrics)
        return metrics
