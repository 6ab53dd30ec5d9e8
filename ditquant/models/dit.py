"""The in-memory DiT: diffusers' ``DiTTransformer2DModel`` run with the original DiT's numerics.

Every published DiT checkpoint (facebookresearch/DiT, and the converted diffusers hub copy) was trained with the
original code, whose timestep embedding divides the log-frequencies by ``half`` and whose pre-MLP LayerNorm uses
eps=1e-6. A stock diffusers model uses ``half - 1`` and eps=1e-5, which changes outputs beyond float tolerance.
``use_original_numerics`` fixes the model instead of the tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DiTTransformer2DModel

from ditquant.errors import UserError

# Named sizes of the original DiT (models.py, DiT_models): (depth, hidden, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCHES = (2, 4, 8)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a class-conditional DiT, in the original code's vocabulary.

    Args:
        hidden_size: token width D.
        depth: number of DiT blocks.
        num_heads: attention heads (D must be divisible by it).
        patch_size: side of a square patch.
        input_size: side of the (latent or pixel) input image.
        in_channels: input channels (4 for SD-VAE latents, 1 for grey-scale pixels).
        num_classes: class count; the label table holds one more row, the null label for guidance.
        learn_sigma: the model also predicts the variance interpolation (output channels doubled).
        mlp_ratio: MLP hidden width / D (4 in every DiT).
        class_dropout_prob: label dropout used in training; > 0 adds the null-label row.
    """

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        for name in ("hidden_size", "depth", "num_heads", "patch_size", "input_size", "in_channels", "num_classes"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"DiTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.input_size % self.patch_size:
            raise UserError(f"DiTConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}")
        if self.mlp_ratio != 4.0:
            raise UserError("DiTConfig.mlp_ratio: diffusers' DiT supports only the original ratio 4.0")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @classmethod
    def named(cls, name: str, input_size: int = 32, **overrides) -> "DiTConfig":
        """A named size such as ``DiT-XL/2`` at the given (latent) input size."""
        size, _, patch = name.removeprefix("DiT-").partition("/")
        if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCHES:
            known = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES)
            raise UserError(f"unknown model name {name!r}; known names: {known}")
        depth, hidden, heads = DIT_SIZES[size]
        return cls(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch), input_size=input_size,
                   **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def use_original_numerics(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Make a diffusers DiT compute exactly what the original DiT code computes (in place)."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # exp(-ln(1e4) i / half), as in DiT's TimestepEmbedder
        block.norm3.eps = 1e-6  # the pre-MLP LayerNorm (original: eps=1e-6)
    model.register_to_config(norm_eps=1e-6)
    return model


def build_dit(config: DiTConfig) -> DiTTransformer2DModel:
    """An untrained diffusers DiT with the given architecture and the original numerics."""
    model = DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=config.num_classes,
        norm_eps=1e-6,
    )
    if config.class_dropout_prob != 0.1:
        set_class_dropout(model, config.class_dropout_prob)
    return use_original_numerics(model)


def set_class_dropout(model: DiTTransformer2DModel, probability: float) -> None:
    """The label dropout of training (a module attribute that diffusers' config does not hold)."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = probability


def config_of(model: DiTTransformer2DModel) -> DiTConfig:
    """The DiTConfig a diffusers DiT was built with."""
    c = model.config
    label = model.transformer_blocks[0].norm1.emb.class_embedder
    return DiTConfig(
        hidden_size=c.num_attention_heads * c.attention_head_dim,
        depth=c.num_layers,
        num_heads=c.num_attention_heads,
        patch_size=c.patch_size,
        input_size=c.sample_size,
        in_channels=c.in_channels,
        num_classes=c.num_embeds_ada_norm,
        learn_sigma=model.out_channels == 2 * c.in_channels,
        class_dropout_prob=label.dropout_prob,
    )


def null_label(model: DiTTransformer2DModel) -> int:
    """Index of the null (unconditional) label row."""
    return model.config.num_embeds_ada_norm


@torch.no_grad()
def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
