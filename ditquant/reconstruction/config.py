"""ReconstructionConfig: how quantization parameters are reconstructed unit by unit (data, YAML-friendly)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ditquant.errors import UserError


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction (BRECQ as adapted by Q-Diffusion and PTQ4DiT).

    Units are the DiT's leading layer (patch embedding), each transformer block, and the trailing layers; each is
    optimised in order so that its quantized output matches the FP model's, its input coming from the already
    quantized prefix.

    Args:
        mode: ``joint`` learns AdaRound variables and activation step sizes together, one pass (PTQ4DiT);
            ``sequential`` learns the weights' rounding over all units with FP activations, then the activation step
            sizes over all units with the hardened weights (Q-Diffusion).
        iterations: optimisation steps per unit (joint) or per unit in the weight pass (sequential); 20000 in the
            papers.
        activation_iterations: steps per unit of the sequential activation pass (Q-Diffusion: 5000); None = iterations.
        batch_size: calibration rows per step (32 in the papers).
        weight_lr: Adam learning rate of the AdaRound variables (1e-3).
        activation_lr: Adam learning rate of the activation step sizes, cosine-annealed to 0 over the unit's steps
            (4e-5, PTQ4DiT's effective value; Q-Diffusion uses 4e-4 in its activation pass).
        learn_activations: learn activation step sizes at all (false: weights only, activations as initialised).
        rounding_weight: λ of the AdaRound regulariser (0.01).
        warmup: fraction of steps without the regulariser (0.2).
        beta_start, beta_end: the regulariser's β annealed linearly after warm-up (20 → 2).
        cache_memory_gb: unit inputs and targets are kept in memory up to this size and memory-mapped from disk
            beyond it.
        cache_dir: where spilled caches go (default: ``<trainer.default_root_dir>/cache``); rebuilt on resume.
        seed: seeds the batch drawn at every step (a resumed run draws exactly the same batches).
    """

    mode: Literal["joint", "sequential"] = "joint"
    iterations: int = 20000
    activation_iterations: Optional[int] = None
    batch_size: int = 32
    weight_lr: float = 1e-3
    activation_lr: float = 4e-5
    learn_activations: bool = True
    rounding_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    cache_memory_gb: float = 4.0
    cache_dir: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("joint", "sequential"):
            raise UserError(f"reconstruction.mode must be 'joint' or 'sequential', got {self.mode!r}")
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"reconstruction.{name} must be >= 1, got {getattr(self, name)}")
        if self.activation_iterations is not None and self.activation_iterations < 0:
            raise UserError(f"reconstruction.activation_iterations must be >= 0, got {self.activation_iterations}")
        if self.weight_lr <= 0 or self.activation_lr <= 0:
            raise UserError("reconstruction.weight_lr and activation_lr must be positive")
        if not 0 <= self.warmup < 1:
            raise UserError(f"reconstruction.warmup must be in [0, 1), got {self.warmup}")
        if self.cache_memory_gb < 0:
            raise UserError(f"reconstruction.cache_memory_gb must be >= 0, got {self.cache_memory_gb}")
