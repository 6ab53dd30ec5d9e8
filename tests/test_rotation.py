"""Rotation of linear inputs (issue 16, item 1): Hadamard matrices for DiT widths, exactness of the fold, the
integer path, saved states, and clear errors for widths without a rotation."""

from __future__ import annotations

import pytest
import torch

import ditquant as dq
from ditquant.integer.convert import to_integer_layer
from ditquant.quant.hadamard import hadamard, random_orthogonal
from ditquant.quant.pieces import Rotation
from tests.tiny_models import random_dit


@pytest.mark.parametrize("n", [1, 2, 12, 36, 72, 128, 1152, 4608])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitudes(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))  # every channel spread evenly


def test_widths_without_a_hadamard_matrix_are_refused_and_random_covers_them():
    with pytest.raises(ValueError, match="no Hadamard matrix of order 18"):
        hadamard(18)
    q = random_orthogonal(18, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(18, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(18, seed=3))


def test_rotation_leaves_the_fp_function_unchanged_and_helps_outliers():
    model = random_dit(dtype=torch.float64)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([1, 9])
    before = model(x, t, y).sample
    dq.quantize(model, dq.QuantConfig(roles=["qkv", "attn_out", "fc1", "fc2"]))
    (report,) = dq.run_methods(model, None, [dq.InputRotation()])
    assert len(report["rotated"]) == 2 * 5 and report["folded"] == ["0.attn_out", "1.attn_out"]  # into V
    with dq.quant_disabled(model):
        assert torch.allclose(model(x, t, y).sample, before, atol=1e-12)  # exact up to float64 rounding
    # An input with one outlier channel: per-tensor 4-bit quantization loses the rest, rotated it does not.
    layer = model.transformer_blocks[0].ff.net[2]
    inputs = torch.randn(64, layer.layer.in_features, dtype=torch.float64)
    inputs[:, 5] *= 50
    spec = dq.QuantSpec(bits=4, granularity="token", dynamic=True)
    from ditquant.quant.quantizer import quantize_tensor

    rotated = layer.input_transforms[0](inputs)
    plain_error = (quantize_tensor(inputs, spec, False) - inputs).norm()
    rotated_error = (quantize_tensor(rotated, spec, False) - rotated).norm()  # Q orthogonal: same norm space
    assert rotated_error < 0.5 * plain_error


def test_rotated_layers_save_load_and_convert_to_integer(tmp_path):
    model = dq.quantize(random_dit(), dq.QuantConfig(roles=["fc1", "fc2"]))
    dq.run_methods(model, None, [dq.InputRotation(kind="random", seed=1)])
    dq.calibrate(model, dq.CalibrationSet({"xs": torch.randn(1, 2, 4, 8, 8), "ts": torch.tensor([500]),
                                           "ys": torch.tensor([1, 2])}, null_label=10, guidance=False))
    layer = model.transformer_blocks[0].ff.net[0].proj
    assert isinstance(layer.input_transforms[0], Rotation)
    assert layer.state_dict()["input_transforms.0.rotation"].tolist() == [1, 1]  # kind, seed: no matrix stored
    source = dq.DiTSource(source="tiny")
    config = dq.QuantConfig(roles=["fc1", "fc2"])
    dq.save_quantized(model, tmp_path / "q", source, config)
    fresh = dq.quantize(random_dit(seed=4), config)
    dq.load_quantized(fresh, tmp_path / "q", source, config)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y).sample, model(x, t, y).sample)
        h = torch.randn(2, 16, layer.layer.in_features)
        assert dq.sqnr_db(layer(h), to_integer_layer(layer)(h)) > 60


def test_rotation_comes_before_weight_fixing_methods():
    with pytest.raises(ValueError, match="input_rotation.*list input_rotation first"):
        dq.check_order([dq.GPTQ(), dq.InputRotation()])
    with pytest.raises(ValueError, match="kind must be one of"):
        dq.InputRotation(kind="fourier")


# ---- the floating-point low-rank branch (issue 16, item 2) ----

W4 = dq.QuantSpec(bits=4, symmetric=False, granularity="channel")


def test_float_low_rank_branch_beats_the_plain_quantized_weight_and_reads_the_fp_input():
    dynamic = dq.QuantSpec(bits=8, granularity="token", dynamic=True)
    model = dq.quantize(random_dit(depth=1), dq.QuantConfig(weight=W4, activation=dynamic, roles=["fc1", "fc2"]))
    (report,) = dq.run_methods(model, None, [dq.SVDQuantBranch(rank=4)])
    assert all(report["error"][n] < report["rtn_error"][n] for n in report["error"])
    layer = model.transformer_blocks[0].ff.net[2]
    branch = layer.branches[0]
    assert branch.reads == "fp" and branch.fp_left.shape == (layer.layer.out_features, 4)
    x = torch.randn(3, 5, layer.layer.in_features)
    xq = layer.input_quantizer(x)
    with torch.no_grad():
        expected = torch.nn.functional.linear(xq, layer.quantized_weight(), layer.layer.bias) + branch(x)
        assert torch.allclose(layer(x), expected, atol=1e-6)
        with dq.quant_disabled(model):  # the FP model is W itself (L·R + E = W)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.layer.weight, layer.layer.bias))
    assert report["branch_macs_per_token"] == 4 * (128 + 32) + 4 * (32 + 128)


def test_float_low_rank_branch_survives_save_load_and_integer_conversion(tmp_path):
    config = dq.QuantConfig(weight=W4, roles=["fc1", "fc2"])
    model = dq.quantize(random_dit(depth=1), config)
    dq.run_methods(model, None, [dq.InputRotation(), dq.SVDQuantBranch(rank=2)])  # rotation, then the split
    dq.calibrate(model, dq.CalibrationSet({"xs": torch.randn(1, 2, 4, 8, 8), "ts": torch.tensor([500]),
                                           "ys": torch.tensor([1, 2])}, null_label=10, guidance=False))
    source = dq.DiTSource(source="tiny")
    dq.save_quantized(model, tmp_path / "q", source, config)
    fresh = dq.quantize(random_dit(depth=1, seed=5), config)
    dq.load_quantized(fresh, tmp_path / "q", source, config)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y).sample, model(x, t, y).sample)
        layer = model.transformer_blocks[0].ff.net[2]
        h = torch.randn(2, 16, layer.layer.in_features)
        assert dq.sqnr_db(layer(h), to_integer_layer(layer)(h)) > 60


def test_bad_rank_is_refused_before_any_work():
    model = dq.quantize(random_dit(depth=1), dq.QuantConfig(weight=W4, roles=["fc1"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"SVDQuantBranch.rank \(transformer_blocks.0.ff.net.0.proj\): rank must"):
        dq.run_methods(model, None, [dq.SVDQuantBranch(rank=64)])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("n", [8, 12, 72, 1152])
def test_the_fast_hadamard_transform_equals_the_matrix(n):
    from ditquant.quant.hadamard import fast_hadamard, hadamard_factors

    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fast_hadamard(x, *hadamard_factors(n)), x @ hadamard(n), atol=1e-12)
    assert torch.allclose(Rotation.of("hadamard")(x), x @ hadamard(n), atol=1e-12)
