"""PixArt-α / PixArt-Σ: loading a text-to-image pipeline and turning prompts into the denoiser's condition.

Sources: ``bundled`` (the mini PixArt trained here on Fashion-MNIST), a ``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline`` folder (transformer/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json), a bare ``PixArtTransformer2DModel`` folder (the text encoder and VAE
then come from the ``text_encoder`` / ``vae`` options), or a hub id (read from the local Hugging Face cache, the
network only when it is not there). Weights are read from safetensors or with ``torch.load(weights_only=True)``.

Prompts: a table of text embeddings computed once per prompt (``encode_prompts``), exactly as the pipeline's
``encode_prompt`` with ``clean_caption=False`` computes them; its last row is the empty prompt, the unconditional
side of guidance. The denoiser's condition ``y`` is then a row index into the table, as a class label is for DiT,
so calibration sets, samplers and guidance pairs work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel

from ditquant.errors import UserError
from ditquant.models.bundled.captions import PROMPTS as CLASS_PROMPTS
from ditquant.models.dit import DiTConfig
from ditquant.models.loading import (check_finite_weights, hub_offline, load_model_folder, looks_like_hub_id,
                                     require_network)
from ditquant.models.pixart_layout import install_modulation_multipliers

log = logging.getLogger(__name__)

PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASSES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # the hub PixArt-α predates the class
_HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt")  # weights only as safetensors

# A small built-in calibration prompt set for photographic text-to-image models (written for ditquant).
BUILTIN_PROMPTS = (
    "a red bicycle leaning against a brick wall in the afternoon sun",
    "a bowl of ramen with a soft-boiled egg, top view",
    "a snowy mountain lake at dawn, mist over the water",
    "portrait of an old fisherman with a knitted hat, film photograph",
    "a tabby cat asleep on a stack of books",
    "a lighthouse on a rocky coast during a storm",
    "a glass of iced coffee on a wooden cafe table",
    "a futuristic city skyline at night with neon reflections in the rain",
    "a golden retriever running through autumn leaves",
    "a watercolor painting of a village by a river",
    "close-up of a hummingbird feeding from a purple flower",
    "an astronaut sitting on a bench in a park, reading a newspaper",
    "a plate of fresh strawberries and blueberries on white linen",
    "a vintage car parked on a desert highway, wide angle",
    "a cozy living room with a fireplace and a green armchair",
    "a sailboat on calm turquoise water under a clear sky",
)


@dataclass(frozen=True)
class PixArtSource:
    """Where the PixArt pipeline comes from.

    Args:
        source: "bundled" (the mini PixArt trained here), a PixArtAlphaPipeline / PixArtSigmaPipeline folder, a
            PixArtTransformer2DModel folder, or a hub id such as "PixArt-alpha/PixArt-XL-2-512x512".
        prompts: a text file, one prompt per line: the conditions calibration and ``ditquant test`` draw from (in
            turn, as classes for DiT). Default: the bundled model's ten class prompts, or a built-in set of 16
            photographic prompts for other models.
        text_encoder: a T5 encoder folder (or a pipeline folder holding text_encoder/ and tokenizer/); defaults to
            the pipeline's own. A bare transformer folder needs it to encode prompts.
        vae: an AutoencoderKL folder (or a pipeline folder holding vae/); defaults to the pipeline's; "none": latents
            are not decoded.
        max_sequence_length: text tokens per prompt (120 for PixArt-α, 300 for PixArt-Σ, as their pipelines).
    """

    source: str = "bundled"
    prompts: Optional[str] = None
    text_encoder: Optional[str] = None
    vae: Optional[str] = None
    max_sequence_length: int = 120

    def __post_init__(self):
        for key in ("source", "prompts", "text_encoder", "vae"):
            value = getattr(self, key)
            if isinstance(value, Path):
                object.__setattr__(self, key, str(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise UserError(f"PixArtSource.{key} must be a folder or a hub id, got {value!r}")
        if self.source is None:
            raise UserError("PixArtSource.source is required (bundled, a pipeline folder, a transformer folder or a "
                            "hub id)")
        if isinstance(self.max_sequence_length, bool) or not isinstance(self.max_sequence_length, int) \
                or self.max_sequence_length <= 0:
            raise UserError(f"PixArtSource.max_sequence_length must be a positive integer, got "
                            f"{self.max_sequence_length!r}")


@dataclass
class LoadedPixArt:
    """A loaded PixArt pipeline's parts (eval, no grad); text encoder / tokenizer / VAE / scheduler may be absent."""

    transformer: PixArtTransformer2DModel
    vae: Optional[AutoencoderKL]
    text_encoder: Optional[torch.nn.Module]
    tokenizer: Optional[object]
    scheduler: Optional[object]
    latent_scale: float
    vae_scale_factor: int  # pixels per latent along a side (8 for the SD VAE)
    description: str
    source: PixArtSource = field(default=None)
    prompts: Optional["PromptTable"] = None  # the source's prompts, encoded (None without a text encoder)
    pipeline: Optional[Path] = None  # the pipeline folder the parts came from (None: a bare transformer folder)

    @property
    def config(self) -> DiTConfig:
        """The shape ditquant samples with: latent channels and side, and the prompts in the classes' place."""
        c = self.transformer.config
        return DiTConfig(hidden_size=c.num_attention_heads * c.attention_head_dim, depth=c.num_layers,
                         num_heads=c.num_attention_heads, patch_size=c.patch_size, input_size=c.sample_size,
                         in_channels=c.in_channels, num_classes=self.prompts.null_index if self.prompts else 1,
                         learn_sigma=c.out_channels == 2 * c.in_channels)


def load_pixart(source: PixArtSource) -> LoadedPixArt:
    """Load the pipeline parts ``source`` names (see ``PixArtSource``); checks that they fit together."""
    if source.source == "bundled":
        from ditquant.models.bundled import PIXART_DIR

        if not PIXART_DIR.is_dir():
            raise FileNotFoundError(f"the bundled mini PixArt {PIXART_DIR} does not exist yet; train it with "
                                    "`python -m ditquant.models.bundled.train_pixart` or pass another source")
    root = PIXART_DIR if source.source == "bundled" else _local_folder(source.source, "model.pixart.source")
    if (root / "config.json").is_file():  # a bare transformer folder
        transformer_dir, pipeline = root, None
    else:
        pipeline = _check_pipeline(root)
        transformer_dir = root / "transformer"
    transformer = load_model_folder(PixArtTransformer2DModel, transformer_dir, class_names=TRANSFORMER_CLASSES,
                                     norm_type="ada_norm_single")
    install_modulation_multipliers(transformer)
    transformer.eval().requires_grad_(False)
    check_finite_weights(transformer, f"model.pixart.source {source.source}")

    text_root = _local_folder(source.text_encoder, "model.pixart.text_encoder") if source.text_encoder else pipeline
    text_encoder = tokenizer = None
    if text_root is not None:
        text_encoder, tokenizer = _load_text_encoder(text_root)
        width, expected = text_encoder.config.d_model, transformer.config.caption_channels
        if width != expected:
            raise UserError(f"the text encoder from {text_root} gives {width}-wide features, but the transformer's "
                            f"caption projection takes caption_channels={expected}")
    vae = _load_vae(source, pipeline, transformer.config.in_channels)
    scheduler = _load_scheduler(pipeline / "scheduler") if pipeline is not None else None

    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8  # as the pipeline
    c = transformer.config
    description = (f"PixArt transformer (width {c.num_attention_heads * c.attention_head_dim}, depth {c.num_layers}, "
                   f"{c.num_attention_heads} heads, patch {c.patch_size}, latent {c.in_channels}x{c.sample_size}"
                   f"x{c.sample_size}, caption {c.caption_channels}) from {transformer_dir}")
    description += f"; text encoder from {text_root}" if text_root is not None else "; no text encoder"
    description += "; VAE" if vae is not None else "; no VAE (latents are not decoded)"
    prompts = None
    if text_encoder is not None:
        prompts = _source_prompts(source, text_encoder, tokenizer, vae_scale)
        digest = hashlib.sha256(prompts.embeddings.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        description += (f"; {prompts.null_index} prompts, {source.max_sequence_length} tokens (embeddings sha256 "
                        f"{digest})")  # the text encoder's weights and the prompts, as the calibration set sees them
    return LoadedPixArt(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler=scheduler, latent_scale=float(vae.config.scaling_factor) if vae else 1.0,
                        vae_scale_factor=vae_scale, description=description, source=source, prompts=prompts,
                        pipeline=pipeline)


def _load_vae(source: PixArtSource, pipeline: Optional[Path], latent_channels: int) -> Optional[AutoencoderKL]:
    """The ``vae`` option's VAE, else the pipeline's; None for "none" or a bare transformer folder."""
    if source.vae is not None and source.vae.lower() == "none":
        return None
    if source.vae is not None:
        root = _local_folder(source.vae, "model.pixart.vae")
        vae = load_model_folder(AutoencoderKL, root / "vae" if (root / "vae").is_dir() else root)
    elif pipeline is not None:
        vae = load_model_folder(AutoencoderKL, pipeline / "vae")
    else:
        return None
    if vae.config.latent_channels != latent_channels:
        raise UserError(f"the VAE has {vae.config.latent_channels} latent channels, but the transformer takes "
                        f"in_channels={latent_channels}")
    return vae.eval().requires_grad_(False)


def _source_prompts(source: PixArtSource, text_encoder, tokenizer, vae_scale: int) -> "PromptTable":
    """The prompts file's prompts (default: the mini model's class prompts, or the built-in set), encoded."""
    texts = (read_prompts(source.prompts, "model.pixart.prompts") if source.prompts is not None
             else list(CLASS_PROMPTS if source.source == "bundled" else BUILTIN_PROMPTS))
    return encode_prompts(text_encoder, tokenizer, texts, source.max_sequence_length, vae_scale,
                          where="model.pixart.prompts")


def _local_folder(spec: str, option: str) -> Path:
    """A local folder for ``spec``: the path itself, or a hub repo's snapshot (cache first, then the network)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{option}={spec!r} is a file; pass a folder")
    if not looks_like_hub_id(spec):
        raise FileNotFoundError(f"{option}={spec!r} does not exist (nor is it a hub id like "
                                f"'PixArt-alpha/PixArt-XL-2-512x512')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, allow_patterns=list(_HUB_FILES), local_files_only=True))
    except LocalEntryNotFoundError:
        if hub_offline():
            raise ConnectionError(f"{option}={spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                  "set; pass a local folder") from None
    require_network(spec)
    return Path(snapshot_download(spec, allow_patterns=list(_HUB_FILES)))


def _check_pipeline(root: Path) -> Path:
    index = root / "model_index.json"
    if not index.is_file():
        parts = ", ".join(p + "/" for p in PIPELINE_COMPONENTS)
        raise UserError(f"{root} is neither a PixArt pipeline folder (model_index.json, {parts}) nor a transformer "
                        "folder (config.json + weights)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{index}: cannot read ({exc})") from exc
    if name not in PIPELINE_CLASSES:
        raise UserError(f"{root} holds a {name}, not a PixArt pipeline ({' or '.join(PIPELINE_CLASSES)})")
    missing = [c for c in PIPELINE_COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise UserError(f"{root}: the {name} folder is missing {', '.join(c + '/' for c in missing)}")
    return root


def _load_text_encoder(root: Path):
    """(T5 encoder, tokenizer) from a pipeline folder (text_encoder/ + tokenizer/) or a folder holding both."""
    from transformers import AutoTokenizer, T5EncoderModel

    encoder_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as exc:  # missing / damaged tokenizer files: name the folder
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer ({exc})") from exc
    try:
        encoder = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True)
    except Exception as exc:
        raise UserError(f"{encoder_dir}: cannot load the T5 text encoder ({exc})") from exc
    check_finite_weights(encoder, f"text encoder {encoder_dir}")
    return encoder.eval().requires_grad_(False), tokenizer


def _load_scheduler(folder: Path):
    import diffusers

    config_file = folder / "scheduler_config.json"
    try:
        name = json.loads(config_file.read_text())["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{config_file}: cannot read the scheduler's class ({exc})") from exc
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"{config_file}: unknown scheduler class {name!r}")
    return cls.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------

@dataclass
class PromptTable:
    """Text embeddings, one row per prompt and the empty prompt last (the unconditional row)."""

    prompts: list[str]
    embeddings: torch.Tensor  # (prompts + 1, tokens, text width)
    mask: torch.Tensor        # (prompts + 1, tokens), 1 = a real token
    vae_scale_factor: int = 8  # pixels per latent (PixArt-α 1024's resolution condition)

    @property
    def null_index(self) -> int:
        return len(self.prompts)


def read_prompts(path: str | Path, option: str = "data.prompts") -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{option}: prompts file {path} does not exist")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{option}: cannot read prompts file {path} ({exc})") from exc
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"{option}: prompts file {path} holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], max_length: int = 120, vae_scale_factor: int = 8,
                   where: str = "prompts") -> PromptTable:
    """Embed ``prompts`` and the empty prompt as ``PixArtAlphaPipeline.encode_prompt`` does (clean_caption=False).
    A prompt longer than ``max_length`` tokens is truncated, as the pipeline does, and said so in one line."""
    if text_encoder is None or tokenizer is None:
        raise UserError(f"{where}: encoding prompts needs a text encoder and tokenizer (a pipeline folder, or "
                        "model.pixart.text_encoder for a bare transformer folder)")
    if not prompts:
        raise UserError(f"{where}: no prompts")
    texts = [p.lower().strip() for p in (*prompts, "")]  # the pipeline's preprocessing without clean_caption
    for i, prompt in enumerate(texts[:-1]):
        n = len(tokenizer(prompt, add_special_tokens=True).input_ids)
        if n > max_length:
            log.warning("%s: prompt %d (%r...) has %d tokens; truncated to the text encoder's %d", where, i + 1,
                        prompt[:40], n, max_length)
    device = next(text_encoder.parameters()).device
    embeddings, masks = [], []
    for text in texts:  # one at a time: a prompt's embedding never depends on the other prompts in the set
        tokens = tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                           add_special_tokens=True, return_tensors="pt")
        embeddings.append(text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0])
        masks.append(tokens.attention_mask)
    return PromptTable(prompts=list(prompts), embeddings=torch.cat(embeddings).cpu(), mask=torch.cat(masks),
                       vae_scale_factor=vae_scale_factor)
