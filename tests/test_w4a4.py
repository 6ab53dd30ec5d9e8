"""W4A4 pieces (issue 16): timestep-aware activation ranges, mixed precision under a budget, and the integer path at
4-bit activations."""

from __future__ import annotations

import pytest
import torch

import ditquant as dq
from ditquant.integer.convert import to_integer
from ditquant.quant.modules import quant_layers
from ditquant.quant.quantizer import UniformQuantizer, quantize_tensor
from ditquant.quant.timesteps import group_edges, timesteps
from tests.tiny_models import random_dit

A4_STEPS = dq.QuantSpec(bits=4, granularity="tensor", timestep_groups=2)


def calibration(num_timesteps: int = 4, seed: int = 0) -> dq.CalibrationSet:
    gen = torch.Generator().manual_seed(seed)
    return dq.CalibrationSet({"xs": torch.randn(num_timesteps, 2, 4, 8, 8, generator=gen),
                              "ts": torch.linspace(50, 950, num_timesteps).round().long(),
                              "ys": torch.tensor([1, 2])}, null_label=10, guidance=False)


# ---- timestep-aware activation ranges (item 3) ----

def test_timestep_groups_split_the_calibration_timesteps_evenly():
    members, edges = group_edges(torch.tensor([900, 0, 100, 300, 200, 500, 700, 800, 600, 400, 100]), 3)
    assert [m.tolist() for m in members] == [[0, 100, 200], [300, 400, 500, 600], [700, 800, 900]]
    assert edges.tolist() == [250, 650]
    with pytest.raises(ValueError, match="3 groups, but the calibration set has only 2 distinct timesteps"):
        group_edges(torch.tensor([1, 2, 2]), 3)


def test_each_sample_is_quantized_with_the_range_of_its_timestep_group():
    q = UniformQuantizer(A4_STEPS, is_weight=False, scale_shape=(2, 1))
    q.observing = True
    quiet, loud = torch.randn(2, 5, 8), 10 * torch.randn(2, 5, 8)
    with timesteps(torch.tensor([100, 200])):
        q(quiet)
    with timesteps(torch.tensor([800, 900])):
        q(loud)
    q.observing = False
    q.finish_observing()
    assert q.timestep_edges.tolist() == [500]
    assert torch.equal(q.range_max[0, 0], quiet.max()) and torch.equal(q.range_max[1, 0], loud.max())
    x = torch.randn(2, 5, 8)
    with timesteps(torch.tensor([150, 850])):  # one sample in each group
        out = q(x)
    for i in range(2):
        expected = quantize_tensor(x[i:i + 1], A4_STEPS, False, q.scale[i], q.zero_point[i])
        assert torch.equal(out[i:i + 1], expected)
    with pytest.raises(RuntimeError, match="outside a model forward"):
        q(x)


def test_timestep_ranges_through_model_reconstruction_and_integer_layers(tmp_path):
    config = dq.QuantConfig(weight=dq.QuantSpec(bits=4, granularity="channel"), activation=A4_STEPS,
                            roles=["qkv", "attn_out", "fc1", "fc2"])
    model = dq.quantize(random_dit(), config)
    calib = calibration()
    dq.calibrate(model, calib)
    layer = model.transformer_blocks[0].ff.net[2]
    assert layer.input_quantizer.timestep_edges.tolist() == [500]  # 4 timesteps -> 2 groups
    assert layer.input_quantizer.scale.shape == (2, 1)
    assert "×2 timestep groups" in layer.extra_repr()
    dq.reconstruct(model, calib, dq.ReconstructionConfig(mode="joint", iterations=2, batch_size=2))
    source = dq.DiTSource(source="tiny")
    dq.save_quantized(model, tmp_path / "q", source, config)
    fresh = dq.quantize(random_dit(seed=3), config)
    dq.load_quantized(fresh, tmp_path / "q", source, config)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([30, 900]), torch.tensor([1, 9])
    with torch.no_grad():
        out = model(x, t, y).sample
        assert torch.equal(fresh(x, t, y).sample, out)
        assert min(dq.block_sqnr(model, to_integer(model), x, t, y)) > 40
        # the groups matter: the same inputs with both samples in group 0 give another output
        assert not torch.equal(model(x, torch.tensor([30, 30]), y).sample[1], out[1])


def test_timestep_groups_are_refused_where_they_mean_nothing():
    with pytest.raises(ValueError, match="needs a static per-tensor range"):
        dq.QuantSpec(bits=4, granularity="token", dynamic=True, timestep_groups=2)
    with pytest.raises(ValueError, match="quant.weight.timestep_groups"):
        dq.QuantConfig(weight=dq.QuantSpec(bits=4, timestep_groups=2))
    model = dq.quantize(random_dit(), dq.QuantConfig(activation=dq.QuantSpec(bits=4, timestep_groups=8),
                                                     roles=["fc1"]))
    with pytest.raises(ValueError, match="8 groups, but the calibration set has only 4 distinct timesteps"):
        dq.calibrate(model, calibration())


# ---- mixed precision under a budget (item 4) ----

A4 = dq.QuantSpec(bits=4, granularity="token", dynamic=True)


def test_mixed_precision_keeps_the_most_sensitive_inputs_at_8_bits_within_the_budget(tmp_path):
    config = dq.QuantConfig(weight=dq.QuantSpec(bits=4, granularity="channel"), activation=A4,
                            roles=["qkv", "attn_out", "fc1", "fc2"])
    model = dq.quantize(random_dit(), config)
    adopted = {}
    ctx = dq.MethodContext(quant=config, set_quant=lambda q: adopted.setdefault("quant", q), output_dir=tmp_path,
                           batch_size=2)
    (report,) = dq.run_methods(model, calibration(), [dq.MixedPrecision(budget=5.0, num_batches=2)], ctx)
    from ditquant.methods.mixed_precision import average_bits, layer_cost

    layers = {q.name: q for q in quant_layers(model)}
    costs = {n: layer_cost(q) for n, q in layers.items()}
    bits = {n: q.input_quantizer.spec.bits for n, q in layers.items()}
    assert report["promoted"] and set(report["promoted"]) == {n for n, b in bits.items() if b == 8}
    assert average_bits(bits, costs) == pytest.approx(report["average_bits"]) and report["average_bits"] <= 5.0
    # greedy: the most sensitive input per bit-MAC is among the promoted
    best = max(report["sensitivity"], key=lambda n: report["sensitivity"][n] / costs[n])
    assert best in report["promoted"]
    assert adopted["quant"].layer_activation_bits == report["promoted"]
    saved = (tmp_path / "activation_bits.yaml").read_text()
    assert f"layer_activation_bits:\n      {next(iter(report['promoted']))}: 8" in saved
    # the result loads as a config: the same layout, and the method then skips its search
    again = dq.quantize(random_dit(), adopted["quant"])
    assert {q.name: q.input_quantizer.spec.bits for q in quant_layers(again)} == bits
    skipped = dq.run_methods(again, calibration(), [dq.MixedPrecision()], dq.MethodContext(quant=adopted["quant"]))
    assert "skipped" in skipped[0]


def test_mixed_precision_budget_outside_the_possible_range_is_refused_before_any_work():
    config = dq.QuantConfig(activation=A4, roles=["fc1", "fc2"])
    model = dq.quantize(random_dit(), config)
    for budget in (3.5, 8.5):
        with pytest.raises(ValueError, match=rf"MixedPrecision.budget: {budget} average activation bits is outside "
                                             r"what this model can have: 4 .* to 8"):
            dq.run_methods(model, calibration(), [dq.MixedPrecision(budget=budget)], dq.MethodContext(quant=config))
    with pytest.raises(ValueError, match="mixed_precision.*list mixed_precision first"):
        dq.check_order([dq.GPTQ(), dq.MixedPrecision()])


# ---- the integer path at 4-bit activations (item 6) ----

@pytest.mark.parametrize("activation", [A4, A4_STEPS, dq.QuantSpec(bits=4, granularity="group", group_size=16,
                                                                   dynamic=True)], ids=["token", "steps", "group"])
def test_integer_model_agrees_with_the_simulated_one_at_w4a4(activation, tmp_path):
    """Rotated inputs (online and folded), the FP low-rank branch, 8-bit promoted layers: every block of the integer
    model reproduces the simulated one."""
    weight = dq.QuantSpec(bits=4, granularity="group" if activation.granularity == "group" else "channel",
                          group_size=activation.group_size)
    config = dq.QuantConfig(weight=weight, activation=activation, roles=["qkv", "attn_out", "fc1", "fc2"])
    model = dq.quantize(random_dit(), config)
    calib = calibration()
    ctx = dq.MethodContext(quant=config, set_quant=lambda q: None, output_dir=tmp_path, batch_size=2)
    dq.run_methods(model, calib, [dq.InputRotation(), dq.MixedPrecision(budget=4.5), dq.SVDQuantBranch(rank=2)], ctx)
    dq.calibrate(model, calib)
    assert {q.input_quantizer.spec.bits for q in quant_layers(model)} == {4, 8}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([30, 900]), torch.tensor([1, 9])
    with torch.no_grad():
        integer = to_integer(model)
        assert min(dq.block_sqnr(model, integer, x, t, y)) > 40
        assert dq.sqnr_db(model(x, t, y).sample, integer(x, t, y).sample) > 30
