"""Block reconstruction: attention quantization, capture/replay, the unit cache, stages, loss reduction and exact
resume (in process and with a SIGKILLed CLI run), save/reload of calibrated models, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditquant.calibration.dataset import CalibrationSet
from ditquant.models.bundled import DIT_DIR
from ditquant.models.layout import reconstruction_units
from ditquant.models.loading import DiTSource
from ditquant.models.adapters import quantize_model
from ditquant.quant.apply import quantization_table
from ditquant.export.calibrated import load_quantized, save_quantized
from ditquant.quant.attention import QuantAttnProcessor
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations, quant_disabled, quant_layers
from ditquant.quant.spec import QuantSpec
from ditquant.reconstruction.cache import UnitCache
from ditquant.calibration.capture import capture_input, replay, run_until_output
from ditquant.reconstruction.config import ReconstructionConfig
from ditquant.reconstruction.reconstructor import BlockReconstructor, plan_stages
from tests.cli_helpers import checkpointed_step, fit_command
from tests.tiny_models import random_dit

W4A8 = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), attention=QuantSpec(bits=8))


def tiny_dit(seed=0):
    return random_dit(std=0.1, seed=seed)


def calibration(n_steps=3, per_step=4):
    g = torch.Generator().manual_seed(1)
    data = {"xs": torch.randn(n_steps, per_step, 4, 8, 8, generator=g), "ts": torch.arange(n_steps) * 300 + 10,
            "ys": torch.arange(per_step) % 10}
    return CalibrationSet(data, null_label=10, guidance=True)


def calibrated(config=W4A8, seed=0):
    model = quantize_model(tiny_dit(seed), config)
    cal = calibration()
    with torch.no_grad(), observing_activations(model):
        for i in range(len(cal)):
            model(*(cal[i][k] for k in ("x", "t", "y")))
    return model, cal


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 10, 9])


def test_quantized_attention_matches_diffusers_when_bypassed_and_quantizes_operands():
    x, t, y = inputs()
    ref = tiny_dit()(x, t, y).sample
    model, _ = calibrated()
    assert sum(isinstance(m, QuantAttnProcessor) for m in model.modules()) == 2
    with quant_disabled(model):
        torch.testing.assert_close(model(x, t, y).sample, ref, rtol=1e-5, atol=1e-6)
    proc = model.transformer_blocks[0].attn1.processor
    assert float(proc.probs_quantizer.zero_point) == 0  # probabilities are >= 0: an unsigned grid from 0
    assert "attention matmuls" in str(quantization_table(model).columns[0]._cells)
    assert not torch.equal(model(x, t, y).sample, ref)


def test_capture_and_replay_reproduce_each_unit():
    model, _ = calibrated()
    x, t, y = inputs()
    names = [n for n, _ in reconstruction_units(model)]
    assert names == ["pos_embed.proj", "transformer_blocks.0", "transformer_blocks.1", "proj_out_1", "proj_out_2"]
    for _, unit in reconstruction_units(model):
        sig, rows = capture_input(lambda: model(x, t, y), unit, batch=4)
        out = run_until_output(lambda: model(x, t, y), unit)
        torch.testing.assert_close(replay(unit, sig, rows), out)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_unit_cache_in_memory_and_spilled_agree(tmp_path, budget):
    rows = {"h": torch.randn(10, 3, 2), "labels": torch.arange(10)}
    cache = UnitCache(10, budget, tmp_path / "spill")
    cache.write({k: v[:6] for k, v in rows.items()})
    cache.write({k: v[6:] for k, v in rows.items()})
    assert cache.on_disk == (budget == 0)
    idx = torch.tensor([7, 2, 9, 0])
    got = cache.batch(idx)
    assert torch.equal(got["h"], rows["h"][idx]) and torch.equal(got["labels"], rows["labels"][idx])
    cache.close()
    assert not (tmp_path / "spill").exists()


def test_unit_cache_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        UnitCache(2, 1 << 20, None).write({"h": torch.tensor([[1.0], [float("nan")]])})


def test_stages_joint_and_sequential():
    model, _ = calibrated()
    joint = plan_stages(model, ReconstructionConfig(iterations=5))
    assert [s.unit for s in joint][:2] == ["pos_embed.proj", "transformer_blocks.0"] and len(joint) == 5
    assert all(s.learn_weights and s.learn_activations and s.quantize_activations for s in joint)
    seq = plan_stages(model, ReconstructionConfig(mode="sequential", iterations=5, activation_iterations=3))
    assert len(seq) == 10 and not any(s.quantize_activations for s in seq[:5])
    assert all(not s.learn_weights and s.learn_activations and s.iterations == 3 for s in seq[5:])


def test_reconstruction_lowers_unit_loss_and_hardens_rounding():
    model, cal = calibrated()
    rec = BlockReconstructor(model, ReconstructionConfig(iterations=60, batch_size=8, warmup=0.2), cal)
    rec.run()
    assert rec.done and len(rec.summary) == 5
    blocks = [s for s in rec.summary if s["unit"].startswith("transformer_blocks")]
    assert all(s["final_loss"] < s["start_loss"] for s in blocks)  # better than round-to-nearest
    for m in quant_layers(model):
        assert m.adaround is None and m.weight_codes is not None
        spec = m.weight_quantizer.spec
        assert m.weight_codes.min() >= spec.qmin and m.weight_codes.max() <= spec.qmax
        # hardened codes stay within one grid step of round-to-nearest
        rtn = m.weight_quantizer(m.layer.weight)
        diff = (m.quantized_weight() - rtn).abs().reshape(len(rtn), -1)
        assert (diff <= m.weight_quantizer.scale.reshape(-1, 1) * 1.001).all()


def test_resume_mid_stage_equals_uninterrupted_run():
    config = ReconstructionConfig(iterations=7, batch_size=8)
    model, cal = calibrated()
    BlockReconstructor(model, config, cal).run()

    first, cal = calibrated()
    part = BlockReconstructor(first, config, cal)
    for _ in range(10):  # stops inside the second stage
        part.run_step()
    model_state = {k: v.clone() for k, v in first.state_dict().items()}
    recon_state = part.state_dict()
    assert any(k.endswith("adaround.alpha") for k in model_state)

    resumed, cal = calibrated(seed=5)  # different weights: everything must come from the saved state
    resumed.load_state_dict(model_state)
    rec = BlockReconstructor(resumed, config, cal)
    rec.load_state_dict(recon_state)
    rec.run()
    expected = model.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_save_and_reload_quantized_model(tmp_path):
    model, cal = calibrated()
    BlockReconstructor(model, ReconstructionConfig(iterations=3, batch_size=8), cal).run()
    source = DiTSource(source="tiny")
    save_quantized(model, tmp_path / "q", source, W4A8)
    fresh = quantize_model(tiny_dit(seed=3), W4A8)
    load_quantized(fresh, tmp_path / "q", source, W4A8)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y).sample, model(x, t, y).sample)
    with pytest.raises(ValueError, match="different quant"):
        load_quantized(quantize_model(tiny_dit(), QuantConfig()), tmp_path / "q", source, QuantConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(fresh, tmp_path / "nothing", source, W4A8)


def test_reconstruction_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        ReconstructionConfig(mode="both")
    with pytest.raises(ValueError, match="iterations"):
        ReconstructionConfig(iterations=0)


# ---- the CLI: kill a fit with SIGKILL part-way, resume it, compare with an uninterrupted run ----

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")


@needs_bundled
def test_sigkill_then_resume_gives_identical_parameters(tmp_path):
    calib = tmp_path / "calib"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(fit_command(tmp_path / "full", calib), check=True, env=env, capture_output=True)
    full = load_file(tmp_path / "full" / "quantized" / "model.safetensors")

    proc = subprocess.Popen(fit_command(tmp_path / "killed", calib), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while checkpointed_step(ckpt) < 40 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = checkpointed_step(ckpt)
    total = 11 * 12 + 11 * 5
    assert 40 <= step < total, "the run was not killed part-way"
    assert step % 12 != 0  # mid-unit
    assert not (tmp_path / "killed" / "quantized").exists()

    subprocess.run(fit_command(tmp_path / "killed", calib, "--ckpt_path", "last"), check=True, env=env,
                   capture_output=True)
    resumed = load_file(tmp_path / "killed" / "quantized" / "model.safetensors")
    assert resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    summary = json.loads((tmp_path / "killed" / "quantized" / "fit_summary.json").read_text())
    assert len(summary["reconstruction"]) == 22


@needs_bundled
def test_missing_ckpt_path_is_a_clear_error(tmp_path):
    out = subprocess.run(fit_command(tmp_path / "r", tmp_path / "calib", "--ckpt_path", str(tmp_path / "no.ckpt")),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "ditquant: error:" in out.stderr and "no.ckpt" in out.stderr


@needs_bundled
def test_ddp_sampling_gives_the_same_fid_as_one_process(tmp_path):
    """2 CPU processes (gloo) sample disjoint shards; torchmetrics syncs FID: same numbers, same samples."""
    def test_run(root: Path, *extra: str) -> dict:
        subprocess.run([sys.executable, "-m", "ditquant", "test", "--config", "configs/fp.yaml",
                        "--trainer.default_root_dir", str(root), "--model.sampler.num_steps", "5",
                        "--data.num_test_samples", "21", "--data.test_batch_size", "4",
                        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", *extra],
                       check=True, capture_output=True)
        return json.loads((root / "test" / "metrics.json").read_text())

    one = test_run(tmp_path / "one")
    two = test_run(tmp_path / "two", "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert two["num_samples"] == one["num_samples"] == 21
    assert two["fid_vs_data"] == pytest.approx(one["fid_vs_data"], rel=1e-4)
    a, b = (np.load(r / "test" / "samples.npz") for r in (tmp_path / "one", tmp_path / "two"))
    assert (a["arr_0"] == b["arr_0"]).all() and (a["arr_1"] == b["arr_1"]).all()
