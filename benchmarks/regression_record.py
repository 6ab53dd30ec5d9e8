"""Record what every method config produces on the bundled model, and check a later version reproduces it bit for bit.

    python benchmarks/regression_record.py record runs/regression     # on the code whose results are the reference
    python benchmarks/regression_record.py compare runs/regression    # after a change: every tensor and sample equal?

For every method config under ``configs/`` (each ablation and paper overlay after its method config) a small fit and
test on the bundled model: sampler 10 steps, calibration 5 timesteps x 4 trajectories (DiTAS: every step), 10
reconstruction steps per unit (batch 8, 4 activation steps in Q-Diffusion's second pass), the Q-DiT search cut to
2 generations of 4 candidates on 8 samples, 20 test samples; seed 0 everywhere. The record keeps each run's
calibrated model (``quantized/model.safetensors``), its test samples (quantized and FP) and metrics. ``compare``
re-runs into a scratch folder and reports, per config, whether every tensor and every sample is identical (and the
largest difference where one is not). About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditquant.cli import main  # noqa: E402
from tests.config_runs import config_stacks, run_args  # noqa: E402

def run_one(name: str, stack: list[str], out: Path, calib: Path, scratch: Path) -> dict:
    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    args = run_args(name, stack, root, calib, scratch)
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()) as err:
        for command in ("fit", "test"):
            try:
                main([command, *args])
            except SystemExit as e:
                if e.code not in (0, None):
                    raise RuntimeError(f"{name}: ditquant {command} failed ({e.code}):\n{err.getvalue()[-3000:]}")
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    return {"configs": stack, "seconds": round(time.perf_counter() - started, 1),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}}


# Tensors renamed on purpose since records were first made (same values, new names): old suffix -> new suffix.
RENAMED = {".input_divisor": ".input_transforms.0.divisor", ".lora_left": ".branches.0.left",
           ".lora_right": ".branches.0.right"}


def current_names(tensors: dict) -> dict:
    """A record's tensors under today's names (``RENAMED``)."""
    def rename(key: str) -> str:
        for old, new in RENAMED.items():
            if key.endswith(old):
                return key[: -len(old)] + new
        return key
    return {rename(k): v for k, v in tensors.items()}


def compare_runs(reference: Path, new: Path) -> tuple[bool, str]:
    """Every calibrated tensor and every sample equal? A line saying so, or where they differ."""
    a = current_names(load_file(reference / "quantized" / "model.safetensors"))
    b = load_file(new / "quantized" / "model.safetensors")
    if a.keys() != b.keys():
        return False, f"tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    differ = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    problems, compared = [], [f"{len(a)} tensors"]
    if differ:
        worst = max(differ, key=differ.get)
        problems.append(f"{len(differ)} of {len(a)} tensors differ (largest: {worst}, {differ[worst]:.3g})")
    for npz in ("samples.npz", "samples_fp.npz"):
        if not (reference / "test" / npz).is_file():
            continue  # a record made before test wrote the FP samples
        x, y = np.load(reference / "test" / npz)["arr_0"], np.load(new / "test" / npz)["arr_0"]
        compared.append(npz)
        if not np.array_equal(x, y):
            problems.append(f"{npz}: {int((x != y).sum())} of {x.size} pixel values differ")
    return (not problems), ("; ".join(problems) or f"identical ({', '.join(compared)})")


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "compare"))
    parser.add_argument("folder", type=Path, help="the record (written by record, read by compare)")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    args = parser.parse_args(argv)
    sys.argv = ["ditquant"]
    stacks = {k: v for k, v in config_stacks().items() if not args.only or k in args.only}
    if args.mode == "compare":
        new = [k for k in stacks if not (args.folder / k / "quantized").is_dir()]
        for name in new:
            print(f"{name}: NEW (not in the record; record again to include it)", flush=True)
        stacks = {k: v for k, v in stacks.items() if k not in new}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        out = args.folder if args.mode == "record" else scratch / "new"
        calib = scratch / "calib"
        index = {}
        ok = True
        for name, stack in stacks.items():
            info = run_one(name, stack, out, calib, scratch)
            if args.mode == "record":
                index[name] = info
                print(f"{name}: recorded in {info['seconds']} s {info['metrics']}", flush=True)
            else:
                same, line = compare_runs(args.folder / name, out / name)
                ok &= same
                print(f"{name}: {'OK' if same else 'CHANGED'} {line}", flush=True)
        if args.mode == "record":
            (args.folder / "record.json").write_text(json.dumps(index, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main_())
