"""Methods are registered transforms: a fourth method defined here alone runs from YAML and from Python, and the
order between methods is checked before any work."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

import ditquant as dq
from ditquant.models.bundled import DIT_DIR
from tests.cli_helpers import run
from tests.config_runs import SMALL
from tests.tiny_models import random_dit

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")


@dq.register
@dataclass
class MLPInputScaling(dq.Method):
    """A toy fourth method: divide every block's MLP input by ``factor`` per channel (channel j by
    factor^(j mod 2)) and multiply fc1's columns by it, the division folded exactly into the adaLN modulation
    through the adapter's fold points. The FP function is unchanged."""

    name: ClassVar[str] = "test_mlp_input_scaling"
    changes: ClassVar[frozenset] = frozenset({"fp_weights"})
    fp_statistics: ClassVar[bool] = True
    factor: float = 2.0

    def __post_init__(self):
        if self.factor <= 0:
            raise dq.UserError(f"MLPInputScaling.factor must be positive, got {self.factor}")

    def apply(self, model, calibration, ctx) -> dict:
        folded = 0
        for point in dq.adapter_for(model).rescalable_inputs(model):
            if point.role == "fc1":
                width = point.consumers[0].layer.weight.shape[1]
                s = self.factor ** (torch.arange(width) % 2).to(point.consumers[0].layer.weight.dtype)
                point.rescale(s)
                folded += 1
        return {"folded": folded}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


def test_a_method_defined_in_a_test_file_runs_from_python():
    model = random_dit(dtype=torch.float64)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 900]), torch.tensor([1, 3])
    before = model(x, t, y).sample
    dq.quantize(model, dq.QuantConfig())
    fc1 = model.transformer_blocks[0].ff.net[0].proj.layer.weight.clone()
    (report,) = dq.run_methods(model, None, [MLPInputScaling(factor=4.0)])
    assert report["folded"] == len(model.transformer_blocks)
    assert torch.equal(model.transformer_blocks[0].ff.net[0].proj.layer.weight[:, 1], fc1[:, 1] * 4)
    with dq.quant_disabled(model):
        assert torch.allclose(model(x, t, y).sample, before, atol=1e-12)  # an exact fold


@needs_bundled
def test_a_method_defined_in_a_test_file_runs_from_yaml(tmp_path):
    calib = tmp_path / "calib"
    overlay = tmp_path / "toy.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: ditquant.MethodCallback\n"
                       "      init_args: {method: test_mlp_input_scaling, options: {factor: 4.0}}\n")
    runs = {}
    for name, extra in [("plain", []), ("toy", ["--config", str(overlay)])]:
        root = tmp_path / name
        run("fit", "--config", "configs/rtn_w8a8.yaml", *extra, "--trainer.default_root_dir", str(root),
            "--data.cache_dir", str(calib), *SMALL)
        runs[name] = load_file(root / "quantized" / "model.safetensors")
        summary = json.loads((root / "quantized" / "fit_summary.json").read_text())
        assert ("test_mlp_input_scaling" in summary["preprocessing"]) == (name == "toy")
    key = "transformer_blocks.0.ff.net.0.proj.layer.weight"
    assert torch.equal(runs["toy"][key][:, 1], runs["plain"][key][:, 1] * 4)
    # The import path of a Method subclass works as well as its registered name.
    with pytest.raises(SystemExit, match="factor must be positive"):
        run("fit", "--config", "configs/rtn_w8a8.yaml", "--trainer.default_root_dir", str(tmp_path / "bad"),
            "--trainer.callbacks+=ditquant.MethodCallback",
            "--trainer.callbacks.method=tests.test_methods.MLPInputScaling",
            "--trainer.callbacks.options={factor: -1}")


def test_method_order_is_checked_before_any_work():
    with pytest.raises(ValueError, match=r"method 1 \(salience_balancing\) changes the fp weights, but method 0 "
                                         r"\(gptq\) has already fixed the quantized weights"):
        dq.check_order([dq.GPTQ(), dq.SalienceBalancing()])
    with pytest.raises(ValueError, match="both fix the quantized weights"):
        dq.check_order([dq.LowRankCompensation(), dq.GPTQ()])
    with pytest.raises(ValueError, match="granularity_search.*list granularity_search first"):
        dq.check_order([dq.GPTQ(), dq.GranularitySearch()])
    dq.check_order([dq.TemporalSmoothing(), dq.LowRankCompensation()])  # DiTAS's order
    dq.check_order([dq.GranularitySearch(), dq.GPTQ()])                  # Q-DiT's


@needs_bundled
@pytest.mark.parametrize("callbacks, message", [
    ("[{class_path: ditquant.MethodCallback, init_args: {method: gptq}}, "
     "{class_path: ditquant.MethodCallback, init_args: {method: salience_balancing}}]",
     r"trainer.callbacks\[1\] \(salience_balancing\) changes the fp weights, but trainer.callbacks\[0\] \(gptq\)"),
    ("[{class_path: ditquant.MethodCallback, init_args: {method: balance}}]",
     r"trainer.callbacks\[0\].init_args.method: no method 'balance'; registered methods: gptq, granularity_search"),
    ("[{class_path: ditquant.MethodCallback, init_args: {method: gptq, options: {block_size: 64}}}]",
     r"trainer.callbacks\[0\].init_args.options: unknown option\(s\) block_size; GPTQ takes blocksize, damping"),
    ("[{class_path: ditquant.MethodCallback, init_args: {method: low_rank_compensation, options: {iterations: 0}}}]",
     r"trainer.callbacks\[0\].init_args.options.iterations must be >= 1"),
    ("[{class_path: ditquant.methods.callbacks.GPTQ}]",
     r"ditquant.methods.callbacks.GPTQ is gone: methods now run through one callback, .*method: gptq"),
])
def test_bad_method_lists_are_one_line_errors(tmp_path, capsys, callbacks, message):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(f"trainer:\n  callbacks: {callbacks}\n")
    with pytest.raises(SystemExit) as stopped:  # the message is the exit's, or on stderr for parser errors
        run("fit", "--config", "configs/rtn_w8a8.yaml", "--config", str(overlay), "--trainer.default_root_dir",
            str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "calib"), *SMALL)
    error = f"{stopped.value.code}\n{capsys.readouterr().err}"
    assert re.search(message, error) and "Traceback" not in error
    assert not (tmp_path / "calib").exists()  # refused before any recording
