"""DiT's diffusion process: linear β schedule over 1000 steps and its timestep respacing (DiT diffusion/respace.py)."""

from __future__ import annotations

import numpy as np

from ditquant.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's ``get_named_beta_schedule('linear')``: linear in β, scaled for 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_timesteps, dtype=np.float64)


def respaced_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The original timesteps DiT keeps for ``num_steps`` sampling steps, ascending.

    DiT's ``space_timesteps(1000, str(n))`` walks a fractional stride (T-1)/(n-1) and rounds each position, so the
    first and last timesteps (0 and T-1) are always kept. That differs from diffusers' "leading"/"trailing" spacing,
    so the DDPM sampler passes these timesteps explicitly.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise UserError(f"sampling steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (num_steps - 1)
    taken, position = [], 0.0
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return taken


def ddim_timesteps(num_steps: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DiT's ``space_timesteps(1000, 'ddimN')``: an integer stride starting at 0, ascending.

    Only step counts whose stride is ``T // N`` are accepted (50, 100, 250, ... ), the layout diffusers' DDIM
    scheduler steps along; DiT's other 'ddimN' layouts (e.g. N=30, stride 34) would silently differ.
    """
    stride = num_timesteps // num_steps if 1 <= num_steps <= num_timesteps else 0
    if stride == 0 or len(range(0, num_timesteps, stride)) != num_steps:
        raise UserError(f"DDIM with {num_steps} steps: {num_timesteps} timesteps cannot be laid out with a constant "
                        f"stride of {num_timesteps}//{num_steps}; use e.g. 10, 20, 25, 50, 100 or 250 steps")
    return list(range(0, num_timesteps, stride))
