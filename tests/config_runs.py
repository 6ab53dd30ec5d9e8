"""Every method config under ``configs/`` as a small run on the bundled model: which YAMLs a run composes, and the
options that make it small (shared by ``tests/test_configs.py`` and ``benchmarks/regression_record.py``)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["--model.sampler.num_steps", "10", "--data.num_timesteps", "5", "--data.samples_per_timestep", "4",
         "--data.num_test_samples", "20", "--data.test_batch_size", "10", "--trainer.enable_progress_bar", "false"]
RECONSTRUCTION = ["--model.reconstruction.iterations", "10", "--model.reconstruction.batch_size", "8"]
TINY_SEARCH = {"budget_group_size": 64, "population": 4, "top_k": 2, "mutations": 1, "crossovers": 1,
               "generations": 2, "num_samples": 8, "batch_size": 8,
               "sampler": {"kind": "ddim", "num_steps": 5, "cfg_scale": 1.0}}
BASE = {"ditas": "configs/ditas_w4a8.yaml", "ptq4dit": "configs/ptq4dit_w4a8.yaml", "qdit": "configs/qdit_w4a8.yaml",
        "qdiff": "configs/qdiff_w4a8.yaml", "rotated": "configs/rotated_w4a4.yaml",
        "rtn": "configs/rtn_w4a4.yaml"}


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

    def searches(cb: dict) -> bool:
        return (cb.get("init_args") or {}).get("method") == "granularity_search"

    if any(searches(cb) for cb in callbacks):
        small = [dict(cb, init_args={**cb["init_args"], "options": {**(cb["init_args"].get("options") or {}),
                                                                    **TINY_SEARCH}})
                 if searches(cb) else cb for cb in callbacks]
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
