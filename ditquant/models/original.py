"""Exact conversion of facebookresearch/DiT checkpoints (``models.py`` key layout) into diffusers' DiT.

The original DiT keeps one timestep/label embedder and a fused ``attn.qkv``; diffusers keeps a copy of the
embedders in every block's ``norm1.emb`` and splits q, k, v into three linears. Everything else is a renaming:

    x_embedder.proj                      -> pos_embed.proj
    pos_embed (1, T, D), fixed sin-cos   -> pos_embed.pos_embed (non-persistent buffer, checked and copied)
    t_embedder.mlp.{0,2}                 -> transformer_blocks.*.norm1.emb.timestep_embedder.linear_{1,2}
    y_embedder.embedding_table           -> transformer_blocks.*.norm1.emb.class_embedder.embedding_table
    blocks.i.attn.qkv (rows q, k, v)     -> transformer_blocks.i.attn1.to_{q,k,v}
    blocks.i.attn.proj                   -> transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2               -> transformer_blocks.i.ff.net.0.proj / ff.net.2
    blocks.i.adaLN_modulation.1          -> transformer_blocks.i.norm1.linear
    final_layer.adaLN_modulation.1       -> proj_out_1
    final_layer.linear                   -> proj_out_2

Files are read with ``torch.load(weights_only=True)`` or safetensors only: a checkpoint never runs code.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ditquant.errors import UserError
from ditquant.models.dit import DIT_SIZES, DiTConfig, build_dit

PathLike = Union[str, Path]
StateDict = dict[str, torch.Tensor]

# Heads are not stored in the weights; the named DiT sizes fix them by width.
HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}
# Options that may be given next to (or instead of) a name; each is checked against the weights.
OVERRIDABLE = ("hidden_size", "depth", "num_heads", "patch_size", "input_size", "in_channels", "num_classes",
               "learn_sigma", "class_dropout_prob")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
# Keys the architecture is read from; without them the file is not an original DiT state dict.
_REQUIRED = ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "y_embedder.embedding_table.weight")


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------

def read_checkpoint(path: PathLike, use_ema: bool = True) -> StateDict:
    """The original-layout state dict stored in ``path`` (.pt/.pth/.ckpt or .safetensors).

    A .pt file may hold the state dict itself (the released DiT-XL-2-256x256.pt) or DiT's training checkpoint
    ``{"model", "ema", "opt", "args"}``; ``use_ema`` picks ``ema`` over ``model``. A DDP ``module.`` prefix
    (or torch.compile's ``_orig_mod.``) is stripped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file; an original DiT checkpoint is a .pt/.pth/.safetensors file")
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        obj = _read_torch(path)
    else:
        raise UserError(f"{path}: unknown checkpoint suffix {path.suffix!r}; expected one of "
                        f"{', '.join(CHECKPOINT_SUFFIXES)}")
    state = _select_weights(obj, path, use_ema)
    return _strip_prefixes(state)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt headers
        raise UserError(f"{path}: cannot read checkpoint ({exc})") from exc


def _read_torch(path: Path):
    # DiT's train.py stores its argparse.Namespace under "args"; allow exactly that plain container.
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        if allowed is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with allowed([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise UserError(f"{path}: cannot read checkpoint ({exc})") from exc
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it needs {found.group(1)}" if found else "it holds Python objects other than tensors"
        raise UserError(
            f"{path}: refused to unpickle ({what}): checkpoints are only read with torch.load(weights_only=True), "
            f"so that loading never runs code. Where you trust the file, re-save just the weights, e.g. "
            f"torch.save(ckpt['ema'], 'weights.pt'), or convert them to .safetensors") from exc
    except Exception as exc:  # truncated zip archives, bad magic numbers, ...
        raise UserError(f"{path}: cannot read checkpoint ({exc})") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _select_weights(obj, path: Path, use_ema: bool) -> StateDict:
    if _is_state_dict(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: expected a state dict or a dict with 'model'/'ema', found {type(obj).__name__}")
    wanted, other = ("ema", "model") if use_ema else ("model", "ema")
    if wanted in obj:
        if not _is_state_dict(obj[wanted]):
            raise UserError(f"{path}: entry {wanted!r} is not a state dict of tensors")
        return dict(obj[wanted])
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    if other in obj:
        flag = "use_ema=False" if use_ema else "use_ema=True"
        raise UserError(f"{path} has no {wanted!r} weights (top-level keys: {keys}); pass {flag} to load {other!r}")
    raise UserError(f"{path}: found neither a state dict nor 'model'/'ema' entries (top-level keys: {keys})")


def _strip_prefixes(state: StateDict) -> StateDict:
    for prefix in ("module.", "_orig_mod."):  # DDP, torch.compile
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------------------------
# Architecture from weights
# --------------------------------------------------------------------------------------------------------------

def _few(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _check_required(state: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in _REQUIRED if k not in state]
    if not missing:
        return
    hint = ""
    if any(k.startswith("transformer_blocks.") for k in state):
        hint = " It looks like a diffusers state dict: pass the diffusers model folder instead."
    raise UserError(f"not an original DiT state dict: missing keys {_few(missing)} "
                    f"(found keys like {_few(state, 4)}).{hint}")


def infer_config(state: Mapping[str, torch.Tensor], name: Optional[str] = None, **overrides) -> DiTConfig:
    """The architecture of an original-layout state dict.

    Everything but the head count is read from the weights. Heads come from ``name`` (e.g. "DiT-XL/2"), the
    ``num_heads`` override, or the named DiT size with the same width. A name or override that disagrees with
    the weights raises ValueError.
    """
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise UserError(f"unknown option(s) {_few(unknown)}; known: {', '.join(OVERRIDABLE)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_required(state)

    hidden, in_channels, patch, patch_w = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    if patch != patch_w:
        raise UserError(f"x_embedder.proj.weight has non-square patches {patch}x{patch_w}")
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden:
        raise UserError(f"pos_embed has shape {tuple(pos.shape)}; expected (1, T, {hidden})")
    grid = math.isqrt(pos.shape[1])
    if grid * grid != pos.shape[1]:
        raise UserError(f"pos_embed has {pos.shape[1]} tokens, not a square grid")
    out_rows = state["final_layer.linear.weight"].shape[0]  # p * p * out_channels
    if out_rows == patch * patch * 2 * in_channels:
        learn_sigma = True
    elif out_rows == patch * patch * in_channels:
        learn_sigma = False
    else:
        raise UserError(f"final_layer.linear.weight has {out_rows} rows; expected {patch}*{patch}*{in_channels} "
                        f"(eps only) or twice that (learned sigma)")
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()),
                    default=-1)
    if depth == 0:
        raise UserError("the state dict has no 'blocks.N.*' keys")
    dropout = overrides.get("class_dropout_prob", 0.1)
    # The label table has a null-label row for classifier-free guidance whenever labels were dropped in training.
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - (1 if dropout > 0 else 0)

    found = dict(hidden_size=int(hidden), depth=depth, patch_size=int(patch), input_size=grid * int(patch),
                 in_channels=int(in_channels), num_classes=int(num_classes), learn_sigma=learn_sigma)
    if name is not None:
        named = DiTConfig.named(name)
        for key in ("hidden_size", "depth", "patch_size"):
            if getattr(named, key) != found[key]:
                raise UserError(f"name={name!r} means {key}={getattr(named, key)}, but the weights have "
                                f"{key}={found[key]}")
        heads = named.num_heads
        if overrides.get("num_heads", heads) != heads:
            raise UserError(f"num_heads={overrides['num_heads']} disagrees with name={name!r} "
                            f"(which has {heads} heads)")
    elif "num_heads" in overrides:
        heads = overrides["num_heads"]
    elif found["hidden_size"] in HEADS_BY_HIDDEN:
        heads = HEADS_BY_HIDDEN[found["hidden_size"]]
    else:
        raise UserError(f"cannot tell the number of attention heads of a DiT with hidden size {hidden} (heads are not "
                        f"stored in the weights, and no named DiT size has this width); pass num_heads=...")
    for key, value in overrides.items():
        if key in found and value != found[key]:
            raise UserError(f"option {key}={value!r} disagrees with the weights, which have {key}={found[key]!r}")
    return DiTConfig(num_heads=int(heads), class_dropout_prob=dropout, **found)


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------

def original_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an original DiT state dict with its shape."""
    d, c, p = config.hidden_size, config.in_channels, config.patch_size
    mlp = int(d * config.mlp_ratio)
    rows = config.num_classes + (1 if config.class_dropout_prob > 0 else 0)
    tokens = (config.input_size // p) ** 2
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "pos_embed": (1, tokens, d),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (rows, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * config.out_channels, d),
        "final_layer.linear.bias": (p * p * config.out_channels,),
    }
    for i in range(config.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def check_original_state_dict(state: Mapping[str, torch.Tensor], config: DiTConfig) -> None:
    """Raise ValueError naming a few offending keys unless ``state`` has exactly the keys and shapes of ``config``."""
    expected = original_shapes(config)
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_few(extra)}"] if extra else [])
        raise UserError(f"state dict does not match an original DiT with depth={config.depth}, "
                        f"hidden_size={config.hidden_size}: {'; '.join(parts)}")
    wrong = [k for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        detail = ", ".join(f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}" for k in sorted(wrong)[:5])
        raise UserError(f"shape mismatch in {len(wrong)} tensor(s): {detail}")


def convert_original_state_dict(state: Mapping[str, torch.Tensor], config: DiTConfig,
                                copy: bool = True) -> StateDict:
    """The diffusers ``DiTTransformer2DModel`` state dict in float32, plus ``pos_embed.pos_embed``.

    ``pos_embed.pos_embed`` is a non-persistent buffer in diffusers (recomputed on construction), so it is not
    part of the model's ``state_dict``; it is returned so the caller can copy the checkpoint's table in.
    With ``copy=False`` renamed float32 tensors share storage with ``state`` (for a state dict that is thrown
    away: a DiT-XL copy costs 2.7 GB); the per-block embedder copies and q/k/v never share storage.
    """
    check_original_state_dict(state, config)
    d = config.hidden_size

    def get(key: str, fresh: bool = copy) -> torch.Tensor:
        tensor = state[key].detach()
        if tensor.dtype != torch.float32:
            return tensor.to(torch.float32)  # already a copy
        return tensor.clone() if fresh else tensor

    out = {
        "pos_embed.proj.weight": get("x_embedder.proj.weight"),
        "pos_embed.proj.bias": get("x_embedder.proj.bias"),
        "pos_embed.pos_embed": get("pos_embed"),
        "proj_out_1.weight": get("final_layer.adaLN_modulation.1.weight"),
        "proj_out_1.bias": get("final_layer.adaLN_modulation.1.bias"),
        "proj_out_2.weight": get("final_layer.linear.weight"),
        "proj_out_2.bias": get("final_layer.linear.bias"),
    }
    embedders = {
        "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    }
    renames = {"attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
               "norm1.linear": "adaLN_modulation.1"}
    for i in range(config.depth):
        new, old = f"transformer_blocks.{i}.", f"blocks.{i}."
        for dst, src in embedders.items():
            for p in ("weight", "bias"):
                out[f"{new}{dst}.{p}"] = get(f"{src}.{p}", fresh=True)  # every block owns its copy
        out[f"{new}norm1.emb.class_embedder.embedding_table.weight"] = get("y_embedder.embedding_table.weight",
                                                                          fresh=True)
        for dst, src in renames.items():
            for p in ("weight", "bias"):
                out[f"{new}{dst}.{p}"] = get(f"{old}{src}.{p}")
        for p in ("weight", "bias"):
            # The fused rows are [q; k; v], each D rows (heads split inside each), as in reshape(B, N, 3, H, hd).
            # Cloned: views of one storage would make safetensors refuse to save the model.
            q, k, v = get(f"{old}attn.qkv.{p}", fresh=False).split(d, dim=0)
            out[f"{new}attn1.to_q.{p}"], out[f"{new}attn1.to_k.{p}"], out[f"{new}attn1.to_v.{p}"] = \
                q.clone(), k.clone(), v.clone()
    return out


def _check_pos_embed(table: torch.Tensor, config: DiTConfig) -> None:
    """The checkpoint's pos_embed must be the fixed sin-cos table diffusers recomputes on every load."""
    grid = config.input_size // config.patch_size
    expected = get_2d_sincos_pos_embed(config.hidden_size, grid, base_size=grid, interpolation_scale=1.0,
                                       output_type="pt").float()[None]  # (1, T, D)
    if expected.shape != table.shape:
        raise UserError(f"pos_embed has shape {tuple(table.shape)}, diffusers expects {tuple(expected.shape)}")
    err = (expected - table).abs().max().item()
    if err > 1e-4:
        raise UserError(f"pos_embed is not DiT's fixed 2D sin-cos table (max difference {err:.3g}); diffusers "
                        f"recomputes that table whenever a model is built, so these weights cannot be represented")


def original_to_diffusers(state: Mapping[str, torch.Tensor], config: DiTConfig, original_numerics: bool = True,
                          copy: bool = True) -> DiTTransformer2DModel:
    """A diffusers DiT (float32, eval, no grad) holding the original-layout weights ``state``.

    ``original_numerics=False`` gives a stock diffusers model, which runs these weights slightly differently
    (see ``ditquant.models.dit``); it exists to show that difference. ``copy=False``: the model takes float32
    tensors of ``state`` as its parameters instead of copies (see ``convert_original_state_dict``).
    """
    converted = convert_original_state_dict(state, config, copy=copy)
    pos_embed = converted.pop("pos_embed.pos_embed")
    _check_pos_embed(pos_embed, config)
    # Build without allocating or initialising weights (DiT-XL is 675M parameters), then take the tensors.
    with torch.device("meta"):
        model = build_dit(config)
    if not original_numerics:
        model = _stock_numerics(model)
    model.load_state_dict(converted, strict=True, assign=True)
    model.pos_embed.pos_embed = pos_embed  # exact: the checkpoint's own table
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a diffusers version with new tensors this converter does not know
        raise RuntimeError(f"conversion left tensors unset: {_few(on_meta)}")
    return model.eval().requires_grad_(False)


def _stock_numerics(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
        block.norm3.eps = 1e-5
    model.register_to_config(norm_eps=1e-5)
    return model


def load_original_checkpoint(path: PathLike, name: Optional[str] = None, use_ema: bool = True,
                             original_numerics: bool = True, **overrides) -> DiTTransformer2DModel:
    """Load a facebookresearch/DiT checkpoint as a diffusers DiT that computes exactly what the original does.

    Args:
        path: .pt/.pth (plain state dict, or DiT's training checkpoint with ``model``/``ema``) or .safetensors.
        name: named size such as "DiT-XL/2" (fixes the head count; checked against the weights).
        use_ema: take ``ema`` rather than ``model`` from a training checkpoint.
        original_numerics: False gives a stock diffusers model (for comparisons only).
        **overrides: architecture fields (``num_heads``, ``depth``, ...) checked against the weights.
    """
    state = read_checkpoint(path, use_ema=use_ema)
    try:
        config = infer_config(state, name, **overrides)
        # The state was read for this model alone: its tensors become the parameters, no copy.
        return original_to_diffusers(state, config, original_numerics=original_numerics, copy=False)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc
