"""DiT's training objective for learned-σ models: ε-MSE plus the variational bound on the variance (improved DDPM).

Used to train the bundled model; mirrors DiT ``GaussianDiffusion.training_losses`` with ``LossType.MSE`` and
``ModelVarType.LEARNED_RANGE``: the VB term sees a detached mean, so it trains only the variance interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ditquant.diffusion.schedule import linear_betas


class DiffusionLoss:
    """Hybrid loss L_simple + L_vb on DiT's 1000-step linear schedule."""

    def __init__(self, num_timesteps: int = 1000):
        betas = linear_betas(num_timesteps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        self.num_timesteps = num_timesteps
        self.sqrt_ac = as_t(np.sqrt(alphas_cumprod))
        self.sqrt_1m_ac = as_t(np.sqrt(1.0 - alphas_cumprod))
        self.sqrt_recip_ac = as_t(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1_ac = as_t(np.sqrt(1.0 / alphas_cumprod - 1))
        self.post_log_var = as_t(np.log(np.append(post_var[1], post_var[1:])))
        self.post_c1 = as_t(betas * np.sqrt(prev) / (1.0 - alphas_cumprod))
        self.post_c2 = as_t((1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
        self.log_betas = as_t(np.log(betas))

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t].view(-1, 1, 1, 1)

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        x_t = self._at(self.sqrt_ac, t) * x0 + self._at(self.sqrt_1m_ac, t) * noise
        eps, v = model(x_t, t, y).sample.chunk(2, dim=1)
        mse = (eps - noise).square().mean(dim=(1, 2, 3))

        # Variational bound on the learned variance, with the mean frozen.
        frac = (v + 1) / 2
        log_var = frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.post_log_var, t)
        pred_x0 = self._at(self.sqrt_recip_ac, t) * x_t - self._at(self.sqrt_recipm1_ac, t) * eps.detach()
        mean = self._at(self.post_c1, t) * pred_x0 + self._at(self.post_c2, t) * x_t
        true_mean = self._at(self.post_c1, t) * x0 + self._at(self.post_c2, t) * x_t
        true_log_var = self._at(self.post_log_var, t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + (true_log_var - log_var).exp()
                    + (true_mean - mean).square() * (-log_var).exp())
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised into 255 bins (improved DDPM)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, cdf_delta.clamp(min=1e-12).log()))
