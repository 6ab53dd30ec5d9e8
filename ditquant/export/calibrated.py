"""A calibrated model on disk: ``model.safetensors`` (the quantized DiT's state: FP or folded weights, scales, zero
points, AdaRound codes, the layers' pieces) and ``quantized.yaml`` (the model source and QuantConfig it was made
with, and the per-layer plan they resolved to).

``ditquant test --model.load_quantized DIR`` rebuilds the same quantized model and loads the state, without
recalibrating; the YAML guards against loading into a different model or configuration: the plans are compared
layer by layer (files written before plans were saved: the configs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ditquant.errors import UserError
from ditquant.io import atomic_write, check_same, committed_folder, verify_folder, yaml_plain
from ditquant.quant.config import quant_config_from_dict
from ditquant.quant.plan import model_plan, plan_as_dict
from ditquant.quant.spec import QuantSpec

FORMAT = "ditquant-quantized/1"
WEIGHTS, META = "model.safetensors", "quantized.yaml"


def family_key(source) -> str:
    """The key a model source is saved under: ``pixart`` for a PixArtSource, ``dit`` for a DiTSource."""
    return "pixart" if type(source).__name__ == "PixArtSource" else "dit"


def saved_family(meta: dict) -> str:
    """The model family a saved description (quantized.yaml, integer.yaml) is for: the key its source is under."""
    return "pixart" if "pixart" in meta else "dit"


def _describe(source, quant, model: torch.nn.Module) -> dict:
    return {"format": FORMAT, family_key(source): dataclasses.asdict(source), "quant": dataclasses.asdict(quant),
            "plan": plan_as_dict(model_plan(model))}


def save_quantized(model: torch.nn.Module, folder: str | Path, source, quant) -> Path:
    """Write the model state and its description atomically into ``folder``."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with committed_folder(folder, (WEIGHTS, META)) as folder:
        with atomic_write(folder / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        with atomic_write(folder / META) as tmp:
            tmp.write_text(yaml.safe_dump(_describe(source, quant, model), sort_keys=False))
    return folder


SEARCHED_LAYOUT = ("layer_group_sizes", "layer_activation_bits")  # QuantConfig fields a method's search writes


def saved_searched_layout(folder: str | Path) -> dict[str, dict]:
    """The searched per-layer layout (``SEARCHED_LAYOUT`` fields: the granularity and mixed-precision searches'
    results) a saved model was made with; empty if none."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        return {}  # load_quantized reports the missing file
    quant = (yaml.safe_load(meta_path.read_text()) or {}).get("quant")
    config = quant_config_from_dict(quant) if quant else None
    return {f: getattr(config, f) for f in SEARCHED_LAYOUT if config is not None and getattr(config, f)}


def _spec_dict(d: dict | None) -> dict | None:
    return None if d is None else yaml_plain(dataclasses.asdict(QuantSpec(**d)))


def load_quantized(model: torch.nn.Module, folder: str | Path, source, quant) -> None:
    """Load a saved state into ``model`` (already quantized with ``quant``); refuse a mismatching file."""
    folder = Path(folder)
    meta_path, weights_path = folder / META, folder / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"model.load_quantized: {p} does not exist (expected a folder written by "
                                    "`ditquant fit`, e.g. runs/<name>/quantized)")
    verify_folder(folder, (WEIGHTS, META), "model.load_quantized")
    meta = yaml.safe_load(meta_path.read_text())
    expected = yaml.safe_load(yaml.safe_dump(_describe(source, quant, model), sort_keys=False))
    if meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: not a ditquant calibrated model (format {meta.get('format')!r})")
    key = family_key(source)
    try:  # the saved specs in today's form: a field added since they were written takes its default
        if "plan" in meta:  # what the layers are, and the attention matmuls' spec
            plan = {name: {**p, "weight": _spec_dict(p["weight"]), "input": _spec_dict(p["input"])}
                    for name, p in meta["plan"].items()}
            saved = {key: meta.get(key), "quant": {"attention": _spec_dict((meta.get("quant") or {}).get(
                "attention")), "plan": plan}}
            wanted = {key: expected[key], "quant": {"attention": expected["quant"]["attention"],
                                                    "plan": expected["plan"]}}
        else:
            saved = {key: meta.get(key), "quant": yaml_plain(dataclasses.asdict(quant_config_from_dict(
                meta["quant"])))}
            wanted = {k: expected[k] for k in (key, "quant")}
    except (TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{meta_path}: cannot read its quant config ({e}); it was written by another ditquant "
                        "version") from None
    check_same({"model": saved}, {"model": wanted}, f"{meta_path}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_path}: cannot read ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{weights_path} does not match the model: {str(e)[:500]}") from None
