"""PTQ4DiT end to end: the folded, quantized model equals the online-division formulation, keeps no online division,
and the balancing callback runs exactly once per fit."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from ditquant.calibration.dataset import CalibrationSet, collate_pairs
from ditquant.cli import main as cli_main
from ditquant.methods.balancing import balancing_factors, fold_balancing
from ditquant.callbacks import MethodCallback
from ditquant.methods import SalienceBalancing, run_methods
from ditquant.models.folding import scale_input_columns
from ditquant.models.bundled import DIT_DIR
from ditquant.models.layout import BALANCED_INPUTS, VALUE_PROJECTION, transformer_blocks
from ditquant.models.loading import DiTSource, load_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations
from ditquant.quant.spec import QuantSpec
from tests.cli_helpers import small_run
from tests.tiny_models import random_dit

W4A8 = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), activation=QuantSpec(bits=8),
                   attention=QuantSpec(bits=8))


def tiny_model(seed=0):
    return random_dit(seed=seed, dtype=torch.float64)


def calibration_set(seed=1):
    g = torch.Generator().manual_seed(seed)
    data = {"xs": torch.randn(3, 8, 4, 8, 8, generator=g, dtype=torch.float64) * 2,
            "ts": torch.tensor([900, 500, 100]), "ys": torch.arange(8) % 10}
    return CalibrationSet(data, null_label=10, guidance=True)


def observe(model, cal):
    with torch.no_grad(), observing_activations(model):
        for batch in DataLoader(cal, batch_size=8, collate_fn=collate_pairs):
            model(batch["x"], batch["t"], batch["y"])


def online_balanced(model, factors):
    """The official code's formulation: weight columns multiplied by f, the input divided by f at every forward
    (for the attention output, V divided by f after its projection: the same placement as the V-row fold)."""
    for b, block in enumerate(transformer_blocks(model)):
        for name, consumers in BALANCED_INPUTS.items():
            f = factors[(b, name)]
            scale_input_columns([block.get_submodule(c) for c in consumers], f)
            if name == "attn_out":
                block.get_submodule(VALUE_PROJECTION).register_forward_hook(lambda m, a, out, f=f: out / f)
            else:
                for c in consumers:
                    block.get_submodule(c).register_forward_pre_hook(lambda m, a, f=f: (a[0] / f, *a[1:]))


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([999, 600, 250, 10]),
            torch.tensor([1, 4, 10, 7]))


@pytest.mark.parametrize("salience", ["ssc", "mid"])
def test_folded_quantized_model_equals_online_division(salience):
    cal = calibration_set()
    folded, online = tiny_model(), tiny_model()
    factors, _ = balancing_factors(folded, cal, salience=salience)
    assert any((f - 1).abs().max() > 0.5 for f in factors.values())  # the factors are far from identity
    for model in (folded, online):
        quantize_model(model, W4A8)
    fold_balancing(folded, factors)
    online_balanced(online, factors)
    for model in (folded, online):
        observe(model, cal)
    x, t, y = inputs()
    with torch.no_grad():
        out_folded, out_online = folded(x, t, y).sample, online(x, t, y).sample
    torch.testing.assert_close(out_folded, out_online, rtol=1e-9, atol=1e-9)
    plain = tiny_model()  # and balancing changed what quantization does (the test is not vacuous)
    quantize_model(plain, W4A8)
    observe(plain, cal)
    with torch.no_grad():
        assert (plain(x, t, y).sample - out_folded).abs().max() > 1e-3


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_balanced_model_runs_the_same_ops_as_the_unbalanced_one():
    """No division (or any other op) left per forward: the folded model's op trace equals the plain quantized one's."""
    cal = calibration_set()
    plain, balanced = tiny_model(), tiny_model()
    factors, _ = balancing_factors(balanced, cal)
    for model in (plain, balanced):
        quantize_model(model, W4A8)
    fold_balancing(balanced, factors)
    traces = []
    for model in (plain, balanced):
        observe(model, cal)
        # no observation hook left behind (the root keeps the timestep hooks quantize_model installs)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)
        with torch.no_grad(), OpCounter() as counter:
            model(*inputs())
        traces.append(counter.ops)
    assert traces[0] == traces[1]


def test_blocks_without_adaln_modulation_are_a_clear_error():
    model = tiny_model()
    transformer_blocks(model)[1].norm1 = torch.nn.LayerNorm(32)  # as in adaLN-single DiTs (PixArt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no adaLN-Zero modulation"):
        balancing_factors(model, calibration_set())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was changed


class FakeModule(SimpleNamespace):
    """What MethodCallback uses of the LightningModule."""

    def run_method(self, method, resume=None, save_progress=None):
        return run_methods(self.transformer, self.calibration, [method])[0]


def fake_fit(model, cal, resumed=False):
    return SimpleNamespace(ckpt_path="last.ckpt" if resumed else None), FakeModule(transformer=model, calibration=cal)


def test_callback_balances_once_and_a_resumed_fit_skips_it():
    cal, model = calibration_set(), tiny_model()
    quantize_model(model, W4A8)
    callback = MethodCallback("salience_balancing")
    trainer, module = fake_fit(model, cal)
    callback.on_train_batch_start(trainer, module, None, 0)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    assert callback.report["salience"] == "ssc" and callback.report["timesteps"] == [100, 500, 900]
    callback.on_train_batch_start(trainer, module, None, 1)  # later batches: nothing happens
    resumed = MethodCallback("salience_balancing")
    resumed.load_state_dict(callback.state_dict())
    resumed.on_train_batch_start(*fake_fit(model, cal, resumed=True), None, 0)  # resumed: already balanced
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in after_first.items())


def test_callback_refuses_a_checkpoint_calibrated_without_it():
    model = tiny_model()
    quantize_model(model, W4A8)
    with pytest.raises(ValueError, match="made without it"):
        callback = MethodCallback("salience_balancing")
        callback.on_train_batch_start(*fake_fit(model, calibration_set(), resumed=True), None, 0)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="salience must be 'ssc' or 'mid'"):
        SalienceBalancing(salience="max")
    with pytest.raises(ValueError, match="batch_size"):
        SalienceBalancing(batch_size=0)


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
def test_ptq4dit_fit_then_test_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])
    root = tmp_path / "run"
    common = small_run("configs/ptq4dit_w4a8.yaml", root, tmp_path / "calib", 20, 10,
                       "--model.reconstruction.iterations", "2")
    cli_main(["fit", *common])
    summary = json.loads((root / "quantized" / "fit_summary.json").read_text())
    balancing = summary["preprocessing"]["salience_balancing"]
    assert balancing["salience"] == "ssc" and len(balancing["timesteps"]) == 5 and len(balancing["eta"]) == 8 * 3
    # the checkpoint holds the folded weights (test must not need the calibration set to re-balance)
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    fp = load_dit(DiTSource()).transformer.state_dict()
    key = "transformer_blocks.0.norm1.linear"
    assert not torch.allclose(state[f"transformer.{key}.layer.weight"], fp[f"{key}.weight"])

    cli_main(["test", *common])
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["label"] == "W4A8" and metrics["psnr_vs_fp"] > 10
    other = tmp_path / "reloaded"
    cli_main(["test", *common, "--trainer.default_root_dir", str(other),
              "--model.load_quantized", str(root / "quantized")])
    assert json.loads((other / "test" / "metrics.json").read_text())["psnr_vs_fp"] == metrics["psnr_vs_fp"]
