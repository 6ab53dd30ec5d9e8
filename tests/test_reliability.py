"""Interrupted runs never pass for finished; bad input gets one line naming the option or file.

Signals are sent from the test once the run says it has reached the point to interrupt (its log line), never after
a sleep of fixed length.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ditquant.calibration.dataset import (CalibrationRecipe, check_finite_calibration, load_calibration_set,
                                          save_calibration_set)
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError
from ditquant.evaluation.sampling import check_feature_input
from ditquant.io import committed_folder, verify_folder
from ditquant.models.bundled import DIT_DIR
from ditquant.models.dit import DiTConfig
from ditquant.models.loading import DiTSource
from ditquant.models.adapters import quantize_model
from ditquant.export.calibrated import load_quantized, save_quantized
from ditquant.quant.config import QuantConfig
from tests.cli_helpers import fit_command, run, small_run
from tests.tiny_models import random_dit

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
ENV = {**os.environ, "PYTHONHASHSEED": "0"}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


def error_of(*args: str) -> str:
    """The one-line message of a command that must fail as bad input."""
    with pytest.raises(SystemExit) as info:
        run(*args)
    message = str(info.value.code)
    assert message.startswith("ditquant: error: "), message
    assert "\n" not in message, message
    return message


def signal_when(cmd: list[str], marker: str, sig: int) -> tuple[int, str]:
    """Run ``cmd``, send ``sig`` once a stderr line contains ``marker``; its exit status and whole stderr."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=300)
    return proc.returncode, "".join(lines) + rest


# ---- interruption: SIGTERM during fit and test ----

@needs_bundled
def test_sigterm_during_fit_exits_nonzero_and_resumes_bit_identically(tmp_path):
    calib = tmp_path / "calib"
    subprocess.run(fit_command(tmp_path / "full", calib), check=True, env=ENV, capture_output=True)
    full = load_file(tmp_path / "full" / "quantized" / "model.safetensors")

    cmd = fit_command(tmp_path / "stopped", calib, "--checkpoint.every_n_steps", "0")
    code, err = signal_when(cmd, "stage 3/22", signal.SIGTERM)
    assert code == 143, err
    assert "stopped by SIGTERM" in err and "--ckpt_path last" in err
    assert not (tmp_path / "stopped" / "quantized").exists()  # nothing passes for finished
    ckpt = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not ckpt["ditquant"]["progress"]["finished"]
    assert ckpt["reconstruction"]["step"] > 2 * 12  # saved on the signal, in stage 3 (no periodic saves)
    assert not list((tmp_path / "stopped").rglob("*.tmp"))

    # test and export refuse the partial checkpoint
    test_cmd = [a if a != "fit" else "test" for a in cmd]
    out = subprocess.run(test_cmd, env=ENV, capture_output=True, text=True)
    assert out.returncode == 1 and "calibration did not finish" in out.stderr and "reconstruction of" in out.stderr
    out = subprocess.run([sys.executable, "-m", "ditquant", "export", str(tmp_path / "stopped")], env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "ditquant: error:" in out.stderr

    subprocess.run(cmd + ["--ckpt_path", "last"], check=True, env=ENV, capture_output=True)
    resumed = load_file(tmp_path / "stopped" / "quantized" / "model.safetensors")
    assert resumed.keys() == full.keys()
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    summary = json.loads((tmp_path / "stopped" / "quantized" / "fit_summary.json").read_text())
    assert summary["fit_seconds"] > 0 and len(summary["reconstruction"]) == 22


@needs_bundled
def test_sigterm_during_test_leaves_no_complete_looking_metrics(tmp_path):
    root = tmp_path / "run"
    (root / "test").mkdir(parents=True)
    (root / "test" / "metrics.json").write_text('{"label": "an older result"}')
    cmd = [sys.executable, "-m", "ditquant", "test", *small_run("configs/fp.yaml", root, tmp_path / "c", 40, 10)]
    code, err = signal_when(cmd, "test: sampling", signal.SIGTERM)
    assert code == 143, err
    assert "stopped by SIGTERM" in err
    assert not (root / "test" / "metrics.json").exists()


@needs_bundled
def test_sigterm_during_the_granularity_search_stops_it_at_once(tmp_path):
    from tests.test_qdit import tiny_search_overlay

    overlay = tiny_search_overlay(tmp_path, population=4, num_samples=8, gptq=True)
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "ditquant", "fit", *small_run("configs/qdit_w4a8.yaml", root, tmp_path / "calib", 4,
                                                               4, "--config", str(overlay))]
    code, err = signal_when(cmd, "granularity search: generation 0", signal.SIGTERM)
    assert code == 143, err
    assert not (root / "quantized").exists() and not (root / "group_sizes.yaml").exists()
    resumed = subprocess.run(cmd + ["--ckpt_path", "last"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "generation 0" not in resumed.stderr  # generation 0 was saved and is not scored again
    assert (root / "quantized" / "manifest.json").is_file()


# ---- a fit that ends early, partial checkpoints, checkpoints made for another config ----

@needs_bundled
def test_max_steps_ends_fit_incomplete_and_partial_checkpoint_is_refused(tmp_path, capsys):
    root, calib = tmp_path / "run", tmp_path / "calib"
    args = small_run("configs/qdiff_w4a8.yaml", root, calib, 8, 8, "--model.reconstruction.iterations", "4",
                     "--model.reconstruction.activation_iterations", "2")
    with pytest.raises(SystemExit) as info:
        run("fit", *args, "--trainer.max_steps", "3")
    assert info.value.code == 3
    assert "stopped at fit step 3 of" in capsys.readouterr().err
    assert not (root / "quantized").exists()

    assert "calibration did not finish" in error_of("test", *args)
    assert "model.quant.weight.bits is 4 there but 8" in error_of("test", *args, "--model.quant.weight.bits", "8")
    assert "model.quant.weight.symmetric is False there but True" in error_of(
        "test", *args, "--model.quant.weight.symmetric", "true")
    assert "model.dit.use_ema" in error_of("test", *args, "--model.dit.use_ema", "false")
    retrained = tmp_path / "retrained"
    shutil.copytree(DIT_DIR, retrained)
    state = load_file(retrained / "diffusion_pytorch_model.safetensors")
    state["proj_out_2.bias"] = state["proj_out_2.bias"] + 1e-3
    save_file(state, retrained / "diffusion_pytorch_model.safetensors")
    assert "different FP weights" in error_of("test", *args, "--model.dit.source", str(retrained))

    run("test", *args, "--model.allow_partial", "true")
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert "PARTIAL" in metrics["label"] and metrics["partial"]["step"] == 3

    # the run folder holds a checkpoint: a new fit must say resume or overwrite
    assert "--ckpt_path last" in error_of("fit", *args)
    # resuming needs the options the fit was made with, calibration recipe included
    assert "model.reconstruction.iterations is 4 there but 5" in error_of(
        "fit", *args, "--ckpt_path", "last", "--model.reconstruction.iterations", "5")
    assert "data.samples_per_timestep is 4 there but 3" in error_of(
        "fit", *args, "--ckpt_path", "last", "--data.samples_per_timestep", "3")
    run("fit", *args, "--ckpt_path", "last")
    assert (root / "quantized" / "manifest.json").is_file()
    run("test", *args)
    assert "PARTIAL" not in json.loads((root / "test" / "metrics.json").read_text())["label"]
    assert "no checkpoint to resume" in error_of("fit", *small_run("configs/rtn_w8a8.yaml", tmp_path / "new", calib,
                                                                   8, 8), "--ckpt_path", "last")


@needs_bundled
def test_pickled_checkpoint_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, evil)
    args = small_run("configs/rtn_w8a8.yaml", tmp_path / "r", tmp_path / "c", 8, 8)
    assert "refused, it holds pickled code (posix.system)" in error_of("test", *args, "--ckpt_path", str(evil))
    assert "not supported" in error_of("test", *args, "--ckpt_path", str(evil), "--weights_only", "false")
    assert not marker.exists()


# ---- inputs that are not what they claim ----

@needs_bundled
@pytest.mark.parametrize("where", ["one", "all"])
def test_nan_weights_are_refused_naming_the_tensor(tmp_path, where):
    folder = tmp_path / "dit"
    shutil.copytree(DIT_DIR, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    for name in (["transformer_blocks.2.attn1.to_q.weight"] if where == "one" else list(state)):
        if state[name].is_floating_point():
            state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, weights)
    args = small_run("configs/rtn_w8a8.yaml", tmp_path / "r", tmp_path / "c", 8, 8, "--model.dit.source",
                     str(folder))
    message = error_of("fit", *args)
    assert "NaN/inf" in message and str(folder) in message
    if where == "one":
        assert "transformer_blocks.2.attn1.to_q.weight" in message
    assert "NaN/inf" in error_of("test", "--config", "configs/fp.yaml", "--model.dit.source", str(folder),
                                 "--trainer.default_root_dir", str(tmp_path / "fp"))


def test_calibration_files_carry_a_checksum_and_nan_rows_are_refused(tmp_path):
    recipe = CalibrationRecipe(model="m", sampler=SamplerConfig(num_steps=10), num_timesteps=2,
                               samples_per_timestep=3)
    data = {"xs": torch.randn(2, 3, 1, 4, 4), "ts": torch.tensor([900, 400]), "ys": torch.tensor([0, 1, 2])}
    path = tmp_path / "calib.safetensors"
    save_calibration_set(data, recipe, path)
    assert torch.equal(load_calibration_set(path, recipe)["xs"], data["xs"])

    raw = bytearray(path.read_bytes())
    raw[-40:-8] = bytes(32)  # zero a stretch of the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="does not match its checksum"):
        load_calibration_set(path, recipe)

    save_file(data, str(path), metadata={"calibration": json.dumps({"recipe": recipe.to_json()})})  # no checksum
    with pytest.raises(UserError, match="no checksum"):
        load_calibration_set(path, recipe)

    bad = dict(data, xs=data["xs"].clone())
    bad["xs"][1, 2, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"recorded step 1 \(t = 400\), trajectory 2"):
        check_finite_calibration(bad, "recording")
    save_calibration_set(bad, recipe, path)
    with pytest.raises(UserError, match="NaN or inf"):
        load_calibration_set(path, recipe)


def test_nan_activation_ranges_and_reconstruction_losses_stop_the_run():
    from ditquant.reconstruction.config import ReconstructionConfig
    from ditquant.reconstruction.reconstructor import BlockReconstructor
    from ditquant.calibration.observe import check_finite_quantizers
    from tests.test_reconstruction import calibrated

    model, cal = calibrated()
    check_finite_quantizers(model)  # finite: accepted
    name, scale = next((n, p) for n, p in model.named_parameters() if n.endswith("input_quantizer.scale"))
    with torch.no_grad():
        scale[...] = float("nan")
    with pytest.raises(UserError, match=f"activation observation: {name} is NaN/inf"):
        check_finite_quantizers(model)

    model, cal = calibrated()
    cal.xs[0, 0, 0, 0, 0] = float("nan")  # a calibration row turned NaN after observation
    with pytest.raises(UserError, match=r"reconstruction of pos_embed.proj \(stage 1 of \d+\): non-finite values"):
        BlockReconstructor(model, ReconstructionConfig(iterations=3, batch_size=24), cal).run_step()

    model, cal = calibrated()
    reconstructor = BlockReconstructor(model, ReconstructionConfig(iterations=3, batch_size=24), cal)
    reconstructor.run_step()
    with torch.no_grad():
        model.pos_embed.proj.layer.bias[0] = float("nan")  # the unit itself goes bad mid-stage
    with pytest.raises(UserError, match=r"reconstruction of pos_embed.proj \(stage 1 of \d+, iteration 1\): the loss "
                                        "is nan"):
        reconstructor.run_step()


def test_artifacts_are_committed_by_a_manifest_and_checked(tmp_path):
    model, source, quant = quantize_model(random_dit(), QuantConfig()), DiTSource(source="tiny"), QuantConfig()
    folder = save_quantized(model, tmp_path / "q", source, quant)
    fresh = quantize_model(random_dit(), quant)
    load_quantized(fresh, folder, source, quant)  # intact: accepted

    state = load_file(folder / "model.safetensors")
    state.pop(next(iter(state)))  # one tensor deleted, file rewritten
    save_file(state, folder / "model.safetensors")
    with pytest.raises(UserError, match="does not match its checksum"):
        load_quantized(fresh, folder, source, quant)

    (folder / "manifest.json").unlink()  # what a write killed before its commit leaves
    with pytest.raises(UserError, match="incomplete"):
        load_quantized(fresh, folder, source, quant)

    class Killed(Exception):
        pass

    with pytest.raises(Killed), committed_folder(tmp_path / "half", ("a",)) as half:
        (half / "a").write_text("x")
        raise Killed
    with pytest.raises(UserError, match="incomplete"):
        verify_folder(tmp_path / "half", ("a",), "test")


def test_feature_net_refuses_samples_of_another_size():
    check_feature_input("fashion-mnist", DiTConfig(8, 1, 2, input_size=28, in_channels=1, patch_size=4))
    with pytest.raises(UserError, match="28x28 images, but this model samples 32x32"):
        check_feature_input("fashion-mnist", DiTConfig(8, 1, 2, input_size=32, in_channels=1, patch_size=4))
    check_feature_input("none", DiTConfig(8, 1, 2, input_size=32, in_channels=1, patch_size=4))


@needs_bundled
def test_qdit_search_without_a_usable_feature_net_fails_before_recording(tmp_path):
    calib = tmp_path / "calib"
    message = error_of("fit", *small_run("configs/qdit_w4a8.yaml", tmp_path / "r", calib, 8, 8),
                       "--model.evaluation.fid_features", "none")
    assert "feature" in message
    assert not calib.exists() or not list(calib.iterdir())


@needs_bundled
def test_relative_paths_in_a_yaml_resolve_next_to_it(tmp_path, capsys):
    shutil.copytree(DIT_DIR, tmp_path / "models" / "dit")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "model.yaml").write_text("model:\n  dit:\n    source: ../models/dit\n")
    run("fit", "--config", str(tmp_path / "configs" / "model.yaml"), "--print_config")
    assert str(tmp_path / "configs" / "../models/dit") in capsys.readouterr().out


# ---- bad options: one line each, naming the option ----

BAD_OPTIONS = [
    (["--model.quant.weight.bits", "0"], "model.quant.weight.bits: 0 is not one of 2–8 or 16"),
    (["--model.quant.weight.bits", "1"], "model.quant.weight.bits: 1 is not one of 2–8 or 16"),
    (["--model.quant.weight.bits", "9"], "model.quant.weight.bits: 9 is not one of 2–8 or 16"),
    (["--model.quant.activation.bits", "12"], "model.quant.activation.bits: 12"),
    (["--model.quant.weight.granularity", "token"], "model.quant.weight.granularity"),
    (["--model.quant.activation.granularity", "channel"], "model.quant.activation.granularity"),
    (["--model.quant.weight.granularity", "group"], "model.quant.weight.group_size is required"),
    (["--model.quant.weight.granularity", "group", "--model.quant.weight.group_size", "0"],
     "model.quant.weight.group_size must be positive"),
    (["--model.quant.activation.granularity", "token"], "model.quant.activation.granularity 'token' needs dynamic"),
    (["--model.quant.weight.percentile", "0.2"], "model.quant.weight.percentile"),
    (["--model.quant.roles", "[qkv, nope]"], "model.quant.roles: unknown layer role(s) ['nope']"),
    (["--model.quant.layer_group_sizes", "{a: 0}"], "model.quant.layer_group_sizes"),
    (["--model.sampler.num_steps", "0"], "model.sampler"),
    (["--model.sampler.cfg_scale", "0.5"], "model.sampler.cfg_scale must be >= 1"),
    (["--model.reconstruction.iterations", "0"], "model.reconstruction.iterations must be >= 1"),
    (["--model.reconstruction.batch_size", "-4"], "model.reconstruction.batch_size must be >= 1"),
    (["--model.reconstruction.warmup", "1.5"], "model.reconstruction.warmup"),
    (["--model.dit.depth", "-1"], "model.dit.depth must be a positive integer"),
    (["--model.dit.name", "DiT-Q/9"], "model.dit"),
    (["--data.num_test_samples", "0"], "data.num_test_samples must be a positive integer, got 0"),
    (["--data.num_test_samples", "-5"], "data.num_test_samples must be a positive integer, got -5"),
    (["--data.test_batch_size", "0"], "data.test_batch_size"),
    (["--data.batch_size", "0"], "data.batch_size"),
    (["--data.samples_per_timestep", "0"], "data.num_timesteps and data.samples_per_timestep must be >= 1"),
    (["--checkpoint.every_n_steps", "-1"], "checkpoint.every_n_steps must be >= 0"),
    (["--model.quant", "null", "--model.backend", "integer"], "need model.quant"),
    (["--model.load_quantized", "a", "--model.load_integer", "b"], "exclusive"),
]


@pytest.mark.parametrize("args,expected", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_naming_it(tmp_path, args, expected):
    message = error_of("fit", "--config", "configs/rtn_w8a8.yaml", "--trainer.default_root_dir", str(tmp_path),
                       *args)
    assert expected in message


PARSE_ERRORS = [
    (["--model.quant.weight.bits", "four"], "model.quant.weight.bits: Expected a <class 'int'>. Got value: four"),
    (["--model.quant.bitz", "4"], "model.quant: Option 'bitz' is not accepted"),
    (["--model.evaluation.fid_features", "imagenet"], "model.evaluation.fid_features: Expected a typing.Literal"),
]


@pytest.mark.parametrize("args,expected", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_parser_errors_are_one_line_naming_the_option(args, expected, capsys):
    with pytest.raises(SystemExit) as info:
        run("fit", "--config", "configs/rtn_w8a8.yaml", *args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ditquant: error: ") and expected in err[0], err


def test_unusable_output_folder_is_an_error_before_any_work(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert "is a file, not a folder" in error_of("fit", "--config", "configs/rtn_w8a8.yaml",
                                                 "--trainer.default_root_dir", str(file))
    assert "data.cache_dir" in error_of("fit", "--config", "configs/rtn_w8a8.yaml", "--trainer.default_root_dir",
                                        str(tmp_path / "ok"), "--data.cache_dir", str(file / "sub"))


def test_internal_errors_keep_their_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")  # not a UserError: must not become a one-line user message

    monkeypatch.setattr("ditquant.cli.DitQuantCLI", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        run("fit", "--config", "configs/rtn_w8a8.yaml")


# ---- the console: progress without a terminal, the bar's items ----

class _Fit:
    """What the progress callbacks read of a trainer and a LightningModule mid-fit."""

    class state:
        fn = "fit"

    callback_metrics = {"loss": torch.tensor(0.25)}
    progress_bar_metrics = {"loss": 0.25, "unit": 3.0}
    loggers: list = []

    @staticmethod
    def progress() -> dict:
        return {"step": 40, "total": 100, "finished": False, "where": "fit step 40 of 100: ...",
                "short": "unit 3/11 transformer_blocks.1", "start_step": 0}


def test_progress_lines_without_a_terminal_and_the_bar_items(caplog):
    import logging

    from ditquant.console import FitProgressBar, ProgressLines

    lines = ProgressLines(every_s=0.0)
    lines.on_train_start(_Fit, _Fit)
    with caplog.at_level(logging.INFO, logger="ditquant.console"):
        lines.on_train_batch_end(_Fit, _Fit, None, None, 0)
    assert "fit step 40/100, unit 3/11 transformer_blocks.1, loss 0.25, about" in caplog.text
    items = FitProgressBar().get_metrics(_Fit, _Fit)
    assert items["step"] == "40/100" and items["at"] == "unit 3/11 transformer_blocks.1" and "unit" not in items
