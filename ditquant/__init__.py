"""ditquant: post-training quantization of Diffusion Transformers (PTQ4DiT, Q-DiT, DiTAS)."""

__version__ = "0.1.0"
