"""The CLI end to end on the bundled model, and every YAML under configs/ parsed."""

from pathlib import Path

import pytest
import torch

from ditquant.cli import main
from ditquant.models.bundled import DIT_DIR
from tests.cli_helpers import run, small_run


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])  # LightningCLI warns when pytest's own argv is present


CONFIGS = sorted(Path("configs").rglob("*.yaml"))
MODEL_CONFIGS = [c for c in CONFIGS if c.parent.name == "models"]
METHOD_CONFIGS = [c for c in CONFIGS if c.parent.name != "models"]
needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=str)
def test_method_configs_parse_alone_and_composed(config, capsys):
    run("fit", "--config", str(config), "--print_config")
    for model_config in MODEL_CONFIGS:
        run("fit", "--config", str(model_config), "--config", str(config), "--print_config")
    assert "quant" in capsys.readouterr().out


def test_help_lists_subcommands(capsys):
    run("--help")
    out = capsys.readouterr().out
    assert "fit" in out and "test" in out


@needs_bundled
def test_fit_then_test_on_bundled_model(tmp_path):
    root = tmp_path / "run"
    common = small_run("configs/rtn_w8a8.yaml", root, tmp_path / "calib", 20, 10)
    run("fit", *common)
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    scales = [k for k in state if k.endswith("input_quantizer.scale")]
    assert scales and all(torch.isfinite(state[k]).all() and (state[k] > 0).all() for k in scales)
    assert len(list((tmp_path / "calib").glob("calib-*.safetensors"))) == 1

    run("test", *common)
    import json

    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["label"] == "W8A8"
    assert metrics["psnr_vs_fp"] > 15  # W8A8 stays close to FP sample by sample
    assert metrics["fid_vs_data"] > 0 and "fid_vs_fp" in metrics
    assert (root / "test" / "grid.png").is_file() and (root / "test" / "samples.npz").is_file()
    assert "load_quantized" in (root / "test" / "config.yaml").read_text()

    # The saved calibrated model, reloaded without a Lightning checkpoint, samples exactly the same images.
    other = tmp_path / "reloaded"
    run("test", *common, "--trainer.default_root_dir", str(other), "--model.load_quantized", str(root / "quantized"))
    reloaded = json.loads((other / "test" / "metrics.json").read_text())
    assert reloaded["psnr_vs_fp"] == metrics["psnr_vs_fp"] and reloaded["fid_vs_data"] == metrics["fid_vs_data"]
    with pytest.raises(SystemExit, match="different quant"):
        run("test", *common, "--trainer.default_root_dir", str(other), "--model.load_quantized",
            str(root / "quantized"), "--model.quant.weight.bits", "4")


@needs_bundled
def test_fp_reference_stands_in_for_fp_sampling(tmp_path):
    import json

    import numpy as np

    read = lambda folder: json.loads((folder / "test" / "metrics.json").read_text())  # noqa: E731
    root, fp, other = tmp_path / "run", tmp_path / "fp", tmp_path / "other"
    common = small_run("configs/rtn_w8a8.yaml", root, tmp_path / "calib", 10, 10)
    run("fit", *common)
    run("test", *common)
    run("test", *small_run("configs/fp.yaml", fp, tmp_path / "calib", 10, 10))
    assert read(fp)["label"] == "FP" and read(fp)["weights"] == read(root)["weights"]

    reference = ["--model.evaluation.fp_reference", str(fp / "test")]
    elsewhere = ["--trainer.default_root_dir", str(other), "--model.load_quantized", str(root / "quantized")]
    run("test", *common, *elsewhere, *reference)
    resampled, referenced = read(root), read(other)
    assert referenced["fp_reference"] == str(fp / "test") and "fp_reference" not in resampled
    assert referenced["fid_vs_data"] == resampled["fid_vs_data"]  # the quantized samples are the same
    assert abs(referenced["psnr_vs_fp"] - resampled["psnr_vs_fp"]) < 0.05  # the FP side differs by 8-bit rounding
    with np.load(fp / "test" / "samples.npz") as a, np.load(other / "test" / "samples_fp.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])

    for bad, match in [(["--model.evaluation.seed", "1"], "not made with seed 1"),
                       (["--model.sampler.num_steps", "5"], "not made with sampler"),
                       (["--data.num_test_samples", "20"], "has 10 samples, this test draws 20")]:
        with pytest.raises(SystemExit, match=match):
            run("test", *common, *elsewhere, *reference, *bad)
    for folder, match in [(root / "test", "not made with label FP"), (tmp_path / "none", "no metrics.json")]:
        with pytest.raises(SystemExit, match=match):
            run("test", *common, *elsewhere, "--model.evaluation.fp_reference", str(folder))


@needs_bundled
def test_dit_stays_in_inference_mode_during_fit():
    from ditquant.task import DiTQuantization

    task = DiTQuantization()
    task.configure_model()
    task.train()
    assert not any(m.training for m in task.transformer.modules())  # no class-label dropout while calibrating


@needs_bundled
def test_test_without_fit_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["test", "--config", "configs/rtn_w8a8.yaml", "--trainer.default_root_dir", str(tmp_path / "none")])


def test_bad_option_is_reported():
    with pytest.raises(SystemExit, match=r"^ditquant: error: model.quant.weight.bits: 12 is not one of 2–8 or 16"):
        main(["fit", "--config", "configs/rtn_w8a8.yaml", "--model.quant.weight.bits", "12"])


def test_bad_model_source_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["fit", "--config", "configs/rtn_w8a8.yaml", "--model.dit.source", str(tmp_path / "DiT-XL-2-256x256.pt"),
              "--trainer.default_root_dir", str(tmp_path)])


def test_missing_config_file_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/nope.yaml"])
    assert "nope.yaml" in capsys.readouterr().err
