import pytest
import torch

from ditquant.models.dit import DiTConfig, build_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.apply import quantization_table, uncalibrated_layers, weight_sqnr_db
from ditquant.quant.config import LayerOverride, QuantConfig
from ditquant.quant.modules import observing_activations, quant_disabled, quant_layers
from ditquant.quant.quantizer import UniformQuantizer, grouped, quantize_tensor
from ditquant.quant.spec import QuantSpec
from tests.tiny_models import random_dit


def grid_steps(x, q, scale):
    return ((q - x).abs() / scale).max()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("channel", None), ("group", 8)])
def test_rtn_error_within_half_step(symmetric, granularity, group):
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group)
    q = quantize_tensor(w, spec, is_weight=True)
    per = {"tensor": w.reshape(1, -1), "channel": w, "group": w.reshape(6, 4, 8)}[granularity]
    lo, hi = per.amin(-1, keepdim=True).clamp(max=0), per.amax(-1, keepdim=True).clamp(min=0)
    scale = (torch.maximum(-lo, hi) / 7) if symmetric else (hi - lo) / 15
    assert (((q.reshape(per.shape) - per).abs() / scale) <= 0.5 + 1e-5).all()
    levels = {"tensor": 1, "channel": 6, "group": 24}[granularity]
    assert len(torch.unique(q)) <= levels * 16


def test_symmetric_grid_keeps_sign_and_zero():
    w = torch.tensor([[-1.0, -0.3, 0.0, 0.2, 0.9]])
    q = quantize_tensor(w, QuantSpec(bits=4, symmetric=True, granularity="channel"), is_weight=True)
    assert q[0, 2] == 0 and (torch.sign(q) == torch.sign(w)).all()


def test_dynamic_per_token_is_batch_independent():
    spec = QuantSpec(bits=8, granularity="token", dynamic=True)
    x = torch.randn(4, 10, 16)
    q = UniformQuantizer(spec, is_weight=False)
    assert torch.equal(q(x)[:1], q(x[:1]))
    assert (q(x) - x).abs().max() < x.abs().max() / 100


def test_static_activation_range_covers_all_batches():
    q = UniformQuantizer(QuantSpec(bits=8), is_weight=False)
    assert not q.calibrated
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(2))
    q.observing = True
    q(torch.tensor([[-1.0, 2.0]]))
    q(torch.tensor([[0.5, 3.0]]))
    q.observing = False
    assert q.range_min.item() == -1.0 and q.range_max.item() == 3.0
    # Range ends are representable to within half a step (the zero point is rounded so that 0 is exact).
    step = 4.0 / 255
    assert torch.allclose(q(torch.tensor([-1.0, 3.0])), torch.tensor([-1.0, 3.0]), atol=step / 2 + 1e-6)
    assert q(torch.tensor([0.0])).item() == 0.0


def test_spec_errors():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(ValueError, match="dynamic"):
        QuantSpec(granularity="token")
    with pytest.raises(ValueError, match="unknown layer role"):  # the family's roles are known at quantize time
        quantize_model(random_dit(), QuantConfig(roles=["qkv", "attention"]))


@pytest.fixture
def tiny():
    return random_dit(std=0.05)


def test_quantize_model_roles_fp_switch_and_calibration(tiny):
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 200, 500, 999]), torch.tensor([0, 3, 10, 9])
    ref = tiny(x, t, y).sample
    config = QuantConfig(roles=["qkv", "attn_out", "fc1", "fc2"],
                         overrides=[LayerOverride(roles=["fc2"], weight=QuantSpec(bits=4, granularity="channel"))])
    quantize_model(tiny, config)
    names = [m.name for m in quant_layers(tiny)]
    assert len(names) == 2 * 6 and all("transformer_blocks" in n for n in names)
    assert {m.weight_quantizer.spec.bits for m in quant_layers(tiny) if m.name.endswith("net.2")} == {4}
    assert len(uncalibrated_layers(tiny)) == 12
    with observing_activations(tiny):
        assert torch.equal(tiny(x, t, y).sample, ref)  # observing runs the FP model
    assert uncalibrated_layers(tiny) == []
    with quant_disabled(tiny):
        assert torch.equal(tiny(x, t, y).sample, ref)
    out = tiny(x, t, y).sample
    sqnr = 10 * torch.log10(ref.square().sum() / (out - ref).square().sum())
    assert 15 < sqnr < 80 and weight_sqnr_db(tiny) > 15
    assert "fc2" in str(quantization_table(tiny).columns[0]._cells)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(tiny, config)


def test_group_size_must_divide(tiny):
    config = QuantConfig(weight=QuantSpec(bits=4, granularity="group", group_size=24), roles=["fc1"])
    with pytest.raises(ValueError, match="group size 24 does not divide in_features=32"):
        quantize_model(tiny, config)


def heavy_tailed(rows=8, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[:, 0] = 40.0  # one outlier per row
    return x


def test_percentile_clips_outliers_minmax_keeps_them():
    from ditquant.quant.observers import minmax_range, percentile_range

    x = heavy_tailed()
    lo, hi = percentile_range(x, 0.99)
    assert (hi < 5).all() and (lo > -5).all()
    assert (minmax_range(x)[1] == 40).all()


def test_mse_search_never_worse_than_minmax_and_vectorised():
    from ditquant.quant.observers import lp_search_range

    x = heavy_tailed()
    spec = QuantSpec(bits=4, granularity="channel", init="mse")

    def err(lo, hi):
        from ditquant.quant.affine import fake_quantize, qparams_from_range

        scale, zp = qparams_from_range(lo, hi, spec)
        return (fake_quantize(x, scale, zp, spec) - x).abs().pow(2.4).sum(-1)

    lo, hi = lp_search_range(x, spec)
    base = err(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
    assert (err(lo, hi) <= base + 1e-6).all() and (err(lo, hi) < base).any()
    one_row = lp_search_range(x[3:4], spec)  # rows are independent: same answer alone
    assert torch.equal(one_row[1], hi[3:4])


@pytest.mark.parametrize("init", ["percentile", "mse"])
def test_static_activation_init_from_observed_sample(init):
    spec = QuantSpec(bits=4, init=init, percentile=0.99)  # 0.2 % of the values are outliers
    q = UniformQuantizer(spec, is_weight=False)
    minmax = UniformQuantizer(QuantSpec(bits=4), is_weight=False)
    batches = [heavy_tailed(seed=s) for s in range(3)]
    for quant in (q, minmax):
        quant.observing = True
        for b in batches:
            quant(b)
        quant.observing = False
        quant.finish_observing()
    assert q.range_max.item() < minmax.range_max.item() == 40.0
    if init == "mse":  # the search minimises the L_2.4 error, so it beats min-max on that measure
        x = torch.cat(batches)
        assert (q(x) - x).abs().pow(2.4).sum() < (minmax(x) - x).abs().pow(2.4).sum()


def test_weight_init_methods(tiny):
    config = QuantConfig(weight=QuantSpec(bits=4, granularity="channel", init="mse"), roles=["fc1"])
    mse = weight_sqnr_db(quantize_model(tiny, config))
    rtn_model = build_dit(DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, input_size=8, num_classes=10))
    rtn_model.load_state_dict({k.replace(".layer.", "."): v for k, v in tiny.state_dict().items()
                               if "quantizer" not in k})
    rtn = weight_sqnr_db(quantize_model(rtn_model, QuantConfig(weight=QuantSpec(bits=4, granularity="channel"),
                                                               roles=["fc1"])))
    assert mse > rtn


def test_straight_through_gradients_reach_input_and_scale():
    from ditquant.quant.affine import fake_quantize

    spec = QuantSpec(bits=4)
    x = torch.tensor([-0.3, 0.1, 0.52, 2.0], requires_grad=True)  # 2.0 is clipped by the range below
    scale = torch.tensor(0.1, requires_grad=True)
    zero = torch.tensor(5.0)
    fake_quantize(x, scale, zero, spec).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # identity inside the range, 0 where clipped
    assert scale.grad is not None and scale.grad != 0  # LSQ-style: the step size is learnable


def test_values_on_the_grid_round_trip_exactly():
    spec = QuantSpec(bits=8, granularity="channel")
    w = torch.randn(4, 16)
    once = quantize_tensor(w, spec, is_weight=True)
    assert torch.allclose(quantize_tensor(once, spec, is_weight=True), once, atol=1e-6)


@pytest.mark.parametrize("granularity,group", [("channel", None), ("group", 8)])
def test_adaround_codes_in_a_layer(tiny, granularity, group):
    config = QuantConfig(weight=QuantSpec(bits=4, granularity=granularity, group_size=group), roles=["fc1"])
    quantize_model(tiny, config)
    layer = next(quant_layers(tiny))
    rtn = layer.quantized_weight().clone()
    layer.start_adaround()
    # the soft weight starts at h(V) = frac(W/Δ): the FP weight itself, clipped to the grid's range
    q = layer.weight_quantizer
    g = grouped(layer.layer.weight, q.spec, True)
    clipped = (torch.clamp(g / q.scale + q.zero_point, q.spec.qmin, q.spec.qmax) - q.zero_point) * q.scale
    torch.testing.assert_close(layer.quantized_weight(), clipped.reshape(rtn.shape), atol=1e-5, rtol=1e-4)
    layer.finish_adaround()
    assert layer.adaround is None and layer.weight_codes.dtype == torch.uint8
    torch.testing.assert_close(layer.quantized_weight(), rtn)  # untrained rounding hardens to round-to-nearest


def test_column_group_layout_is_the_ditas_reshape():
    """DiTAS's official weight layout: W reshaped row-major to (g, O·I/g), one range per column of that view, so a
    group holds g elements of one input column from rows r, r + O/g, …"""
    torch.manual_seed(0)
    w = torch.randn(8, 6)
    spec = QuantSpec(bits=4, granularity="column_group", group_size=4)
    view = w.reshape(4, -1)                       # the official reshape
    lo, hi = view.amin(0).clamp(max=0), view.amax(0).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = (-lo / scale).round()
    expected = ((torch.clamp((view / scale).round() + zero, 0, 15) - zero) * scale).reshape(w.shape)
    torch.testing.assert_close(quantize_tensor(w, spec, is_weight=True), expected)
    groups = grouped(w, spec, True)
    assert groups.shape == (12, 4) and torch.equal(groups[7], w[[1, 3, 5, 7], 1])  # column 1, rows 1, 1 + O/g, …
    # groups never span input columns, so a per-input-channel scaling commutes with quantization (powers of two:
    # exact in floating point)
    s = 2.0 ** torch.randint(-3, 4, (6,)).float()
    torch.testing.assert_close(quantize_tensor(w * s, spec, True), quantize_tensor(w, spec, True) * s)
    with pytest.raises(ValueError, match="does not divide the 6 output channels"):
        quantize_tensor(w.t(), spec, True)


def test_column_group_weights_through_adaround_lora_and_integer_refusal(tiny):
    from ditquant.integer.convert import to_integer_layer
    spec = QuantSpec(bits=4, granularity="column_group", group_size=8)
    dynamic = QuantSpec(bits=8, granularity="token", dynamic=True)
    quantize_model(tiny, QuantConfig(weight=spec, activation=dynamic, roles=["fc1"]))
    layer = next(quant_layers(tiny))
    rtn = layer.quantized_weight().clone()
    torch.testing.assert_close(rtn, quantize_tensor(layer.layer.weight, spec, True))
    layer.start_adaround()
    layer.finish_adaround()
    torch.testing.assert_close(layer.quantized_weight(), rtn)  # codes come back in the weight's own layout
    layer.weight_codes = None
    errors = layer.compensate_low_rank(rank=2, iterations=3)
    assert min(errors) < (rtn - layer.layer.weight).norm().item()
    with pytest.raises(ValueError, match="'column_group' weight layout .* use granularity 'channel'"):
        to_integer_layer(layer)
    with pytest.raises(ValueError, match="quant.activation.granularity 'column_group' is for weights"):
        QuantConfig(activation=QuantSpec(granularity="column_group", group_size=8))
