"""Every YAML under configs/ runs: one small fit and test on the bundled model per method config, and per ablation
and paper overlay after its method config (configs/models/*.yaml need DiT-XL/2 weights: parsed in test_cli)."""

from __future__ import annotations

import json
import math

import pytest

from ditquant.models.bundled import DIT_DIR
from tests.cli_helpers import run
from tests.config_runs import config_stacks, run_args

STACKS = config_stacks()


@pytest.fixture(scope="module")
def calibration_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("calib")  # one recording per recipe for the whole module


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")
@pytest.mark.parametrize("name", STACKS, ids=str)
def test_every_method_config_fits_and_tests(name, tmp_path, calibration_cache):
    root = tmp_path / "run"
    args = run_args(name, STACKS[name], root, calibration_cache, tmp_path)
    run("fit", *args)
    assert (root / "quantized" / "manifest.json").is_file()
    run("test", *args)
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and "PARTIAL" not in metrics["label"]
    assert all(math.isfinite(metrics[k]) for k in ("fid_vs_data", "fid_vs_fp", "psnr_vs_fp"))
