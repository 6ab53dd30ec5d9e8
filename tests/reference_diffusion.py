"""An independent float64 re-statement of DiT's respaced Gaussian diffusion samplers, to check ours against."""

from __future__ import annotations

import numpy as np
import torch


class RespacedDiffusion:
    """DiT's SpacedDiffusion on the linear schedule, for the given kept timesteps (ascending)."""

    def __init__(self, kept: list[int]):
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
        ac_full = np.cumprod(1.0 - betas)
        new_betas, last = [], 1.0
        for t in kept:
            new_betas.append(1 - ac_full[t] / last)
            last = ac_full[t]
        self.kept = kept
        self.betas = np.array(new_betas)
        self.ac = np.cumprod(1.0 - self.betas)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        post_var = self.betas * (1.0 - self.ac_prev) / (1.0 - self.ac)
        self.post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        self.c1 = self.betas * np.sqrt(self.ac_prev) / (1.0 - self.ac)
        self.c2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.ac)

    def _x0(self, i, x, eps):
        return np.sqrt(1.0 / self.ac[i]) * x - np.sqrt(1.0 / self.ac[i] - 1) * eps

    def ddpm(self, model_fn, x, noise_fn):
        for i in reversed(range(len(self.kept))):
            out = model_fn(x, self.kept[i])
            c = x.shape[1]
            eps, v = out[:, :c], out[:, c:]
            frac = (v + 1) / 2
            log_var = frac * np.log(self.betas[i]) + (1 - frac) * self.post_log_var[i]
            mean = self.c1[i] * self._x0(i, x, eps) + self.c2[i] * x
            noise = noise_fn()
            x = mean + (np.exp(0.5 * log_var) * noise if i > 0 else 0.0)
        return x

    def ddim(self, model_fn, x):
        for i in reversed(range(len(self.kept))):
            out = model_fn(x, self.kept[i])
            eps = out[:, : x.shape[1]]
            x0 = self._x0(i, x, eps)
            eps = (np.sqrt(1.0 / self.ac[i]) * x - x0) / np.sqrt(1.0 / self.ac[i] - 1)
            x = x0 * np.sqrt(self.ac_prev[i]) + np.sqrt(1 - self.ac_prev[i]) * eps
        return x


def torch_model_fn(model, labels, null, cfg_scale, cfg_channels=None):
    """Wrap a DiT as a float64 numpy function with DiT's forward_with_cfg guidance."""

    def fn(x, t):
        xt = torch.from_numpy(x).float()
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        with torch.no_grad():
            cond = model(xt, tt, labels).sample.double().numpy()
            if cfg_scale == 1.0:
                return cond
            uncond = model(xt, tt, torch.full_like(labels, null)).sample.double().numpy()
        c = cfg_channels or x.shape[1]
        out = cond.copy()
        out[:, :c] = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return out

    return fn
