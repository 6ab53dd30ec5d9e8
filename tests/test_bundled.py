"""The bundled Fashion-MNIST DiT: it loads as shipped and its samples are recognisable per class."""

import pytest
import torch

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.models.bundled.features import load_classifier
from ditquant.evaluation.sampling import seeded_noise, step_generators
from ditquant.models.bundled import DIT_DIR
from ditquant.models.loading import DiTSource, load_dit

pytestmark = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")


def test_bundled_model_architecture():
    loaded = load_dit(DiTSource("bundled"))
    c = loaded.config
    assert (c.in_channels, c.input_size, c.patch_size, c.num_classes, c.learn_sigma) == (1, 28, 4, 10, True)
    assert loaded.vae is None and loaded.latent_scale == 1.0
    assert loaded.transformer.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0  # original numerics
    table = loaded.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes + the null label used by guidance


def test_samples_are_recognisable_per_class():
    loaded = load_dit(DiTSource("bundled"))
    idx = torch.arange(40)
    labels = idx % 10
    noise = seeded_noise(idx, (1, 28, 28), seed=0, stream=0)
    images = sample(loaded.transformer, noise, labels, SamplerConfig(num_steps=20, cfg_scale=1.5),
                    step_generators(idx, 0, noise.device))
    predicted = load_classifier()(images.clamp(-1, 1)).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy >= 0.7, f"only {accuracy:.0%} of guided samples are classified as their label"
