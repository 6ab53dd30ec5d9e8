"""An independent reference of the ORIGINAL DiT forward pass (Peebles & Xie, arXiv 2212.09748), for tests.

Written from the architecture description, not from any implementation: patch embedding + fixed 2D sin-cos
position table, sinusoidal timestep MLP, label table with a null row, adaLN-Zero blocks (fused qkv attention,
GELU-tanh MLP, gated residuals), adaLN final layer and unpatchify. Parameter names follow the original
checkpoints' key layout, so ``state_dict()`` is an original-format checkpoint.

Every weight, adaLN included, is randomly initialised with non-zero values (DiT's own adaLN-Zero init would make
the blocks identities and a conversion test meaningless).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditquant.models.dit import DiTConfig


# The tiny DiT of the style guide: two blocks, width 32, two heads, 8x8 latents with 4 channels, patch 2.
TINY = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table, (grid*grid, dim)."""
    # Positions enumerate tokens row-major (token = r * grid + c). The first dim/2 channels encode the column
    # index c, the last dim/2 the row index r; each half is [sin(pos * w_k), cos(pos * w_k)] with
    # w_k = 10000^(-k / (dim/4)), k < dim/4. Computed in float64, stored in float32.
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    idx = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")  # (g, g) each

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, D/2)
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (T, D)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) -> (N, dim): [cos(t f_i), sin(t f_i)] with f_i = exp(-ln(max_period) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbedder(nn.Module):
    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim))  # (N, D)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: the null label

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = (q @ k.transpose(-2, -1) * hd ** -0.5).softmax(dim=-1)  # (N, H, T, T)
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """One adaLN-Zero block."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


class ReferenceDiT(nn.Module):
    """The original DiT, parameter names as in its checkpoints."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.x_embedder = PatchEmbedder(config.in_channels, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        grid = config.input_size // p
        # A frozen Parameter, as in the original, so it is part of the checkpoint.
        self.pos_embed = nn.Parameter(sincos_table(d, grid)[None], requires_grad=False)  # (1, T, D)
        self.blocks = nn.ModuleList(Block(d, config.num_heads) for _ in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.out_channels)

    def randomize(self, generator: torch.Generator) -> "ReferenceDiT":
        """Non-zero random weights everywhere, scaled so activations stay O(1); pos_embed is the fixed table."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name == "pos_embed":
                    grid = self.config.input_size // self.config.patch_size
                    param.copy_(sincos_table(self.config.hidden_size, grid)[None])
                elif name.endswith("bias"):
                    param.normal_(0.0, 0.1, generator=generator)
                elif "embedding_table" in name:
                    param.normal_(0.0, 1.0, generator=generator)
                else:
                    param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)  # std 1/sqrt(fan_in)
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)


def random_reference(config: DiTConfig, seed: int = 0) -> ReferenceDiT:
    """A seeded ReferenceDiT with random non-zero weights, in eval mode."""
    with torch.device("meta"):  # no default init: DiT-XL would spend seconds initialising weights twice
        model = ReferenceDiT(config)
    model.to_empty(device="cpu")
    return model.randomize(torch.Generator().manual_seed(seed)).eval()


def random_inputs(config: DiTConfig, batch: int = 2, seed: int = 1):
    """Seeded (x, t, y): noise, integer timesteps spread over [0, 1000), labels including the null label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
    return x, t, y
