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
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditquant.cli import main  # noqa: E402

SMALL = ["--model.sampler.num_steps", "10", "--data.num_timesteps", "5", "--data.samples_per_timestep", "4",
         "--data.num_test_samples", "20", "--data.test_batch_size", "10", "--trainer.enable_progress_bar", "false"]
RECONSTRUCTION = ["--model.reconstruction.iterations", "10", "--model.reconstruction.batch_size", "8"]
TINY_SEARCH = {"budget_group_size": 64, "population": 4, "top_k": 2, "mutations": 1, "crossovers": 1,
               "generations": 2, "num_samples": 8, "batch_size": 8,
               "sampler": {"kind": "ddim", "num_steps": 5, "cfg_scale": 1.0}}
BASE = {"ditas": "configs/ditas_w4a8.yaml", "ptq4dit": "configs/ptq4dit_w4a8.yaml", "qdit": "configs/qdit_w4a8.yaml",
        "qdiff": "configs/qdiff_w4a8.yaml"}


def config_stacks() -> dict[str, list[str]]:
    """name -> the --config files of a run: each method config alone, each overlay after its method config."""
    stacks = {p.stem: [str(p.relative_to(ROOT))] for p in sorted((ROOT / "configs").glob("*.yaml")) if p.stem != "fp"}
    for folder in ("ablations", "paper"):
        for p in sorted((ROOT / "configs" / folder).glob("*.yaml")):
            stacks[f"{folder}/{p.stem}"] = [BASE[p.stem.split("_")[0]], str(p.relative_to(ROOT))]
    return stacks


def lookup(path: str, key: str) -> tuple[bool, object]:
    """(whether the YAML sets the dotted ``key``, its value)."""
    node = yaml.safe_load((ROOT / path).read_text()) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def merged(stack: list[str], key: str):
    """The value of a dotted key after the stack's YAMLs are applied in order (None if unset)."""
    value = None
    for path in stack:
        found, node = lookup(path, key)
        if found:
            value = node
    return value


def run_args(name: str, stack: list[str], root: Path, calib: Path, scratch: Path) -> list[str]:
    args = [a for path in stack for a in ("--config", str(ROOT / path))]
    callbacks = merged(stack, "trainer.callbacks") or []
    if any(cb.get("class_path", "").endswith("GranularitySearch") for cb in callbacks):
        small = [dict(cb, init_args={**(cb.get("init_args") or {}), **TINY_SEARCH})
                 if cb.get("class_path", "").endswith("GranularitySearch") else cb for cb in callbacks]
        overlay = scratch / f"{name.replace('/', '_')}_tiny_search.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": small}}))
        args += ["--config", str(overlay)]
    args += ["--trainer.default_root_dir", str(root), "--data.cache_dir", str(calib), *SMALL]
    if any(lookup(path, "data.num_timesteps") == (True, None) for path in stack):
        args += ["--data.num_timesteps", "null"]  # DiTAS: every step of the trajectory
    if merged(stack, "model.reconstruction") is not None:
        args += RECONSTRUCTION
        if merged(stack, "model.reconstruction.mode") == "sequential":
            args += ["--model.reconstruction.activation_iterations", "4"]
    return args


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


def compare_runs(reference: Path, new: Path) -> tuple[bool, str]:
    """Every calibrated tensor and every sample equal? A line saying so, or where they differ."""
    a, b = load_file(reference / "quantized" / "model.safetensors"), load_file(new / "quantized" / "model.safetensors")
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
