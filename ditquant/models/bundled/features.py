"""Domain feature extractor for FID on Fashion-MNIST: a small CNN classifier trained on the train split.

Inception-v3 features are meaningless on 28x28 grayscale clothing, so FID for the bundled model is measured
in the penultimate layer of a classifier trained on the domain itself (the "domain FID" of small-scale diffusion
papers). The weights ship with the package (``train_classifier.py`` writes them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ditquant.errors import UserError
from ditquant.models.bundled import CLASSIFIER_FILE

FEATURE_DIM = 128
IMAGE_SIZE = 28


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FashionMNISTClassifier(nn.Module):
    """Three conv stages (28 → 14 → 7 → 3) and a 128-d penultimate layer; input (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv_block(1, width), nn.MaxPool2d(2),                        # (N, w, 14, 14)
            _conv_block(width, 2 * width), nn.MaxPool2d(2),                # (N, 2w, 7, 7)
            _conv_block(2 * width, 4 * width), nn.MaxPool2d(2),            # (N, 4w, 3, 3)
            nn.Flatten(),                                                  # (N, 36w)
        )
        # BatchNorm before the ReLU keeps few units dead, so the feature covariance stays well conditioned.
        self.embed = nn.Sequential(nn.Linear(4 * width * 9, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
                                   nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim): what FID is measured on."""
        if x.dim() != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"expected images of shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
                            f"got {tuple(x.shape)}")
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes) logits


def load_classifier(path: str | Path = CLASSIFIER_FILE) -> FashionMNISTClassifier:
    """The shipped classifier in eval mode (weights from ``train_classifier.py``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} not found: they ship with ditquant; regenerate them with "
                                f"`python -m ditquant.models.bundled.train_classifier` (needs the Fashion-MNIST "
                                f"dataset, Debian package 'dataset-fashion-mnist')")
    state = load_file(str(path))
    width = state["body.0.0.weight"].shape[0]
    feature_dim = state["head.1.weight"].shape[1]
    model = FashionMNISTClassifier(width=width, feature_dim=feature_dim)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


class DomainFeatureExtractor(nn.Module):
    """The classifier's features as a torchmetrics FID ``feature=`` module.

    torchmetrics hands a custom extractor the images exactly as given to ``update`` (no uint8 cast, no resize),
    and reads the feature size from ``num_features`` (without it, it probes with a (1, 3, 299, 299) image).
    This accepts float images in [0, 1] (``normalize=True``) or uint8 in [0, 255], 1 or 3 channels, 28x28,
    and maps them to the classifier's (N, 1, 28, 28) in [-1, 1]; other sizes are refused (resized samples would be
    scored against statistics of unresized images).
    """

    def __init__(self, classifier: FashionMNISTClassifier | None = None):
        super().__init__()
        self.classifier = classifier if classifier is not None else load_classifier()
        self.num_features = self.classifier.feature_dim
        self.eval()

    def train(self, mode: bool = True) -> DomainFeatureExtractor:
        # Never leave eval mode: the metric sits inside LightningModules that call .train(), and BatchNorm in
        # train mode would make features depend on the batch.
        return super().train(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.dim() == 3:
            imgs = imgs.unsqueeze(1)  # (N, H, W) → (N, 1, H, W)
        if imgs.dim() != 4 or imgs.shape[1] not in (1, 3):
            raise UserError(f"expected images (N, 1 or 3, H, W), got shape {tuple(imgs.shape)}")
        x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()  # (N, C, H, W) in [0, 1]
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)  # grayscale
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # the reference statistics are of 28x28 images: never resize
            raise ValueError(f"domain features need {IMAGE_SIZE}x{IMAGE_SIZE} images, got {tuple(x.shape[-2:])}")
        p = next(self.classifier.parameters())
        return self.classifier.features((x * 2.0 - 1.0).to(device=p.device, dtype=p.dtype))  # (N, feature_dim)
