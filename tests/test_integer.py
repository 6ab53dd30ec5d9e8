"""Integer inference: int4 packing, IntLinear vs the fake-quantized layer it replaces, export / load, the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.integer.agreement import block_sqnr, reordered_sums, sqnr_db
from ditquant.integer.convert import FusedGELU, to_integer, to_integer_layer
from ditquant.export.integer import load_integer, save_integer
from ditquant.integer.linear import IntLinear
from ditquant.integer.packing import pack_int4, unpack_int4
from ditquant.models.bundled import DIT_DIR
from ditquant.models.loading import DiTSource, load_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations, quant_layers
from ditquant.quant.spec import QuantSpec
from tests.cli_helpers import run, small_run
from tests.tiny_models import random_dit, tiny_config

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")
BLOCK_LINEARS = ["qkv", "attn_out", "fc1", "fc2"]
ALL_BUT_CONV = ["timestep_mlp", "adaln", *BLOCK_LINEARS, "final_adaln", "final_linear"]


def spec(bits, granularity="tensor", symmetric=False, dynamic=False, group=None):
    return QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, dynamic=dynamic, group_size=group)


SETTINGS = {  # name: QuantConfig; every one must run as integers and agree with its fake-quantized model
    "W8A8 static per-tensor, attention quantized": QuantConfig(
        weight=spec(8, "channel"), activation=spec(8), attention=spec(8)),
    "W4A8 static per-tensor": QuantConfig(weight=spec(4, "channel"), activation=spec(8)),
    "W8A8 symmetric": QuantConfig(weight=spec(8, "channel", True), activation=spec(8, symmetric=True)),
    "W6A6": QuantConfig(weight=spec(6, "channel"), activation=spec(6)),
    "W4A8 dynamic per token": QuantConfig(weight=spec(4, "channel"), activation=spec(8, "token", dynamic=True),
                                          roles=ALL_BUT_CONV),
    "W4A8 dynamic per sample": QuantConfig(weight=spec(4, "channel"), activation=spec(8, "sample", dynamic=True),
                                           roles=BLOCK_LINEARS),
    "W4A8 group 16 (weights and dynamic activations)": QuantConfig(
        weight=spec(4, "group", group=16), activation=spec(8, "group", dynamic=True, group=16), roles=BLOCK_LINEARS),
    "W8A8 weight groups 16, activations per token": QuantConfig(
        weight=spec(8, "group", group=16), activation=spec(8, "token", dynamic=True), roles=BLOCK_LINEARS),
    "W4 weight-only": QuantConfig(weight=spec(4, "channel"), activation=spec(16), roles=BLOCK_LINEARS),
}


@pytest.fixture(params=["W4A8 dynamic per sample", "W4 weight-only"])
def extras_setting(request):
    return request.param


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


def calibrated(config: QuantConfig, seed: int = 0) -> torch.nn.Module:
    model = quantize_model(random_dit(seed=seed), config)
    with torch.no_grad(), observing_activations(model):
        model(*batch(8, seed=1))
    return model


def test_int4_packing_round_trip_and_bad_input():
    codes = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[:, :3])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(codes - 1)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_integer_model_matches_fake_quantization(name):
    model = calibrated(SETTINGS[name])
    integer = to_integer(model)
    assert not any(True for _ in quant_layers(integer)) and any(isinstance(m, IntLinear) for m in integer.modules())
    assert any(True for _ in quant_layers(model))  # the source model is untouched
    x, t, y = batch()
    with torch.no_grad():
        ref, out = model(x, t, y).sample, integer(x, t, y).sample
        assert sqnr_db(ref, out) > 90  # same codes, float summation order only (measured ≈ 135 dB)
        for q in quant_layers(model):  # layer by layer, on inputs of each layer's own width
            layer = integer.get_submodule(q.name)
            inp = torch.randn(3, 5, layer.in_features) if layer.patch is None else torch.randn(2, 4, 8, 8)
            expected = q(inp) if layer.gelu is None else F.gelu(q(inp), approximate=layer.gelu)  # fuse_gelu
            assert sqnr_db(expected, layer(inp)) > 90, q.name


def test_reordered_sums_round_differently_and_restore():
    """The agreement yardstick: the fake-quantized model with its sums in another order computes the same function,
    rounded differently, and only while inside the context."""
    model = calibrated(SETTINGS["W4A8 static per-tensor"])
    x, t, y = batch()
    with torch.no_grad():
        reference = model(x, t, y).sample
        with reordered_sums(seed=1):
            reordered = model(x, t, y).sample
        assert torch.equal(model(x, t, y).sample, reference)
    assert not torch.equal(reordered, reference) and sqnr_db(reference, reordered) > 60


def test_fused_input_quantization_gives_the_eager_codes():
    """The compiled one-kernel quantization (the default outside the test suite) against the eager arithmetic, for
    every scale layout the integer layers use, on values that include exact rounding ties."""
    from ditquant.integer.linear import _eager_codes, input_codes, run_options

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 16, generator=g) * 3
    x[0, 0] = (torch.arange(16) - 8 + 0.5) * 0.05  # ties: round half to even in both
    layouts = {"tensor": (torch.tensor(0.05), torch.tensor(3.0)),
               "token": (x.abs().amax((1, 2), keepdim=True) / 127, torch.zeros(64, 1, 1)),
               "group": (x.abs().amax(-1, keepdim=True) / 7, torch.full((64, 4, 1), 8.0))}
    for name, (scale, zero) in layouts.items():
        for lo, hi in ((-128, 127), (0, 15)):
            with run_options(fused_quantization=True):
                fused = input_codes(x, scale, zero, lo, hi)
            assert torch.equal(fused, _eager_codes(x, scale, zero, lo, hi)), (name, lo, hi)
    model = calibrated(SETTINGS["W4A8 group 16 (weights and dynamic activations)"])
    integer = to_integer(model)
    with torch.no_grad(), run_options(fused_quantization=True):
        fused = integer(*batch()).sample
    with torch.no_grad(), run_options(fused_quantization=False):
        assert torch.equal(fused, integer(*batch()).sample)


def test_int4_weights_unpacked_once_and_float_parts_in_bf16():
    from ditquant.integer.linear import run_options

    integer = to_integer(calibrated(SETTINGS["W4A8 static per-tensor"]))
    fc1 = integer.transformer_blocks[0].ff.net[0].proj
    with run_options(keep_unpacked=True):
        first = fc1.integer_weight()
        assert fc1.integer_weight() is first  # kept
        with torch.no_grad():
            kept = integer(*batch()).sample
    with run_options(keep_unpacked=False), torch.no_grad():
        assert torch.equal(integer(*batch()).sample, kept)
    with torch.no_grad(), run_options(keep_unpacked=True):
        fc1.weight[0, 0] ^= 1  # the packed weight changes: the kept copy is stale
        assert not torch.equal(fc1.integer_weight(), first)

    fp32 = to_integer(calibrated(SETTINGS["W8A8 static per-tensor, attention quantized"]))
    bf16 = to_integer(calibrated(SETTINGS["W8A8 static per-tensor, attention quantized"])).to(torch.bfloat16)
    layer = bf16.transformer_blocks[0].ff.net[2]
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32  # integer arithmetic kept
    assert bf16.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.dtype == torch.bfloat16
    x, t, y = batch()
    with torch.no_grad():
        out, ref = bf16(x.bfloat16(), t, y).sample, fp32(x, t, y).sample
    assert out.dtype == torch.bfloat16 and sqnr_db(ref, out.float()) > 15  # bf16 rounding in the float parts only


@pytest.mark.slow
def test_integer_model_runs_under_torch_compile():
    integer = to_integer(calibrated(SETTINGS["W4A8 group 16 (weights and dynamic activations)"]))
    with torch.no_grad():
        eager = integer(*batch()).sample
        compiled = torch.compile(integer)(*batch()).sample
    # float operations reordered by inductor; a dynamic range that moves by an ulp can flip a code (measured 83 dB)
    assert sqnr_db(eager, compiled) > 60


def test_packed_storage_and_int8_weights():
    integer = to_integer(calibrated(SETTINGS["W4A8 static per-tensor"]))
    fc1 = integer.transformer_blocks[0].ff.net[0].proj
    assert fc1.weight.dtype == torch.uint8 and fc1.weight.shape == (fc1.out_features, fc1.in_features // 2)
    assert fc1.integer_weight().dtype == torch.int8 and fc1.integer_weight().abs().max() <= 15
    w8 = to_integer(calibrated(SETTINGS["W8A8 static per-tensor, attention quantized"]))
    fc1 = w8.transformer_blocks[0].ff.net[0].proj
    assert fc1.weight.dtype == torch.int8 and fc1.weight_offset is not None  # asymmetric 8 bit: offset correction
    sym = to_integer(calibrated(SETTINGS["W8A8 symmetric"])).transformer_blocks[0].ff.net[0].proj
    assert sym.weight_offset is None and sym.input_zero is not None and not sym.input_zero.any()


def test_stored_codes_low_rank_branch_and_divisor_are_kept(extras_setting):
    """AdaRound codes, DiTAS's low-rank branch and on-the-fly divisor survive the conversion exactly."""
    model = calibrated(SETTINGS[extras_setting])
    layers = list(quant_layers(model))
    layers[0].start_adaround()
    with torch.no_grad():
        layers[0].adaround.alpha.normal_(0, 2)  # a rounding that differs from round-to-nearest
    layers[0].finish_adaround()
    layers[1].compensate_low_rank(rank=2, iterations=2)
    layers[3].divide_input(torch.rand(layers[3].layer.in_features) + 0.5)
    integer = to_integer(model)
    for q in layers[:4]:
        layer = integer.get_submodule(q.name)
        x = torch.randn(2, 6, layer.in_features)
        with torch.no_grad():
            assert sqnr_db(q(x), layer(x)) > 90, q.name
    assert len(integer.get_submodule(layers[1].name).branches) == 1


def test_uncalibrated_or_unquantized_models_are_refused():
    with pytest.raises(ValueError, match="not calibrated"):
        to_integer(quantize_model(random_dit(), SETTINGS["W4A8 static per-tensor"]))
    with pytest.raises(ValueError, match="no quantized layers"):
        to_integer(random_dit())
    model = calibrated(SETTINGS["W4A8 static per-tensor"])
    q = next(iter(quant_layers(model)))
    q.start_adaround()
    with pytest.raises(ValueError, match="unfinished"):
        to_integer_layer(q)


def test_export_load_round_trip_and_mismatches(tmp_path):
    config = SETTINGS["W4A8 static per-tensor"]
    integer = to_integer(calibrated(config))
    save_integer(integer, tmp_path / "int", DiTSource(), config)
    loaded = load_integer(tmp_path / "int", config, tiny_config().to_dict())
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert all(isinstance(b.ff.net[0], FusedGELU) for m in (integer, loaded) for b in m.transformer_blocks)
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y).sample, integer(x, t, y).sample)
    fp32 = sum(q.layer.weight.numel() * 4 for q in quant_layers(calibrated(config)))
    stored = sum(m.weight.numel() for m in loaded.modules() if isinstance(m, IntLinear))
    assert stored * 8 == fp32  # packed int4: an eighth of fp32, before scales
    with pytest.raises(ValueError, match="different quant"):
        load_integer(tmp_path / "int", SETTINGS["W8A8 symmetric"])
    with pytest.raises(ValueError, match="different architecture"):
        load_integer(tmp_path / "int", config, tiny_config(depth=3).to_dict())
    with pytest.raises(FileNotFoundError, match="ditquant export"):
        load_integer(tmp_path / "missing")
    (tmp_path / "int" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="does not match its checksum"):  # refused before it is parsed
        load_integer(tmp_path / "int")


@needs_bundled
def test_bundled_model_exported_loaded_and_sampled(tmp_path):
    """The bundled DiT at W8A8: export, load without its FP weights, sample. Every block agrees with fake
    quantization to ≥ 40 dB; whole sampling trajectories diverge from it no more than fake quantization diverges
    from itself with its sums in another float order (a rounding boundary crossed anywhere flips a code)."""
    config = SETTINGS["W8A8 static per-tensor, attention quantized"]
    fake = quantize_model(load_dit(DiTSource()).transformer, config)
    sampler = SamplerConfig(num_steps=10)
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(4, 1, 28, 28, generator=g), torch.arange(4)
    with torch.no_grad(), observing_activations(fake):
        sample(fake, noise, labels, sampler)
    save_integer(to_integer(fake), tmp_path / "int", DiTSource(), config)
    integer = load_integer(tmp_path / "int", config)
    blocks = block_sqnr(fake, integer, noise, torch.full((4,), 500), labels)
    assert min(blocks) > 40, blocks

    def run_sampler(model, x):
        with torch.no_grad():
            return sample(model, x, labels, sampler, torch.Generator().manual_seed(1))

    reference = run_sampler(fake, noise)
    with reordered_sums(seed=1):
        noise_floor = sqnr_db(reference, run_sampler(fake, noise))
    trajectory = sqnr_db(reference, run_sampler(integer, noise))
    assert trajectory > noise_floor - 6, (trajectory, noise_floor)


@needs_bundled
def test_cli_fit_export_and_test_both_backends(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])
    root = tmp_path / "run"
    common = small_run("configs/rtn_w4a8.yaml", root, tmp_path / "calib", 8, 8)
    with pytest.raises(SystemExit, match="never calibrated"):
        run("export", str(root))
    run("fit", *common)
    run("export", str(root))
    assert (root / "integer" / "integer.yaml").is_file()
    results = {}
    for name, extra in {"fake": [], "integer": ["--model.backend", "integer"],
                        "exported": ["--model.load_integer", str(root / "integer")],
                        "bf16 float parts": ["--model.backend", "integer", "--model.integer_float_dtype",
                                             "bfloat16"]}.items():
        out = tmp_path / name
        run("test", *common, "--trainer.default_root_dir", str(out), "--ckpt_path", str(root / "checkpoints/last.ckpt"),
            *extra) if name != "exported" else run("test", *common, "--trainer.default_root_dir", str(out), *extra)
        results[name] = (json.loads((out / "test" / "metrics.json").read_text()),
                         np.load(out / "test" / "samples.npz")["arr_0"].astype(np.float64))
    assert results["integer"][0]["label"] == "W4A8 integer"
    fake_images = results["fake"][1]
    for name in ("integer", "exported"):
        mse = np.mean((results[name][1] - fake_images) ** 2)
        assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 35, name  # the same images up to rare 1-level flips
    assert results["integer"][1].tobytes() == results["exported"][1].tobytes()
    bf16_mse = np.mean((results["bf16 float parts"][1] - fake_images) ** 2)
    assert 10 * np.log10(255 ** 2 / max(bf16_mse, 1e-12)) > 20  # bf16 rounding in attention, norms, embeddings
    with pytest.raises(SystemExit, match="integer_float_dtype is for the integer backend"):
        run("test", *common, "--model.integer_float_dtype", "bfloat16")
    with pytest.raises(SystemExit, match="different quant"):
        run("test", *common, "--trainer.default_root_dir", str(tmp_path / "bad"), "--model.load_integer",
            str(root / "integer"), "--model.quant.weight.bits", "8")


@pytest.mark.parametrize("name", ["W8A8 static per-tensor, attention quantized", "W4A8 static per-tensor",
                                  "W8A8 symmetric"])
def test_onednn_quantized_linear_equals_int_mm(name):
    """oneDNN's quantized linear (x86 CPUs) runs the static per-tensor layers: the same integer products as
    ``torch._int_mm``, a rescale in another float order; asymmetric 8-bit weights get their zero point's term."""
    import copy

    from ditquant.integer.linear import int8_dot_products, onednn_linear_available, run_options

    if not (onednn_linear_available() and int8_dot_products()):
        pytest.skip("no oneDNN quantized linear in this torch build, or no int8 dot products (VNNI / AMX) on this CPU")
    integer = to_integer(calibrated(SETTINGS[name]))
    fc2 = integer.transformer_blocks[0].ff.net[2]
    x, t, y = batch()
    with torch.no_grad():
        with run_options(onednn=False):
            ref = integer(x, t, y).sample
        assert fc2._prepacked is None
        with run_options(onednn=True):
            out = integer(x, t, y).sample
        assert fc2._prepacked is not None  # the path ran
        assert sqnr_db(ref, out) > 100  # float rescale order only (the codes feeding each layer are equal)
        with run_options(onednn=True, fused_quantization=True):  # the zero point's term + GELU + cast compiled
            assert sqnr_db(out, integer(x, t, y).sample) > 100
        copied = copy.deepcopy(integer)  # the oneDNN weight is a derived cache: dropped by copies, rebuilt on use
        assert copied.transformer_blocks[0].ff.net[2]._prepacked is None
        assert torch.equal(copied(x, t, y).sample, out)
        bf16 = copy.deepcopy(integer).to(torch.bfloat16)
        with run_options(onednn=False):
            ref16 = bf16(x.bfloat16(), t, y).sample.float()
        assert sqnr_db(ref16, bf16(x.bfloat16(), t, y).sample.float()) > 30  # bf16 float parts either way
        fc2.weight_scale.mul_(2)  # a changed scale rebuilds the oneDNN constants
        assert not torch.equal(integer(x, t, y).sample, out)
        if fc2.packed:  # int4 held packed (memory over speed): no unpacked copy, oneDNN's or ours
            lean = to_integer(calibrated(SETTINGS[name]))
            with run_options(keep_unpacked=False):
                lean(x, t, y)
            assert all(m._prepacked is None and m._unpacked is None for m in lean.modules() if isinstance(m, IntLinear))


def test_float_exact_int8_gemm_equals_int_mm(monkeypatch):
    """CPUs without int8 dot products (AVX2 only) run the int8 GEMMs as float32 GEMMs over ≤ 1024-channel slices:
    equal to ``torch._int_mm`` (the largest sums, −128 · −128 over every channel, included), and a whole integer
    model gives the same output bit for bit either way."""
    from ditquant.integer import linear

    g = torch.Generator().manual_seed(0)
    for m, k, n in [(7, 64, 5), (33, 1025, 17), (20, 4608, 24)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
        a[0], b[:, 0] = -128, -128
        assert torch.equal(linear.float_exact_mm(a, b), torch._int_mm(a, b))
    integer = to_integer(calibrated(SETTINGS["W8A8 static per-tensor, attention quantized"]))
    x, t, y = batch()
    with torch.no_grad():
        outputs = []
        for float_exact in (True, False):
            with linear.run_options(onednn=False, float_exact_gemm=float_exact):
                outputs.append(integer(x, t, y).sample)
        assert torch.equal(*outputs)
        monkeypatch.setattr(linear, "int8_dot_products", lambda: False)  # an AVX2-only CPU: the float path
        with linear.run_options(onednn=False):  # float_exact_gemm None: decided by the CPU
            assert torch.equal(integer(x, t, y).sample, outputs[0])


def test_onednn_unsigned_codes_without_int8_dot_products(monkeypatch):
    """CPUs without int8 dot products (AVX2 only) run oneDNN's u8 × s8 kernel, with the codes made unsigned, where
    it is exact: its int16 pair sums saturate unless 2 · max code · max |w| < 2¹⁵ (``pairs_fit_int16``). 4-bit
    weights take it and agree with the exact float32 GEMMs up to the rescale's float order; per-channel 8-bit
    weights keep the float32 GEMMs (same output bit for bit); weights at the bound (±64) with every code at its
    maximum are exact."""
    import copy

    from ditquant.integer import linear

    if not linear.onednn_linear_available():
        pytest.skip("no oneDNN quantized linear in this torch build")
    monkeypatch.setattr(linear, "int8_dot_products", lambda: False)
    assert linear.pairs_fit_int16(255, 64) and not linear.pairs_fit_int16(255, 65)
    x, t, y = batch()
    w4 = to_integer(calibrated(SETTINGS["W4A8 static per-tensor"]))
    w8 = to_integer(calibrated(SETTINGS["W8A8 symmetric"]))
    with torch.no_grad():
        with linear.run_options(onednn=False):
            ref4, ref8 = w4(x, t, y).sample, w8(x, t, y).sample
        out4 = w4(x, t, y).sample
        fc2 = w4.transformer_blocks[0].ff.net[2]
        assert fc2._prepacked is not None and fc2._prepacked[0][0]  # the path ran, with unsigned codes
        assert sqnr_db(ref4, out4) > 100  # float rescale order only
        bf16 = copy.deepcopy(w4).to(torch.bfloat16)
        with linear.run_options(onednn=False):
            ref16 = bf16(x.bfloat16(), t, y).sample.float()
        assert sqnr_db(ref16, bf16(x.bfloat16(), t, y).sample.float()) > 30  # bf16 float parts either way
        assert torch.equal(w8(x, t, y).sample, ref8)
        assert all(m._prepacked is None for m in w8.modules() if isinstance(m, IntLinear))
        layer = w8.transformer_blocks[0].ff.net[2]  # at the bound: same-sign pairs of 64 · the largest code
        layer.weight.copy_(torch.where(torch.arange(layer.out_features)[:, None] % 2 == 0, 64, -64)
                           .expand_as(layer.weight))
        big = torch.full((8, layer.in_features), 1e3)
        with linear.run_options(onednn=False):
            ref = layer(big)
        assert torch.allclose(layer(big), ref, rtol=1e-6, atol=0) and layer._prepacked is not None
