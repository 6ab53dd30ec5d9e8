"""``ditquant export RUN [--format integer|diffusers] [--out DIR] [--keep-float LAYER ...]``: the calibrated model a
fit wrote, as an integer model on disk.

RUN is ``<default_root_dir>`` of a finished ``ditquant fit`` (or its ``quantized/`` folder); the model source and
QuantConfig are read from ``quantized/quantized.yaml``, the FP weights from that source (to rebuild the calibrated
model exactly). ``--format integer`` (default) writes ditquant's folder (``load_integer``, ``ditquant test
--model.load_integer``) to ``<RUN>/integer``; ``--format diffusers`` writes diffusers' layout to ``<RUN>/diffusers``
(``DiTTransformer2DModel.from_pretrained`` after ``import ditquant``; a pipeline folder when the model source is one,
for ``DiTPipeline.from_pretrained``; PixArt: ``PixArtTransformer2DModel`` / ``PixArtAlphaPipeline``), where
``--keep-float`` leaves the named quantized layers in floating point.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import yaml
from rich.console import Console
from rich.table import Table

from ditquant.errors import UserError
from ditquant.integer.convert import to_integer
from ditquant.export.diffusers_format import save_diffusers
from ditquant.export.integer import save_integer
from ditquant.integer.linear import IntLinear
from ditquant.models.adapters.pixart import attach_prompts
from ditquant.models.loading import DiTSource, LoadedDiT, classify_source, load_dit
from ditquant.models.pixart import LoadedPixArt, PixArtSource, load_pixart
from ditquant.models.adapters import quantize_model
from ditquant.quant.apply import uncalibrated_layers
from ditquant.export.calibrated import META, load_quantized, saved_family
from ditquant.quant.config import QuantConfig, quant_config_from_dict
from ditquant.quant.modules import quant_layers


def quantized_folder(run: Path) -> Path:
    """``run`` itself if it holds quantized.yaml, else ``run/quantized``; a clear error if neither does."""
    for folder in (run, run / "quantized"):
        if (folder / META).is_file():
            return folder
    raise FileNotFoundError(f"ditquant export: no calibrated model in {run} (expected {run / 'quantized' / META}, "
                            "written at the end of `ditquant fit`): the model was never calibrated, or fit did not "
                            "finish")


def load_calibrated(folder: Path) -> tuple[LoadedDiT | LoadedPixArt, DiTSource | PixArtSource, QuantConfig]:
    """The calibrated model a fit saved in ``folder`` (``quantized/``): its source loaded, quantized with the
    saved QuantConfig and given the saved state; refuses a model with uncalibrated layers. A PixArt model comes
    with its prompts attached."""
    meta = yaml.safe_load((folder / META).read_text())
    quant = quant_config_from_dict(meta["quant"])
    if saved_family(meta) == "pixart":
        source = PixArtSource(**meta["pixart"])
        loaded = load_pixart(source)
        if loaded.prompts is not None:
            attach_prompts(loaded.transformer, loaded.prompts)
    else:
        source = DiTSource(**meta["dit"])
        loaded = load_dit(source)
    quantize_model(loaded.transformer, quant, init_weights=False)
    load_quantized(loaded.transformer, folder, source, quant)
    if missing := uncalibrated_layers(loaded.transformer):
        raise UserError(f"{folder}: {len(missing)} layers are not calibrated (e.g. {missing[0]})")
    return loaded, source, quant


def pipeline_folder(loaded: LoadedDiT | LoadedPixArt) -> Optional[Path]:
    """The pipeline folder the model was loaded from (its other components go with a diffusers export), if any."""
    if isinstance(loaded, LoadedPixArt):
        return loaded.pipeline
    kind, path = classify_source(loaded.source.source)
    return path if kind == "pipeline" else None


def size_table(fake: torch.nn.Module, integer: torch.nn.Module) -> Table:
    """Bytes of the quantized layers' weights: fp32 vs stored integer (weights, scales and zero points)."""
    fp32 = sum(q.layer.weight.numel() * 4 for q in quant_layers(fake))
    stored = sum(m.weight_bytes for m in integer.modules() if isinstance(m, IntLinear))
    table = Table(title="quantized weights")
    for col in ("layers", "fp32 bytes", "integer bytes", "ratio"):
        table.add_column(col, justify="right")
    layers = sum(isinstance(m, IntLinear) for m in integer.modules())
    table.add_row(str(layers), f"{fp32:,}", f"{stored:,}", f"1/{fp32 / max(stored, 1):.2f}")
    return table


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ditquant export", description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the fit's default_root_dir (or its quantized/ folder)")
    p.add_argument("--format", choices=("integer", "diffusers"), default="integer",
                   help="ditquant's integer folder, or diffusers' layout (from_pretrained)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/<format>)")
    p.add_argument("--keep-float", nargs="+", default=[], metavar="LAYER",
                   help="quantized layers to export in floating point (diffusers format: modules_to_not_convert)")
    args = p.parse_args(argv)
    if args.keep_float and args.format != "diffusers":
        raise UserError("ditquant export: --keep-float is for --format diffusers")
    folder = quantized_folder(args.run)
    loaded, source, quant = load_calibrated(folder)
    integer = to_integer(loaded.transformer, keep_float=args.keep_float)
    out = args.out or folder.parent / args.format
    if args.format == "diffusers":
        save_diffusers(integer, out, source, quant, keep_float=args.keep_float, pipeline=pipeline_folder(loaded))
    else:
        save_integer(integer, out, source, quant)
    Console(stderr=True).print(size_table(loaded.transformer, integer))
    print(f"integer model written to {out}")
