"""Random tiny PixArt pipelines (T5 encoder + tokenizer, VAE, PixArt transformer, DPM-Solver) written in the layouts
ditquant loads: a ``PixArtAlphaPipeline`` folder and a bare transformer folder. Every transformer parameter is drawn
from N(0, std): PixArt's zero-initialised tables would hide what folding or quantization does."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "the", "red", "blue", "shirt", "dress", "bag", "boot", "sneaker", "coat", "on", "white",
         "black", "small", "large", "striped", "t", "-", ".")
TEXT_WIDTH = 12


def tiny_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -1.0 - i) for i, w in enumerate(WORDS)] + [(c, -50.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, unk_id=2)


def tiny_text_encoder(vocab_size: int, width: int = TEXT_WIDTH, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=4, d_ff=24, num_layers=1, num_heads=3,
                      relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def tiny_transformer(seed: int = 0, std: float = 0.3, caption_channels: int = TEXT_WIDTH, depth: int = 2,
                     use_additional_conditions: bool | None = None, head_dim: int = 8):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=depth,
        sample_size=8, patch_size=2, caption_channels=caption_channels, cross_attention_dim=2 * head_dim,
        use_additional_conditions=use_additional_conditions)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def save_pipeline(folder: Path, seed: int = 0, text_width: int = TEXT_WIDTH) -> Path:
    """A PixArtAlphaPipeline folder (safetensors) of seeded random tiny components."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    tokenizer = tiny_tokenizer()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer), text_width, seed),
                               vae=tiny_vae(seed), transformer=tiny_transformer(seed),
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
