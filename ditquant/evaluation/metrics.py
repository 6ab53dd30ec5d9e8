"""Image-quality metrics: domain FID on Fashion-MNIST, paired FID, PSNR, and the optional Inception FID.

All FIDs are torchmetrics' ``FrechetInceptionDistance``; the domain versions swap Inception for the bundled
classifier's penultimate features (``features.py``) and preload the real-image statistics of the Fashion-MNIST
test set shipped with the package, so no dataset is needed to score samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from ditquant.errors import UserError
from ditquant.models.bundled.features import DomainFeatureExtractor, load_classifier
from ditquant.models.bundled import CLASSIFIER_FILE, REFERENCE_STATS_FILE

REFERENCES = {"fashion-mnist": REFERENCE_STATS_FILE}
# Keys of the statistics file: the real-feature states of torchmetrics' FID without the "real_" prefix.
STAT_KEYS = ("features_sum", "features_cov_sum", "features_num_samples")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def domain_fid_metric(classifier_path: str | Path = CLASSIFIER_FILE) -> FrechetInceptionDistance:
    """An empty FID on the classifier's features; feed float images in [0, 1], shape (N, 1, 28, 28)."""
    extractor = DomainFeatureExtractor(load_classifier(classifier_path))
    return FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)


def load_reference_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a statistics file written by ``train_classifier.py``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found: they ship with ditquant; regenerate them with "
                                f"`python -m ditquant.models.bundled.train_classifier`")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    stats = load_file(str(path))
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise UserError(f"{path} lacks {missing}: not an FID statistics file (expected keys {STAT_KEYS})")
    return stats, metadata


def domain_fid(reference: str = "fashion-mnist", classifier_path: str | Path = CLASSIFIER_FILE) -> FrechetInceptionDistance:
    """FID against a shipped reference set, real statistics preloaded.

    ``fid.update(samples_in_0_1, real=False); fid.compute()`` scores samples against the reference set;
    ``fid.reset()`` clears only the samples (``reset_real_features=False``).
    """
    if reference not in REFERENCES:
        raise UserError(f"unknown reference {reference!r}; shipped references: {sorted(REFERENCES)}")
    stats, metadata = load_reference_stats(REFERENCES[reference])
    expected = metadata.get("classifier_sha256")
    if expected is not None and expected != file_sha256(classifier_path):
        # Statistics from another classifier would give a plausible-looking but meaningless number.
        raise UserError(f"{REFERENCES[reference]} was computed with a different classifier than {classifier_path}; "
                        f"rerun `python -m ditquant.models.bundled.train_classifier` to write both together")
    fid = domain_fid_metric(classifier_path)
    if stats["features_sum"].shape != fid.real_features_sum.shape:
        raise UserError(f"reference statistics have {stats['features_sum'].shape[0]} features, the classifier "
                        f"{fid.real_features_sum.shape[0]}")
    fid.real_features_sum = stats["features_sum"].to(torch.float64)
    fid.real_features_cov_sum = stats["features_cov_sum"].to(torch.float64)
    fid.real_features_num_samples = stats["features_num_samples"].to(torch.int64).reshape(())
    return fid


@torch.no_grad()
def paired_fid(real_images: torch.Tensor, fake_images: torch.Tensor, batch_size: int = 500,
               classifier_path: str | Path = CLASSIFIER_FILE) -> float:
    """Domain FID between two image sets in [0, 1], e.g. full-precision vs quantized samples of the same seeds."""
    if real_images.shape[0] < 2 or fake_images.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images per set, got {real_images.shape[0]} and {fake_images.shape[0]}")
    fid = domain_fid_metric(classifier_path)
    for images, real in ((real_images, True), (fake_images, False)):
        for chunk in images.split(batch_size):
            fid.update(chunk, real=real)
    return float(fid.compute())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over images of the per-image PSNR in dB; images (N, C, H, W) in [-1, 1] (hence ``data_range=2``)."""
    if a.shape != b.shape:
        raise UserError(f"PSNR needs images of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dims = tuple(range(1, a.dim()))
    per_image = peak_signal_noise_ratio(a.float(), b.float(), data_range=data_range, reduction="none", dim=dims)
    return per_image.mean()


def inception_fid(feature: int = 2048, **kwargs) -> FrechetInceptionDistance:
    """torchmetrics' standard Inception-v3 FID, for ImageNet-scale models (images (N, 3, H, W)).

    Needs torch-fidelity and a torchvision built for the installed torch, which ditquant does not require;
    torch-fidelity downloads the Inception weights on first use. ``kwargs`` go to ``FrechetInceptionDistance``.
    """
    hint = ("Inception FID needs the optional extra: `pip install ditquant[inception]` (torch-fidelity) plus a "
            "torchvision built for your torch. The bundled Fashion-MNIST model uses `domain_fid()`, which needs neither.")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError(hint)
    try:
        return FrechetInceptionDistance(feature=feature, **kwargs)
    except (ImportError, RuntimeError) as e:  # a torchvision built for another torch fails only here
        raise ImportError(f"{hint} (underlying error: {e})") from e


def inception_score(**kwargs):
    """torchmetrics' Inception Score (ImageNet models; same optional requirements as ``inception_fid``)."""
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ImportError("Inception Score needs the optional extra: `pip install ditquant[inception]`")
    from torchmetrics.image.inception import InceptionScore

    return InceptionScore(normalize=True, **kwargs)


@torch.no_grad()
def class_accuracy(images, labels, classifier_path: str | Path = CLASSIFIER_FILE, batch_size: int = 500) -> float:
    """The domain classifier's accuracy on samples whose condition names a Fashion-MNIST class (uint8 NHWC images,
    28x28, 1 or 3 channels; ``labels``: the class each sample was asked for)."""
    classifier = load_classifier(classifier_path)
    x = torch.as_tensor(images).float().div(127.5).sub(1.0).permute(0, 3, 1, 2).mean(dim=1, keepdim=True)
    predicted = torch.cat([classifier(x[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])
    return float((predicted == torch.as_tensor(labels)).float().mean())
