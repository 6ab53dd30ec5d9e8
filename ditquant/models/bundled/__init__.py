"""The small DiT trained here on Fashion-MNIST, its FID feature extractor and the reference statistics."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent
DIT_DIR = BUNDLED_DIR / "dit_fmnist"  # a diffusers model folder: config.json + diffusion_pytorch_model.safetensors
PIXART_DIR = BUNDLED_DIR / "pixart_fmnist"  # the mini PixArt: a PixArtAlphaPipeline folder (train_pixart.py)
CLASSIFIER_FILE = BUNDLED_DIR / "classifier_fmnist.safetensors"
REFERENCE_STATS_FILE = BUNDLED_DIR / "fmnist_test_features.safetensors"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
