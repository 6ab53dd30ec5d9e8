"""DiTAS groundwork: training-free low-rank compensation of weight quantization, per-sample dynamic activations."""

import pytest
import torch

from ditquant.models.folding import fold_into_modulation
from ditquant.models.bundled import DIT_DIR
from ditquant.models.layout import transformer_blocks
from ditquant.models.loading import DiTSource, load_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.lora import low_rank_quantize
from ditquant.quant.modules import quant_disabled, quant_layers
from ditquant.quant.quantizer import UniformQuantizer, quantize_tensor
from ditquant.quant.spec import QuantSpec
from tests.tiny_models import random_dit

W4 = QuantSpec(bits=4, granularity="channel")
DYNAMIC_A8 = QuantSpec(bits=8, granularity="sample", dynamic=True)
BLOCK_LINEARS = QuantConfig(weight=W4, activation=DYNAMIC_A8, roles=["qkv", "attn_out", "fc1", "fc2"])


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
def test_low_rank_beats_round_to_nearest_on_every_bundled_layer():
    model = load_dit(DiTSource()).transformer
    quantize_model(model, BLOCK_LINEARS)
    layers = list(quant_layers(model))
    assert len(layers) == 8 * 6  # q, k, v, out, fc1, fc2 per block
    for layer in layers:
        w = layer.layer.weight.detach()
        rtn = torch.linalg.matrix_norm(w - quantize_tensor(w, W4, True)).item()
        errors = layer.compensate_low_rank(rank=32, iterations=10)
        with torch.no_grad():
            approx = layer.quantized_weight() + layer.branches[0].dense()
        kept = torch.linalg.matrix_norm(w - approx).item()
        assert kept == pytest.approx(min(errors), rel=1e-4)  # the best iterate is the one kept
        assert kept < rtn, layer.name


def test_quantized_weight_is_on_the_grid_of_what_was_quantized():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = UniformQuantizer(W4, True, (48, 1))

    def quantize(x):
        q.init_from(x)
        return q(x)

    r = low_rank_quantize(w, quantize, rank=8, iterations=5)
    q.init_from(r.quantized_input)
    torch.testing.assert_close(r.weight_q, q(r.quantized_input))
    assert len(r.errors) == 5 and r.errors[r.best] == min(r.errors)


def tiny_quantized(seed=0):
    return quantize_model(random_dit(depth=1, seed=seed), BLOCK_LINEARS)


def test_low_rank_layer_forward_fp_mode_and_reload():
    model = tiny_quantized()
    layer = transformer_blocks(model)[0].ff.net[2]
    layer.compensate_low_rank(rank=4, iterations=3)
    x = torch.randn(3, 5, layer.layer.in_features)
    xq = quantize_tensor(x, DYNAMIC_A8, False)
    with torch.no_grad():
        branch = layer.branches[0]
        expected = xq @ layer.quantized_weight().T + (xq @ branch.right.T) @ branch.left.T + layer.layer.bias
        torch.testing.assert_close(layer(x), expected)
        with quant_disabled(model):  # the FP model has no low-rank branch
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.layer.weight, layer.layer.bias))
        fresh = tiny_quantized()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(transformer_blocks(fresh)[0].ff.net[2](x), layer(x))


def test_bad_rank_and_late_folds_are_clear_errors():
    model = tiny_quantized()
    block = transformer_blocks(model)[0]
    with pytest.raises(ValueError, match="rank must be between 1 and min"):
        block.ff.net[2].compensate_low_rank(rank=33, iterations=1)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        block.ff.net[2].compensate_low_rank(rank=2, iterations=0)
    block.ff.net[0].proj.compensate_low_rank(rank=2, iterations=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already fixed"):
        fold_into_modulation(block, "mlp", torch.full((32,), 2.0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_per_sample_dynamic_quantization_ignores_batch_composition():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 16) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None]
    together = quantize_tensor(x, DYNAMIC_A8, False)
    for i in range(4):
        torch.testing.assert_close(quantize_tensor(x[i:i + 1], DYNAMIC_A8, False), together[i:i + 1])
    per_tensor = quantize_tensor(x, QuantSpec(bits=8, dynamic=True), False)
    assert not torch.allclose(per_tensor[2:3], quantize_tensor(x[2:3], QuantSpec(bits=8, dynamic=True), False))


def test_sample_granularity_needs_dynamic_activations():
    with pytest.raises(ValueError, match="'sample' needs dynamic"):
        QuantSpec(bits=8, granularity="sample")
    with pytest.raises(ValueError, match="is for activations"):
        QuantConfig(weight=QuantSpec(bits=4, granularity="sample", dynamic=True))


def test_low_rank_method_works_while_quantizers_are_bypassed():
    """Methods with FP statistics run with the quantizers bypassed: LoRA must still quantize."""
    from ditquant.methods import LowRankCompensation, run_methods

    model = tiny_quantized()
    assert LowRankCompensation.fp_statistics
    report = run_methods(model, None, [LowRankCompensation(rank=4, iterations=3)])[0]
    assert set(report["error"]) == {m.name for m in quant_layers(model)}
    assert all(0 < report["error"][n] < report["rtn_error"][n] for n in report["error"])
    with pytest.raises(ValueError, match="rank must be between 1 and min"):
        LowRankCompensation(rank=64).apply(tiny_quantized(), None)
