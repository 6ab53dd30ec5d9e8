"""Shared fixtures: tiny DiTs in the original checkpoint layout and as diffusers folders."""

from __future__ import annotations

import os

# Integer layers quantize their inputs eagerly in the tests: the compiled kernel (the default) gives the same codes
# (test_integer checks it on every scale layout) but costs a compilation per process.
os.environ.setdefault("DITQUANT_FUSED_QUANTIZATION", "0")
from pathlib import Path

import pytest
import torch

from ditquant.models.dit import DiTConfig
from tests.reference_dit import TINY, ReferenceDiT, random_reference


@pytest.fixture
def tiny_config() -> DiTConfig:
    return TINY


@pytest.fixture
def tiny_reference() -> ReferenceDiT:
    """The original DiT forward with seeded random weights (adaLN included), eval mode."""
    return random_reference(TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_original_checkpoint(tmp_path_factory) -> Path:
    """A plain original-layout state dict of ``random_reference(TINY, seed=0)`` saved with torch.save."""
    path = tmp_path_factory.mktemp("tiny_original") / "tiny.pt"
    torch.save(random_reference(TINY, seed=0).state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_dit_folder(tmp_path_factory, tiny_original_checkpoint) -> Path:
    """The same weights as a diffusers model folder (config.json + safetensors)."""
    from ditquant.models.original import load_original_checkpoint

    folder = tmp_path_factory.mktemp("tiny_dit") / "dit"
    load_original_checkpoint(tiny_original_checkpoint, num_heads=TINY.num_heads).save_pretrained(folder)
    return folder
