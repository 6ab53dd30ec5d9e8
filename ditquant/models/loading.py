"""One entry point for every pretrained DiT: ``load_dit(DiTSource(...))``.

Sources: the bundled Fashion-MNIST DiT, an original facebookresearch/DiT checkpoint (.pt/.pth/.safetensors), a
diffusers model folder, a DiTPipeline folder (``transformer/`` + ``vae/``), or a Hugging Face hub id. Whatever
the source, the result is a diffusers ``DiTTransformer2DModel`` with the original DiT numerics (every published
DiT was trained with the original code), in eval mode with gradients off, plus its VAE for latent models.

Weights are read only from safetensors or with ``torch.load(weights_only=True)``: loading never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from ditquant.errors import UserError
from ditquant.io import InputPath
from ditquant.models import bundled
from ditquant.models.dit import DIT_SIZES, DiTConfig, config_of, use_original_numerics
from ditquant.models.original import CHECKPOINT_SUFFIXES, load_original_checkpoint

# owner/name, as on the hub; anything with a checkpoint suffix, a leading "." / "/" / "~" or two slashes is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_BIN = "diffusion_pytorch_model.bin"
_TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub DiT predates the DiT class
_OVERRIDES = ("hidden_size", "depth", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
              "learn_sigma")
_NETWORK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class DiTSource:
    """Where the DiT (and its VAE) come from.

    Args:
        source: "bundled"; a path to an original checkpoint (.pt/.pth/.safetensors); a diffusers model folder;
            a DiTPipeline folder; or a hub id such as "facebook/DiT-XL-2-256".
        name: named size for original checkpoints, e.g. "DiT-XL/2" (fixes the head count); checked against
            the weights for every source.
        hidden_size, depth, num_heads, patch_size, input_size, in_channels, num_classes, learn_sigma:
            architecture overrides; each one given is checked against the weights (a mismatch is an error).
        vae: AutoencoderKL folder (or a pipeline folder holding vae/) or hub id; defaults to a pipeline's vae/;
            "none" forces pixel space.
        use_ema: take the EMA weights of a training checkpoint holding both ``model`` and ``ema``.
        original_numerics: run the weights with the original DiT's numerics (see ``ditquant.models.dit``);
            False gives stock diffusers behaviour, which differs slightly, for comparisons only.
    """

    source: InputPath = "bundled"
    name: Optional[str] = None
    hidden_size: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    input_size: Optional[int] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None
    learn_sigma: Optional[bool] = None
    vae: Optional[InputPath] = None
    use_ema: bool = True
    original_numerics: bool = True

    def __post_init__(self):
        if isinstance(self.source, (Path, InputPath)):  # plain str: the YAML writers know no subclass
            object.__setattr__(self, "source", str(self.source))
        if isinstance(self.vae, (Path, InputPath)):
            object.__setattr__(self, "vae", str(self.vae))
        if not isinstance(self.source, str) or not self.source:
            raise UserError(f"DiTSource.source must be 'bundled', a path or a hub id, got {self.source!r}")
        if self.vae is not None and (not isinstance(self.vae, str) or not self.vae):
            raise UserError(f"DiTSource.vae must be a folder, a hub id or 'none', got {self.vae!r}")
        if self.name is not None:
            DiTConfig.named(self.name)  # raises for an unknown name, listing the known ones
        for key in _OVERRIDES:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "learn_sigma":
                if not isinstance(value, bool):
                    raise UserError(f"DiTSource.learn_sigma must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"DiTSource.{key} must be a positive integer, got {value!r}")

    def overrides(self) -> dict:
        """The architecture fields that were given."""
        return {key: getattr(self, key) for key in _OVERRIDES if getattr(self, key) is not None}


@dataclass
class LoadedDiT:
    """A loaded DiT: the transformer (eval, no grad), its VAE if latent, and what was loaded from where."""

    transformer: DiTTransformer2DModel
    vae: Optional[AutoencoderKL]
    config: DiTConfig
    latent_scale: float  # multiply VAE latents by this before the DiT (0.18215 for SD-VAE); 1.0 in pixel space
    description: str
    source: Optional["DiTSource"] = None  # what it was loaded from


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse weights holding NaN / inf (they would calibrate and sample garbage), naming the first such tensor."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{where}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}; the weights are "
                            "damaged")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of all parameters (exact bytes), cheap next to sampling."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_dit(source: DiTSource) -> LoadedDiT:
    """Load the DiT (and VAE) described by ``source``; see ``DiTSource`` for what a source may be."""
    kind, path = classify_source(source.source)
    default_vae: Optional[Path] = None  # a pipeline folder's vae/
    hub_vae: Optional[str] = None  # a hub pipeline repo whose vae/ sits beside its transformer/
    if kind == "original":
        transformer = load_original_checkpoint(path, source.name, use_ema=source.use_ema,
                                               original_numerics=source.original_numerics, **source.overrides())
        where = f"original checkpoint {path}" + (" (ema)" if source.use_ema else " (model)")
    else:
        if kind == "bundled":
            path = Path(bundled.DIT_DIR)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"the bundled DiT {path} does not exist yet; train it with "
                    f"`python -m ditquant.models.bundled.train_dit` or pass another source")
            transformer, where = load_model_folder(DiTTransformer2DModel, path), f"bundled model {path}"
        elif kind == "model":
            transformer, where = load_model_folder(DiTTransformer2DModel, path), f"diffusers folder {path}"
        elif kind == "pipeline":
            transformer = load_model_folder(DiTTransformer2DModel, path / "transformer")
            where = f"DiTPipeline folder {path}"
            if (path / "vae").is_dir():
                default_vae = path / "vae"
        else:  # hub
            transformer, subfolder = _load_hub(DiTTransformer2DModel, source.source, ("transformer", None))
            where = f"hub model {source.source}"
            if subfolder == "transformer":
                hub_vae = source.source
        if source.original_numerics:
            use_original_numerics(transformer)
        _check_against(config_of(transformer), source, where)
    transformer.eval().requires_grad_(False)
    config = config_of(transformer)

    vae, vae_where = None, None
    if source.vae is not None:
        if source.vae.lower() != "none":
            vae, vae_where = _load_vae(source.vae)
    elif default_vae is not None:
        vae, vae_where = load_model_folder(AutoencoderKL, default_vae), str(default_vae)
    elif hub_vae is not None:
        try:
            vae, vae_where = _load_hub(AutoencoderKL, hub_vae, ("vae",))[0], f"hub model {hub_vae} (vae/)"
        except (ValueError, ConnectionError) as exc:
            raise type(exc)(f"{exc}; pass vae='none' to load the DiT without its VAE") from exc
    if vae is not None:
        if vae.config.latent_channels != config.in_channels:
            raise UserError(f"the VAE from {vae_where} has {vae.config.latent_channels} latent channels, but the "
                            f"DiT takes in_channels={config.in_channels}; pass vae='none' for a pixel-space model")
        vae.eval().requires_grad_(False)
    latent_scale = float(vae.config.scaling_factor) if vae is not None else 1.0

    numerics = "original numerics" if source.original_numerics else "stock diffusers numerics"
    description = f"{_describe(config)} from {where}, {numerics}"
    if vae is not None:
        description += f"; VAE from {vae_where} (latent scale {latent_scale:g})"
    elif config.in_channels == 4:
        description += "; no VAE (latents are not decoded)"
    check_finite_weights(transformer, f"model.dit.source {source.source}")
    if vae is not None:
        check_finite_weights(vae, f"model.dit.vae {source.vae or source.source}")
    return LoadedDiT(transformer=transformer, vae=vae, config=config, latent_scale=latent_scale,
                     description=description, source=source)


# --------------------------------------------------------------------------------------------------------------
# What a source string is
# --------------------------------------------------------------------------------------------------------------

def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.endswith((*CHECKPOINT_SUFFIXES, ".bin", ".json"))


def _has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (*_SAFETENSORS, _BIN))


def classify_source(source: str) -> tuple[str, Optional[Path]]:
    """("bundled" | "original" | "model" | "pipeline" | "hub", path or None)."""
    if source == "bundled":
        return "bundled", None
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES:
            return "original", path
        raise UserError(f"{path}: not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a folder; for a diffusers "
                        f"model pass the folder holding config.json")
    if path.is_dir():
        if (path / "config.json").is_file():
            if not _has_weights(path):
                raise UserError(f"{path} has config.json but no weights ({_SAFETENSORS[0]} or {_BIN})")
            return "model", path
        if (path / "transformer").is_dir() or (path / "model_index.json").is_file():
            return "pipeline", path
        raise UserError(f"{path} is neither a diffusers model folder (config.json + {_SAFETENSORS[0]}) nor a "
                        f"DiTPipeline folder (transformer/, vae/, model_index.json)")
    if looks_like_hub_id(source):
        return "hub", None
    raise FileNotFoundError(f"{source} does not exist (nor is it a hub id like 'facebook/DiT-XL-2-256')")


# --------------------------------------------------------------------------------------------------------------
# Folders and the hub
# --------------------------------------------------------------------------------------------------------------

def load_model_folder(cls, folder: Path, class_names: tuple[str, ...] | None = None,
                       norm_type: str | None = None):
    """A diffusers model of class ``cls`` from a local folder (safetensors, or .bin read with weights_only).
    ``class_names``: the ``_class_name`` values accepted (default: the class's own; for DiT also the older
    Transformer2DModel); ``norm_type``: the transformer block type the config must declare."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} is not a diffusers model folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_file}: cannot read config ({exc})") from exc
    if cls is DiTTransformer2DModel:
        class_names, norm_type = class_names or _TRANSFORMER_CLASSES, norm_type or "ada_norm_zero"
    expected = class_names or (cls.__name__,)
    found = config.get("_class_name", expected[0])
    if found not in expected:
        raise UserError(f"{folder} holds a {found}, not a {expected[0]}")
    if norm_type is not None and config.get("norm_type", norm_type) != norm_type:
        raise UserError(f"{folder} holds a {found} with norm_type={config['norm_type']!r}; a {expected[0]} uses "
                        f"{norm_type!r}")
    try:
        if any((folder / f).is_file() for f in _SAFETENSORS):
            model = _from_pretrained(cls, folder, use_safetensors=True)
        elif (folder / _BIN).is_file():
            # Read the .bin ourselves so it is weights_only whatever the installed diffusers does (0.42 does too).
            model = cls.from_config(cls.load_config(folder))
            state = torch.load(folder / _BIN, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        else:
            raise UserError(f"no weights ({_SAFETENSORS[0]} or {_BIN})")
    except Exception as exc:  # shape mismatches, truncated files, refused pickles: name the folder
        raise UserError(f"{folder}: cannot load {expected[0]} ({exc})") from exc
    return model


def _from_pretrained(cls, name_or_path, **kwargs):
    """``cls.from_pretrained``, strict: diffusers only warns about missing weights and initialises them randomly."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "newly initialized" warning would precede our error
    try:
        model, info = cls.from_pretrained(name_or_path, low_cpu_mem_usage=False, output_loading_info=True,
                                          **kwargs)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {_few([str(x) for x in v])}" for k, v in problems.items())
        raise UserError(f"the weights do not match the config ({detail})")
    return model


def _few(items, n: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)  # constants are read at import; the env var may be set later


def require_network(repo_id: str) -> None:
    """Fail in seconds, not after the hub client's retries, when the hub cannot be reached."""
    from huggingface_hub import constants

    hint = f"cannot download hub model {repo_id!r}"
    if hub_offline():
        raise ConnectionError(f"{hint}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                              f"pass a local folder")
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_NETWORK_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"{hint} (no network? {url.hostname}:{port} is unreachable: {exc}); "
                              f"pass a local folder") from exc


def _load_hub(cls, repo_id: str, subfolders: tuple[Optional[str], ...]):
    """(model, subfolder it came from): the local cache first, then the network."""
    last: Optional[Exception] = None
    for local_only in (True, False):
        if not local_only:
            require_network(repo_id)
        for subfolder in subfolders:
            try:
                with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated
                    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                    model = _from_pretrained(cls, repo_id, subfolder=subfolder, local_files_only=local_only)
                return model, subfolder
            except (OSError, ValueError) as exc:  # not cached / no such file in the repo
                last = exc
    places = " or ".join(f"{s}/" if s else "the repo root" for s in subfolders)
    raise UserError(f"hub model {repo_id!r} has no loadable {cls.__name__} in {places} ({last})")


def _load_vae(spec: str) -> tuple[AutoencoderKL, str]:
    """(vae, where) for the ``vae`` option: a folder (or a pipeline folder with vae/) or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return load_model_folder(AutoencoderKL, folder), str(folder)
    if path.exists():
        raise UserError(f"vae={spec!r} is a file; pass an AutoencoderKL folder (config.json + weights)")
    if looks_like_hub_id(spec):
        model, subfolder = _load_hub(AutoencoderKL, spec, (None, "vae"))
        return model, f"hub model {spec}" + (f" ({subfolder}/)" if subfolder else "")
    raise FileNotFoundError(f"vae={spec!r} does not exist (nor is it a hub id like 'stabilityai/sd-vae-ft-ema')")


# --------------------------------------------------------------------------------------------------------------
# Checks and descriptions
# --------------------------------------------------------------------------------------------------------------

def _check_against(config: DiTConfig, source: DiTSource, where: str) -> None:
    """A name or override given with a diffusers model must agree with its config."""
    if source.name is not None:
        named = DiTConfig.named(source.name)
        for key in ("hidden_size", "depth", "num_heads", "patch_size"):
            if getattr(named, key) != getattr(config, key):
                raise UserError(f"{where}: name={source.name!r} means {key}={getattr(named, key)}, but the model "
                                f"has {key}={getattr(config, key)}")
    for key, value in source.overrides().items():
        if getattr(config, key) != value:
            raise UserError(f"{where}: option {key}={value!r} disagrees with the model, which has "
                            f"{key}={getattr(config, key)!r}")


def _describe(config: DiTConfig) -> str:
    size = next((f"DiT-{s}/{config.patch_size}" for s, (depth, hidden, heads) in DIT_SIZES.items()
                 if (depth, hidden, heads) == (config.depth, config.hidden_size, config.num_heads)), "DiT")
    sigma = ", learned sigma" if config.learn_sigma else ""
    return (f"{size} (hidden {config.hidden_size}, depth {config.depth}, {config.num_heads} heads, patch "
            f"{config.patch_size}, input {config.in_channels}x{config.input_size}x{config.input_size}, "
            f"{config.num_classes} classes{sigma})")

