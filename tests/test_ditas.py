"""DiTAS end to end: fit and test from the CLI for any sampling step count, batch-independent activations."""

import json

import pytest
import torch

from ditquant.cli import main as cli_main
from ditquant.models.bundled import DIT_DIR
from ditquant.models.dit import build_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.spec import QuantSpec
from tests.tiny_models import random_dit, tiny_config

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
SMALL_SEARCH = """
trainer:
  callbacks:
    - class_path: ditquant.MethodCallback
      init_args: {method: temporal_smoothing, options: {alphas: [0.0, 0.5]}}
    - class_path: ditquant.MethodCallback
      init_args: {method: low_rank_compensation, options: {rank: 4, iterations: 2}}
"""


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


@needs_bundled
@pytest.mark.parametrize("steps", [10, 100])
def test_ditas_fit_then_test_for_any_step_count(tmp_path, steps):
    overlay = tmp_path / "small_search.yaml"
    overlay.write_text(SMALL_SEARCH)
    root = tmp_path / "run"
    common = ["--config", "configs/ditas_w4a8.yaml", "--config", str(overlay), "--trainer.default_root_dir",
              str(root), "--data.cache_dir", str(tmp_path / "calib"), "--model.sampler.num_steps", str(steps),
              "--data.samples_per_timestep", "1", "--data.num_test_samples", "2", "--data.test_batch_size", "2",
              "--trainer.enable_progress_bar", "false"]
    cli_main(["fit", *common])
    summary = json.loads((root / "quantized" / "fit_summary.json").read_text())
    smoothing = summary["preprocessing"]["temporal_smoothing"]
    assert smoothing["timesteps"] == steps  # every step of the trajectory, whatever the count
    assert set(smoothing["alpha"].values()) <= {0.0, 0.5} and len(smoothing["alpha"]) == 8 * 4
    lora = summary["preprocessing"]["low_rank_compensation"]
    assert all(lora["error"][n] < lora["rtn_error"][n] for n in lora["error"])
    cli_main(["test", *common])
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["label"] == "W4A8" and metrics["sampler"]["num_steps"] == steps and metrics["psnr_vs_fp"] > 10


def test_per_sample_activations_make_outputs_independent_of_the_batch():
    model = random_dit()
    outputs = {}
    for granularity in ("sample", "tensor"):
        m = build_dit(tiny_config())
        m.load_state_dict(model.state_dict())
        spec = QuantSpec(bits=8, granularity=granularity, dynamic=True)
        quantize_model(m.double().eval(), QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), activation=spec,
                                             roles=["qkv", "attn_out", "fc1", "fc2"]))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)  # float64: no batch-size-dependent rounding
        x = x * torch.tensor([1.0, 5.0, 0.2, 2.0], dtype=torch.float64)[:, None, None, None]
        t, y = torch.tensor([900, 10, 500, 250]), torch.tensor([1, 2, 10, 3])
        with torch.no_grad():
            together = m(x, t, y).sample
            alone = torch.cat([m(x[i:i + 1], t[i:i + 1], y[i:i + 1]).sample for i in range(4)])
        outputs[granularity] = (together - alone).abs().max().item()
    assert outputs["sample"] < 1e-9          # per sample: a row's result ignores the rest of the batch
    assert outputs["tensor"] > 1e-3          # per whole batch (the official code): it does not


@needs_bundled
def test_bad_ditas_options_are_one_line_errors(tmp_path):
    for bad, message in [("{alpha: 1.5}", r"values in \[0, 1\]"), ("{alphas: [0.5, 2.0]}", r"values in \[0, 1\]")]:
        overlay = tmp_path / "bad.yaml"
        overlay.write_text("trainer:\n  callbacks:\n    - class_path: ditquant.MethodCallback\n"
                           f"      init_args: {{method: temporal_smoothing, options: {bad}}}\n")
        with pytest.raises(SystemExit, match=message):
            cli_main(["fit", "--config", "configs/ditas_w4a8.yaml", "--config", str(overlay),
                      "--trainer.default_root_dir", str(tmp_path / "run")])
