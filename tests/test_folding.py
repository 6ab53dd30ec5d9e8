"""The re-parameterizations are exact: a block's outputs do not change when a factor is folded."""

import dataclasses

import pytest
import torch

from ditquant.models.folding import fold_into_modulation, fold_into_value
from ditquant.models.bundled import DIT_DIR
from ditquant.models.dit import DiTConfig, build_dit
from ditquant.models.layout import transformer_blocks
from ditquant.models.loading import DiTSource, load_dit


def fold_everything(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for block in transformer_blocks(model):
        c = block.norm1.linear.out_features // 6
        for branch in ("attention", "mlp"):
            fold_into_modulation(block, branch, torch.exp(torch.randn(c, generator=g)))
        fold_into_value(block, torch.exp(torch.randn(c, generator=g)))


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
def test_folding_keeps_the_bundled_model_outputs():
    model = load_dit(DiTSource()).transformer.eval()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(6, 1, 28, 28, generator=g), torch.tensor([0, 100, 300, 500, 800, 999]), torch.arange(6)
    with torch.no_grad():
        ref = model(x, t, y).sample
        fold_everything(model)
        torch.testing.assert_close(model(x, t, y).sample, ref, rtol=1e-4, atol=1e-5)


def test_folding_keeps_a_dit_xl_block_output():
    torch.manual_seed(0)
    config = dataclasses.replace(DiTConfig.named("DiT-XL/2", 32), depth=1)  # one XL block suffices
    model = build_dit(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        block = transformer_blocks(model)[0]
        h = torch.randn(2, 256, config.hidden_size)
        kwargs = dict(timestep=torch.tensor([10, 700]), class_labels=torch.tensor([3, 1000]))
        ref = block(h, **kwargs)
        fold_everything(model, seed=3)
        torch.testing.assert_close(block(h, **kwargs), ref, rtol=1e-4, atol=1e-5)


def test_bad_factor_is_a_clear_error():
    model = build_dit(DiTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=2, input_size=8, num_classes=10))
    block = transformer_blocks(model)[0]
    with pytest.raises(ValueError, match="32 finite positive"):
        fold_into_value(block, torch.zeros(32))
    with pytest.raises(ValueError, match="32 finite positive"):
        fold_into_modulation(block, "mlp", torch.ones(16))


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
@pytest.mark.parametrize("salience", ["ssc", "mid"])
def test_balancing_the_bundled_model_keeps_its_function_and_balances_salience(salience):
    from ditquant.calibration.dataset import CalibrationSet
    from ditquant.methods.balancing import balance_model, salience_per_timestep
    from ditquant.methods.salience import weight_salience

    model = load_dit(DiTSource()).transformer.eval()
    g = torch.Generator().manual_seed(0)
    cal = CalibrationSet({"xs": torch.randn(3, 4, 1, 28, 28, generator=g), "ts": torch.tensor([900, 500, 100]),
                          "ys": torch.arange(4)}, null_label=10, guidance=True)
    x, t, y = torch.randn(6, 1, 28, 28, generator=g), torch.tensor([0, 100, 300, 500, 800, 999]), torch.arange(6)
    with torch.no_grad():
        ref = model(x, t, y).sample
        report = balance_model(model, cal, salience=salience)
        torch.testing.assert_close(model(x, t, y).sample, ref, rtol=1e-4, atol=1e-5)
    assert report["timesteps"] == [100, 500, 900]
    if salience == "ssc":
        assert all(abs(sum(eta) - 1) < 1e-6 for eta in report["eta"].values())
    # after balancing, fc1's input and weight salience meet where they were balanced (mid: exactly at that timestep)
    _, per_t = salience_per_timestep(model, cal)
    fc1 = transformer_blocks(model)[0].ff.net[0].proj
    if salience == "mid":
        torch.testing.assert_close(per_t[(0, "mlp")][1], weight_salience([fc1.weight]), rtol=1e-3, atol=1e-6)
