"""Q-DiT: GPTQ, per-layer group sizes, the evolutionary granularity search, and the CLI end to end."""

import json

import pytest
import torch
import yaml

from ditquant.methods.gptq import HessianAccumulator, gptq_quantize
from ditquant.methods.granularity import (EvolutionarySearch, EvolutionSettings, cost, gene_key, search_genes)
from ditquant.models.bundled import DIT_DIR
from ditquant.models.adapters import quantize_model
from ditquant.quant.apply import apply_plan
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import quant_layers
from ditquant.quant.quantizer import quantize_tensor
from ditquant.quant.spec import QuantSpec
from tests.cli_helpers import run, small_run
from tests.tiny_models import random_dit

needs_bundled = pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
BLOCK_ROLES = ["qkv", "attn_out", "fc1", "fc2"]


def group_config(g=16, bits=4, **kwargs) -> QuantConfig:
    return QuantConfig(weight=QuantSpec(bits=bits, granularity="group", group_size=g),
                       activation=QuantSpec(bits=8, granularity="group", group_size=g, dynamic=True),
                       roles=BLOCK_ROLES, **kwargs)


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


def tiny_search_overlay(folder, population: int, num_samples: int, gptq: bool):
    """A config overlay with a 2-generation search on a few samples (DDIM 5, no guidance), then GPTQ if asked."""
    overlay = folder / "tiny_search.yaml"
    overlay.write_text(f"""
trainer:
  callbacks:
    - class_path: ditquant.MethodCallback
      init_args:
        method: granularity_search
        options: {{budget_group_size: 64, population: {population}, top_k: 2, mutations: 1, crossovers: 1,
                   generations: 2, num_samples: {num_samples}, batch_size: {num_samples},
                   sampler: {{kind: ddim, num_steps: 5, cfg_scale: 1.0}}}}
""" + ("    - {class_path: ditquant.MethodCallback, init_args: {method: gptq}}\n" if gptq else ""))
    return overlay


# ---- GPTQ ----

def test_gptq_lazy_blocks_are_exact_even_when_groups_straddle_them():
    torch.manual_seed(0)
    x = torch.randn(500, 96, dtype=torch.float64) @ torch.randn(96, 96, dtype=torch.float64)
    h, w = 2 * x.T @ x / 500, torch.randn(8, 96)
    spec = QuantSpec(bits=4, granularity="group", group_size=24)  # 24 does not divide the lazy block of 32
    eager, lazy = gptq_quantize(w, h, spec, blocksize=1), gptq_quantize(w, h, spec, blocksize=32)
    assert torch.equal(eager.codes, lazy.codes)
    torch.testing.assert_close(eager.scale, lazy.scale)
    assert eager.codes.shape == (8, 4, 24) and eager.codes.min() >= 0 and eager.codes.max() <= 15


def test_gptq_bad_options():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="damping must be in"):
        gptq_quantize(w, h, QuantSpec(bits=4, granularity="channel"), damping=0.0)
    with pytest.raises(ValueError, match="per-channel or group-wise"):
        gptq_quantize(w, h, QuantSpec(bits=4, granularity="tensor"))


@needs_bundled
def test_gptq_beats_round_to_nearest_on_held_out_inputs_of_the_bundled_model():
    """Layers of the bundled DiT, their inputs from FP forwards at several timesteps: GPTQ fitted on half of the
    rows, error measured on the other half, against RTN with the same quantizer and group size."""
    from ditquant.models.loading import DiTSource, load_dit

    model = load_dit(DiTSource()).transformer.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    names = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.3.ff.net.0.proj", "transformer_blocks.7.ff.net.2",
             "transformer_blocks.5.attn1.to_out.0"]
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()
    for name in names:
        layer = model.get_submodule(name)
        rows = inputs[name].reshape(64, -1, layer.in_features)
        fit, held_out = rows[::2].reshape(-1, layer.in_features), rows[1::2].reshape(-1, layer.in_features)
        acc = HessianAccumulator(layer.in_features, torch.device("cpu"))
        acc.add(fit)
        for spec in (QuantSpec(bits=4, granularity="group", group_size=32), QuantSpec(bits=3, granularity="channel")):
            r = gptq_quantize(layer.weight, acc.h, spec)
            w_gptq = ((r.codes - r.zero_point) * r.scale).reshape(layer.weight.shape)
            w_rtn = quantize_tensor(layer.weight, spec, True)
            err = lambda w: (held_out @ (w - layer.weight).T).square().mean().item()  # noqa: E731
            assert err(w_gptq) < 0.9 * err(w_rtn), (name, spec.label("w"), err(w_gptq), err(w_rtn))


# ---- per-layer group sizes ----

def test_layer_group_sizes_apply_to_a_layer_and_its_input():
    model = random_dit()  # hidden 32, MLP 128
    sizes = {"transformer_blocks.0.ff.net.2": 64, "transformer_blocks.1.attn1.to_k": 8}
    quantize_model(model, group_config(16, layer_group_sizes=sizes))
    layers = {q.name: q for q in quant_layers(model)}
    for name, g in sizes.items():
        assert layers[name].weight_quantizer.spec.group_size == g == layers[name].input_quantizer.spec.group_size
    assert layers["transformer_blocks.0.ff.net.0.proj"].weight_quantizer.spec.group_size == 16
    changed = apply_plan(model, group_config(16))  # back to one size: only the two layers change
    assert sorted(changed) == sorted(sizes)
    assert layers["transformer_blocks.0.ff.net.2"].weight_quantizer.scale.shape == (32, 8, 1)
    with pytest.raises(ValueError, match="not quantized layers of this model"):
        quantize_model(random_dit(), group_config(16, layer_group_sizes={"transformer_blocks.9.ff.net.2": 8}))
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        quantize_model(random_dit(), group_config(16, layer_group_sizes={"transformer_blocks.0.ff.net.2": 48}))


# ---- the search ----

def test_genes_share_qkv_and_bad_search_spaces_fail_clearly():
    model = quantize_model(random_dit(), group_config(16))
    genes = search_genes(model, (8, 16, 64, 100))
    assert gene_key("transformer_blocks.0.attn1.to_v") == "transformer_blocks.0.attn1.to_qkv"
    assert len(genes) == 2 * 4 and len(genes[0].layers) == 3
    assert genes[0].sizes == (8, 16) and genes[3].sizes == (8, 16, 64)  # fc2 reads the 128-wide MLP activation
    with pytest.raises(ValueError, match=r"no size of the search space \[48, 96\] divides the 32 input channels of "
                                         r"transformer_blocks.0.attn1.to_q"):
        search_genes(model, (48, 96))
    with pytest.raises(ValueError, match="the constraint cannot be met"):
        EvolutionarySearch(search_genes(model, (8, 16)), EvolutionSettings(), reference=32)


def test_tiny_search_keeps_the_constraint_and_never_loses_its_best():
    model = quantize_model(random_dit(), group_config(16))
    genes = search_genes(model, (8, 16, 32))
    settings = EvolutionSettings(population=8, top_k=3, mutations=3, crossovers=3, generations=2, seed=1)
    search = EvolutionarySearch(genes, settings, reference=16)
    # A synthetic fitness with a known optimum inside the budget: finer groups on fc2, coarser elsewhere.
    target = tuple(8 if k.endswith("net.2") else 32 for k in (gene.key for gene in genes))
    score = lambda genome: float(sum((a != b) for a, b in zip(genome, target)))  # noqa: E731
    best_so_far = []
    while not search.finished:
        search.step(score)
        best_so_far.append(search.scores[search.best])
        assert all(search.legal(g) for g in search.scores)
        assert all(search.scores[search.best] <= v for v in search.scores.values())  # the best seen is kept
    assert best_so_far == sorted(best_so_far, reverse=True) and len(best_so_far) == 3
    assert cost(search.best, genes, "scales") <= search.budget
    resumed = EvolutionarySearch(genes, settings, reference=16)
    resumed.load_state_dict(search.state_dict())
    assert resumed.best == search.best and resumed.finished


@needs_bundled
def test_qdit_search_gptq_fit_test_and_resume_from_the_cli(tmp_path):
    root, calib = tmp_path / "run", tmp_path / "calib"
    overlay = tiny_search_overlay(tmp_path, population=4, num_samples=8, gptq=True)
    args = small_run("configs/qdit_w4a8.yaml", root, calib, 4, 4, "--config", str(overlay))
    run("fit", *args)
    summary = json.loads((root / "quantized" / "fit_summary.json").read_text())
    search = summary["preprocessing"]["granularity_search"]
    assert search["generations"] == 3 and search["cost"] <= search["budget"]
    assert [h["best"] for h in search["history"]] == sorted((h["best"] for h in search["history"]), reverse=True)
    assert summary["preprocessing"]["gptq"]["layers"] == 8 * 6
    result = yaml.safe_load((root / "group_sizes.yaml").read_text())["model"]["quant"]["layer_group_sizes"]
    assert len(result) == 8 * 6 and set(result.values()) <= {32, 64, 128}
    saved = yaml.safe_load((root / "quantized" / "quantized.yaml").read_text())["quant"]["layer_group_sizes"]
    assert saved == result
    run("test", *args)  # from last.ckpt: the checkpoint brings the searched group sizes
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["label"] == "W4A8" and metrics["psnr_vs_fp"] > 10
    # a later fit loads the result and skips the search
    again = tmp_path / "again"
    run("fit", *small_run("configs/qdit_w4a8.yaml", again, calib, 4, 4, "--config", str(overlay),
                          "--config", str(root / "group_sizes.yaml")))
    summary = json.loads((again / "quantized" / "fit_summary.json").read_text())
    assert "skipped" in summary["preprocessing"]["granularity_search"]
    run("test", *small_run("configs/qdit_w4a8.yaml", again, calib, 4, 4, "--config", str(overlay),
                           "--model.load_quantized", str(root / "quantized")))
    # integer export: group-wise int4 weights and dynamic per-group activations, the searched layout in the folder
    run("export", str(root))
    run("test", *args, "--model.load_integer", str(root / "integer"))
    metrics = json.loads((root / "test" / "metrics.json").read_text())
    assert metrics["label"] == "W4A8 integer" and metrics["psnr_vs_fp"] > 10


@needs_bundled
def test_adaround_in_place_of_gptq_on_given_group_sizes(tmp_path):
    root, calib = tmp_path / "run", tmp_path / "calib"
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text("model:\n  quant:\n    layer_group_sizes:\n      transformer_blocks.0.ff.net.2: 32\n"
                     "      transformer_blocks.3.attn1.to_out.0: 128\n")
    # the overlays come before small_run's options (a later --config would override them)
    args = ["--config", "configs/qdit_w4a8.yaml", "--config", "configs/ablations/qdit_adaround.yaml", "--config",
            str(sizes), *small_run("configs/qdit_w4a8.yaml", root, calib, 2, 2, "--model.reconstruction.iterations",
                                   "4")[2:]]
    run("fit", *args)
    summary = json.loads((root / "quantized" / "fit_summary.json").read_text())
    assert "skipped" in summary["preprocessing"]["granularity_search"] and len(summary["reconstruction"]) == 8
    saved = yaml.safe_load((root / "quantized" / "quantized.yaml").read_text())["quant"]
    assert saved["layer_group_sizes"]["transformer_blocks.0.ff.net.2"] == 32
    with pytest.raises(SystemExit, match="GPTQ and model.reconstruction"):
        run("fit", *small_run("configs/qdit_w4a8.yaml", tmp_path / "both", calib, 2, 2,
                              "--model.reconstruction.iterations", "4"))


@needs_bundled
def test_bad_qdit_options_fail_before_any_work(tmp_path):
    calib = tmp_path / "calib"
    for init_args, message in [("{space: [48, 96]}", "no size of the search space"),
                               ("{budget_group_size: 256}", "the constraint cannot be met"),
                               ("{top_k: 60}", "top_k <= population")]:
        overlay = tmp_path / "bad.yaml"
        overlay.write_text("trainer:\n  callbacks:\n    - class_path: ditquant.MethodCallback\n"
                           f"      init_args: {{method: granularity_search, options: {init_args}}}\n")
        with pytest.raises(SystemExit, match=message):
            run("fit", *small_run("configs/qdit_w4a8.yaml", tmp_path / "run", calib, 4, 4, "--config", str(overlay)))
        assert not calib.exists()  # nothing was recorded


@needs_bundled
def test_a_killed_search_resumes_at_its_generation(tmp_path, monkeypatch):
    from ditquant.evaluation.sample_fid import SampleSetFID

    root, calib = tmp_path / "run", tmp_path / "calib"
    overlay = tiny_search_overlay(tmp_path, population=3, num_samples=4, gptq=False)
    args = small_run("configs/qdit_w4a8.yaml", root, calib, 2, 2, "--config", str(overlay))
    scored, real_call = [], SampleSetFID.__call__

    def counted(self, model, kill_at=None):
        if len(scored) == kill_at:
            raise KeyboardInterrupt
        scored.append(1)
        return real_call(self, model)

    # generation 0 scores 3 candidates and is checkpointed; the run dies in generation 1
    monkeypatch.setattr(SampleSetFID, "__call__", lambda self, model: counted(self, model, kill_at=4))
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run("fit", *args)
    assert (root / "checkpoints" / "last.ckpt").is_file() and not (root / "quantized").exists()
    scored.clear()
    monkeypatch.setattr(SampleSetFID, "__call__", counted)
    run("fit", *args, "--ckpt_path", "last")
    search = json.loads((root / "quantized" / "fit_summary.json").read_text())["preprocessing"]["granularity_search"]
    assert [h["generation"] for h in search["history"]] == [0, 1, 2]
    assert len(scored) == search["evaluated"] - 3  # generation 0 was not scored again
