"""DiTAS groundwork: TAS statistics, the α grid search's scores, and exact smoothing folds (fc2 on the fly)."""

import pytest
import torch
from torch.utils.data import DataLoader

from ditquant.calibration.dataset import CalibrationSet, collate_pairs
from ditquant.methods.salience import balancing_factor, weight_salience
from ditquant.methods.smoothing import (ALPHA_GRID, alpha_losses, check_alphas, fold_smoothing, smoothing_factor,
                                        temporal_max)
from ditquant.models.layout import transformer_blocks
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import quant_disabled
from ditquant.quant.quantizer import quantize_tensor
from ditquant.quant.spec import QuantSpec
from tests.tiny_models import random_dit

W4 = QuantSpec(bits=4, granularity="channel")
A8 = QuantSpec(bits=8, granularity="sample", dynamic=True)


def tiny_model():
    return random_dit()


def calibration():
    g = torch.Generator().manual_seed(1)
    return CalibrationSet({"xs": torch.randn(3, 4, 4, 8, 8, generator=g), "ts": torch.tensor([900, 500, 100]),
                           "ys": torch.arange(4)}, null_label=10, guidance=True)


def test_half_is_ptq4dit_balancing_and_the_ends_are_pure():
    a, w = torch.tensor([4.0, 0.5, 9.0]), torch.tensor([0.25, 2.0, 1.0])
    torch.testing.assert_close(smoothing_factor(a, w, 0.5), balancing_factor(a, w))
    torch.testing.assert_close(smoothing_factor(a, w, 1.0), a)
    torch.testing.assert_close(smoothing_factor(a, w, 0.0), 1 / w)


def test_alpha_scores_match_a_direct_computation():
    model, cal = tiny_model(), calibration()
    act_max = temporal_max(model, cal, batch_size=5)  # the same batches as below: GEMM results depend on batch shape
    assert set(act_max) == {(b, n) for b in range(2) for n in ("attention", "attn_out", "mlp", "fc2")}
    losses = alpha_losses(model, cal, act_max, W4, A8, alphas=[0.0, 0.5, 1.0], batch_size=5)
    # fc2 of block 1, by hand: capture its inputs, score each α
    fc2 = transformer_blocks(model)[1].ff.net[2]
    seen = []
    handle = fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for batch in DataLoader(cal, batch_size=5, collate_fn=collate_pairs):
            model(batch["x"], batch["t"], batch["y"])
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(act_max[(1, "fc2")], x.abs().amax(dim=(0, 1)))
    w = fc2.weight.detach()
    for i, alpha in enumerate([0.0, 0.5, 1.0]):
        s = smoothing_factor(act_max[(1, "fc2")], weight_salience([w]), alpha)
        y = quantize_tensor(x / s, A8, False) @ quantize_tensor(w * s, W4, True).T
        expected = (y - x @ w.T).double().pow(2).mean()
        torch.testing.assert_close(losses[(1, "fc2")][i], expected, rtol=1e-4, atol=0)


def test_smoothing_keeps_the_fp_function_and_fc2_divides_on_the_fly():
    model, cal = tiny_model().double(), calibration()  # float64: exactness, not float32 rounding, is under test
    cal.xs = cal.xs.double()
    g = torch.Generator().manual_seed(2)
    x, t, y = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([999, 600, 250, 10]),
               torch.tensor([1, 4, 10, 7]))
    with torch.no_grad():
        ref = model(x, t, y).sample
    quantize_model(model, QuantConfig(weight=W4, activation=A8, roles=["qkv", "attn_out", "fc1", "fc2"]))
    act_max = temporal_max(model, cal, batch_size=5)  # the same batches as below: GEMM results depend on batch shape
    factors = {k: smoothing_factor(a, torch.ones_like(a), 0.7) for k, a in act_max.items()}
    fold_smoothing(model, factors)
    with torch.no_grad(), quant_disabled(model):
        torch.testing.assert_close(model(x, t, y).sample, ref, rtol=1e-9, atol=1e-9)
    fc2 = transformer_blocks(model)[0].ff.net[2]
    torch.testing.assert_close(fc2.input_transforms[0].divisor, factors[(0, "fc2")])
    fresh = tiny_model().double()
    quantize_model(fresh, QuantConfig(weight=W4, activation=A8, roles=["qkv", "attn_out", "fc1", "fc2"]))
    fresh.load_state_dict(model.state_dict())  # the divisor travels in the state
    torch.testing.assert_close(transformer_blocks(fresh)[0].ff.net[2].input_transforms[0].divisor, fc2.input_transforms[0].divisor)


def test_alpha_grid_must_lie_in_the_unit_interval():
    assert check_alphas(ALPHA_GRID)[-1] == 1.0 and len(ALPHA_GRID) == 21
    for bad in ([], [0.5, 1.2], [-0.1]):
        with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
            check_alphas(bad)
