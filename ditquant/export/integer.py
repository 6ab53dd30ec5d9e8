"""An integer model on disk: ``model.safetensors`` (int8 / packed int4 weights, scales, zero points, and the float
parts that were never quantized) and ``integer.yaml`` (architecture, model source — its key names the family, ``dit``
or ``pixart`` —, QuantConfig, per-layer layout).

``load_integer`` rebuilds the model from the YAML alone — the architecture is built on the meta device and only the
stored tensors are materialised, so the FP weights are neither needed nor allocated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ditquant.errors import UserError
from ditquant.integer.convert import fuse_gelu, integer_shell
from ditquant.integer.linear import IntLinear
from ditquant.io import atomic_write, check_same, committed_folder, verify_folder, yaml_plain
from ditquant.export.calibrated import family_key, saved_family
from ditquant.models.adapters import adapter_for, adapter_named, quantize_model
from ditquant.quant.config import QuantConfig, quant_config_from_dict
from ditquant.quant.modules import QuantLayer

FORMAT = "ditquant-integer/1"
WEIGHTS, META = "model.safetensors", "integer.yaml"


def integer_layout(model: nn.Module) -> dict:
    """Each integer layer's name, shape, specs and weight storage (what an exported model says it holds)."""
    return {name: {"in": m.in_features, "out": m.out_features, "weight": m.weight_spec.label("w"),
                   "storage": "int4" if m.packed else "int8", "activation": m.input_spec.label("a")}
            for name, m in model.named_modules() if isinstance(m, IntLinear)}


def save_integer(model: nn.Module, folder: str | Path, source, quant: QuantConfig) -> Path:
    """Write an integer model (``to_integer``'s output) and its description atomically into ``folder``."""
    folder = Path(folder)
    layout = integer_layout(model)
    if not layout:
        raise UserError("save_integer: the model has no integer layers (convert it with to_integer first)")
    if not getattr(source, "original_numerics", True):
        raise UserError("export supports models run with the original DiT numerics (dit.original_numerics: true)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # non-persistent buffers too (the positional embedding): the loader builds the architecture without computing them
    state.update({k: v.detach().cpu().contiguous() for k, v in model.named_buffers() if k not in state})
    meta = {"format": FORMAT, "architecture": adapter_for(model).architecture(model),
            family_key(source): dataclasses.asdict(source),
            "quant": dataclasses.asdict(quant), "layers": layout}
    with committed_folder(folder, (WEIGHTS, META)) as folder:
        with atomic_write(folder / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        with atomic_write(folder / META) as tmp:
            tmp.write_text(yaml.safe_dump(meta, sort_keys=False))
    return folder


def integer_skeleton(model: nn.Module, quant: QuantConfig, keep_float: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """``model`` quantized per ``quant`` (in place) with every weight-quantized layer an empty IntLinear, except the
    ``keep_float`` ones, which are unwrapped back to their floating-point layer: the shape of an exported model, to
    load its stored tensors into. New tensors are made on the meta device (shapes only)."""
    with torch.device("meta"):
        quantize_model(model, quant, init_weights=False)
        for name, q in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]:
            if q.weight_quantizer.spec.enabled:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        q.layer if name in keep_float else integer_shell(q))
    return fuse_gelu(model)


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a saved state's tensors into ``model`` (built on the meta device) without copies: non-persistent buffers
    (saved by ``save_integer``) by hand, the rest with a strict ``load_state_dict(assign=True)``."""
    persistent, buffers = model.state_dict().keys(), dict(model.named_buffers())
    for name in [k for k in state if k not in persistent and k in buffers]:
        owner, _, buffer = name.rpartition(".")
        model.get_submodule(owner)._buffers[buffer] = state.pop(name)
    model.load_state_dict(state, strict=True, assign=True)


def read_integer_meta(folder: str | Path) -> dict:
    """integer.yaml of an exported folder, checked for presence and format."""
    meta_path = Path(folder) / META
    for p in (meta_path, Path(folder) / WEIGHTS):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (expected a folder written by `ditquant export`)")
    verify_folder(folder, (WEIGHTS, META), "integer model")
    meta = yaml.safe_load(meta_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: not a ditquant integer model (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    return meta


def load_integer(folder: str | Path, quant: Optional[QuantConfig] = None,
                 architecture: Optional[dict] = None) -> nn.Module:
    """The integer model saved in ``folder``; ``quant`` / ``architecture`` (the family adapter's ``architecture``
    of the FP model), if given, must be what it was made with. A PixArt model needs its prompts attached
    (``attach_prompts``) before it is called."""
    folder = Path(folder)
    meta = read_integer_meta(folder)
    saved_quant = quant_config_from_dict(meta["quant"])
    if quant is not None and not quant.layer_group_sizes:  # a searched layout travels with the folder
        quant = dataclasses.replace(quant, layer_group_sizes=saved_quant.layer_group_sizes)
    saved, wanted = {}, {}
    if quant is not None:
        saved["quant"], wanted["quant"] = meta["quant"], yaml_plain(dataclasses.asdict(quant))
    if architecture is not None:
        saved["architecture"], wanted["architecture"] = meta["architecture"], yaml_plain(architecture)
    check_same({"model": saved}, {"model": wanted}, str(folder / META))
    with torch.device("meta"):
        model = integer_skeleton(adapter_named(saved_family(meta)).build(meta["architecture"]), saved_quant)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{folder / WEIGHTS}: cannot read ({e})") from None
    try:
        assign_state(model, state)
    except RuntimeError as e:
        raise UserError(f"{folder / WEIGHTS} does not match {folder / META}: {str(e)[:500]}") from None
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UserError(f"{folder / WEIGHTS}: tensors missing for {leftover[:5]}")
    return model.eval().requires_grad_(False)
