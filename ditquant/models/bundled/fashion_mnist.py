"""Reader for the Fashion-MNIST idx files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ditquant.errors import UserError

DEFAULT_ROOT = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the Debian package 'dataset-fashion-mnist' "
                                f"or set FASHION_MNIST_DIR to a folder holding the Fashion-MNIST .gz files")
    with gzip.open(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path} is not an idx file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: Path = DEFAULT_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float (N, 1, 28, 28) in [-1, 1] and labels as int64 (N,)."""
    if split not in _FILES:
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    images_file, labels_file = _FILES[split]
    images = _read_idx(Path(root) / images_file, 0x00000803)
    labels = _read_idx(Path(root) / labels_file, 0x00000801)
    x = torch.from_numpy(images.copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
