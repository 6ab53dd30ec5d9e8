"""DiT's samplers with classifier-free guidance, on diffusers schedulers configured to reproduce DiT exactly.

- ``ddpm``: DiT's default sampler (``sample.py``): ancestral DDPM with the learned variance range, on the respaced
  chain of ``space_timesteps(1000, str(steps))`` — the protocol of PTQ4DiT and DiTAS (250/100/50 steps).
- ``ddim``: DiT's ``ddim_sample_loop`` with η = 0 on ``space_timesteps(1000, 'ddimN')`` — Q-DiT's protocol.
- ``dpm_solver``: DPM-Solver++(2M), diffusers' ``DPMSolverMultistepScheduler`` as the PixArt pipelines configure it
  (linear betas, linspace timesteps, midpoint, lower order at the end) — PixArt-α/Σ's protocol (20 steps, cfg 4.5).

Guidance follows DiT's ``forward_with_cfg``: the batch is run once with its labels and once with the null label;
``eps = uncond + s (cond - uncond)`` on the first ``cfg_channels`` output channels (DiT guides only 3 of the 4
latent channels "for exact reproducibility"; None guides all), the rest (other eps channels, the variance) comes
from the conditional half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ditquant.diffusion.schedule import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, ddim_timesteps, respaced_timesteps
from ditquant import interrupt
from ditquant.errors import UserError
from ditquant.models.adapters import adapter_for

StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    Args:
        kind: ``ddpm`` (DiT's default, learned variance), ``ddim`` (η = 0) or ``dpm_solver`` (DPM-Solver++ 2M,
            PixArt's).
        num_steps: sampling steps on the respaced chain (the papers use 250, 100 or 50).
        cfg_scale: classifier-free guidance scale; 1.0 switches guidance off (no unconditional pass).
        cfg_channels: guide only the first N output channels (3 reproduces DiT's latent models); None = all.
    """

    kind: Literal["ddpm", "ddim", "dpm_solver"] = "ddpm"
    num_steps: int = 50
    cfg_scale: float = 1.5
    cfg_channels: Optional[int] = None

    def __post_init__(self):
        if self.kind not in ("ddpm", "ddim", "dpm_solver"):
            raise UserError(f"sampler.kind must be 'ddpm', 'ddim' or 'dpm_solver', got {self.kind!r}")
        if self.cfg_scale < 1.0:
            raise UserError(f"sampler.cfg_scale must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise UserError(f"sampler.cfg_channels must be a positive channel count or null, got {self.cfg_channels}")
        self.timesteps()  # validates num_steps for this kind

    def timesteps(self) -> list[int]:
        """The original-numbering timesteps visited, in sampling order (noisiest first)."""
        if self.kind == "dpm_solver":
            if self.num_steps < 1 or self.num_steps > NUM_TRAIN_TIMESTEPS:
                raise UserError(f"sampler.num_steps must lie in [1, {NUM_TRAIN_TIMESTEPS}], got {self.num_steps}")
            return self.make_scheduler().timesteps.tolist()
        steps = respaced_timesteps(self.num_steps) if self.kind == "ddpm" else ddim_timesteps(self.num_steps)
        return steps[::-1]

    def make_scheduler(self):
        common = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                      beta_schedule="linear", clip_sample=False, prediction_type="epsilon")
        if self.kind == "ddpm":
            scheduler = DDPMScheduler(variance_type="learned_range", **common)
            scheduler.set_timesteps(timesteps=self.timesteps())
        elif self.kind == "dpm_solver":
            del common["clip_sample"]
            scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common)
            scheduler.set_timesteps(self.num_steps)
        else:
            scheduler = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", **common)
            scheduler.set_timesteps(self.num_steps)  # "leading" spacing == DiT's 'ddimN' (see ddim_timesteps)
        return scheduler


def guided_eps(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
               cfg_channels: Optional[int], adapter=None) -> torch.Tensor:
    """Model output at (x, t, y) with classifier-free guidance; one batched forward over cond + uncond."""
    adapter = adapter or adapter_for(model)
    if cfg_scale == 1.0:
        return adapter.forward(model, x, t, y)
    out = adapter.forward(model, torch.cat([x, x]), torch.cat([t, t]),
                          torch.cat([y, adapter.null_condition(model, y)]))
    cond, uncond = out.chunk(2)
    c = cfg_channels or x.shape[1]
    guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


@torch.no_grad()
def sample(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, config: SamplerConfig,
           generator: Optional[torch.Generator] = None, on_step: Optional[StepCallback] = None) -> torch.Tensor:
    """Denoise ``noise`` (N, C, H, W) into samples for ``labels`` (N,).

    ``on_step(i, t, x_t)`` is called with the model input before each step (used to record calibration data).
    ``generator`` draws the DDPM step noise; it must live on the device of ``noise``.
    """
    scheduler = config.make_scheduler()
    adapter = adapter_for(model)
    x = noise
    for i, t in enumerate(scheduler.timesteps.tolist()):
        interrupt.check()  # between steps: a stop signal ends sampling here
        if on_step is not None:
            on_step(i, t, x)
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = guided_eps(model, x, t_batch, labels, config.cfg_scale, config.cfg_channels, adapter)
        if config.kind != "ddpm":
            out = out[:, : x.shape[1]]  # DDIM and DPM-Solver ignore the learned variance
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
