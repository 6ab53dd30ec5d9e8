"""Random tiny DiTs for method tests: every parameter drawn from N(0, std), since DiT's adaLN-Zero initialisation
would make every block the identity and hide what quantization or folding does to it."""

from __future__ import annotations

import torch

from ditquant.models.dit import DiTConfig, build_dit


def tiny_config(depth: int = 2) -> DiTConfig:
    return DiTConfig(hidden_size=32, depth=depth, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def random_dit(depth: int = 2, std: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seeded random DiT in eval mode (hidden 32, 2 heads, 8×8 input with patch 2, 10 classes)."""
    torch.manual_seed(seed)
    model = build_dit(tiny_config(depth)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()
