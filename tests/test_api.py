"""The Python API (``import ditquant``) reproduces ``ditquant fit`` exactly, and needs no Lightning."""

import yaml
import pytest
import torch
from safetensors.torch import load_file

import ditquant as dq
from ditquant.models.bundled import DIT_DIR
from ditquant.quant.config import quant_config_from_dict
from tests.cli_helpers import run, small_run

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


@needs_bundled
def test_api_steps_reproduce_the_cli_fit_bit_for_bit(tmp_path, capsys):
    args = small_run("configs/ptq4dit_w4a8.yaml", tmp_path / "cli", tmp_path / "calib", 8, 8,
                     "--model.reconstruction.iterations", "6", "--model.reconstruction.batch_size", "8")
    run("fit", *args)
    cli = load_file(tmp_path / "cli" / "quantized" / "model.safetensors")
    capsys.readouterr()
    run("fit", *args, "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    model_cfg, data_cfg = config["model"], config["data"]

    loaded = dq.load("bundled")
    sampler = dq.SamplerConfig(**model_cfg["sampler"])
    calibration = dq.calibration_set(loaded, sampler, data_cfg["num_timesteps"], data_cfg["samples_per_timestep"],
                                     data_cfg["seed"], cache_dir=tmp_path / "calib")  # reuses the CLI's file
    quant = quant_config_from_dict(model_cfg["quant"])
    model = dq.quantize(loaded.transformer, quant)
    report = dq.balance(model, calibration, salience="ssc")
    assert report["salience"] == "ssc"
    dq.calibrate(model, calibration, batch_size=data_cfg["batch_size"])
    summary = dq.reconstruct(model, calibration, dq.ReconstructionConfig(**model_cfg["reconstruction"]))
    assert len(summary) == 11

    state = model.state_dict()
    assert state.keys() == cli.keys()
    assert all(torch.equal(state[k], cli[k]) for k in cli)

    dq.save_quantized(model, tmp_path / "api", dq.DiTSource("bundled"), quant)
    images = dq.generate(model, torch.arange(4), dq.SamplerConfig(kind="ddim", num_steps=5))
    assert images.shape == (4, 1, 28, 28) and images.abs().max() <= 1
    with dq.quant_disabled(model):
        fp = dq.generate(model, torch.arange(4), dq.SamplerConfig(kind="ddim", num_steps=5))
    assert 10 < 10 * torch.log10(4 / (images - fp).square().mean()) < 60  # W4A8 close to FP, not equal


def test_a_bad_option_from_python_is_a_user_error():
    with pytest.raises(dq.UserError, match="bits: 1 is not one of 2–8 or 16"):
        dq.QuantSpec(bits=1)
