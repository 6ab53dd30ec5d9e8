"""The mini PixArt: a PixArtAlphaPipeline folder diffusers itself loads and runs, and its samples follow the prompt."""

import numpy as np
import pytest
import torch

import ditquant as dq
from ditquant.evaluation.sampling import seeded_noise, step_generators
from ditquant.models.bundled import PIXART_DIR
from ditquant.models.bundled.captions import PROMPTS
from ditquant.models.bundled.features import load_classifier

pytestmark = pytest.mark.skipif(not (PIXART_DIR / "model_index.json").is_file(),
                                reason="mini PixArt not trained yet")


@torch.no_grad()
def test_diffusers_loads_and_runs_the_mini_pixart():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(PIXART_DIR)
    # The pipeline's __call__ accepts only sizes divisible by 8: 32x32 (the model's own 28x28 is sampled by ditquant)
    image = pipe(PROMPTS[8], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np",
                 height=32, width=32, use_resolution_binning=False, clean_caption=False).images
    assert image.shape == (1, 32, 32, 1) and np.isfinite(image).all()


@torch.no_grad()
def test_samples_follow_the_prompt():
    loaded = dq.load_pixart("bundled")
    assert loaded.prompts.prompts == list(PROMPTS) and loaded.vae_scale_factor == 2
    idx = torch.arange(30)
    labels = idx % 10  # prompt i names class i
    noise = seeded_noise(idx, (4, 14, 14), seed=0, stream=0)
    latents = dq.sample(loaded.transformer, noise, labels, dq.SamplerConfig(kind="dpm_solver", num_steps=20,
                                                                             cfg_scale=3.0),
                        step_generators(idx, 0, noise.device))
    images = loaded.vae.decode(latents / loaded.latent_scale).sample.clamp(-1, 1)
    accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    # 40 % measured for the shipped weights (chance: 10 %); README states its text-following is still weak
    assert accuracy >= 0.25, f"only {accuracy:.0%} of the samples are classified as their prompt's garment"
