"""The PixArt family: loading both layouts, prompts, the adapter's call against the pipeline's own, exact folds for
adaLN-single, and quantization of self- and cross-attention (tiny random pipelines, seeded)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from ditquant import QuantConfig
from ditquant.calibration.dataset import load_or_record
from ditquant.quant.spec import QuantSpec
from ditquant.errors import UserError
from ditquant.models.adapters import adapter_for, quantize_model
from ditquant.models.adapters.pixart import PixArtAdapter, attach_prompts
from ditquant.models.pixart import PixArtSource, encode_prompts, load_pixart, read_prompts
from ditquant.quant.attention import QuantAttnProcessor
from ditquant.quant.modules import quant_layers
from tests.tiny_pixart import save_pipeline, tiny_transformer

PROMPTS = ["a red shirt", "A Small Striped Bag", "a photo of the black boot on white"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("pixart") / "pipeline")


@pytest.fixture(scope="module")
def loaded(pipeline_folder):
    return load_pixart(PixArtSource(str(pipeline_folder)))


def _with_prompts(loaded):
    table = encode_prompts(loaded.text_encoder, loaded.tokenizer, PROMPTS, vae_scale_factor=loaded.vae_scale_factor)
    attach_prompts(loaded.transformer, table)
    return table


def _inputs(batch: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 20, 0][:batch])
    y = torch.tensor([0, 1, 2, 3][:batch])  # 3: the empty prompt
    return x, t, y


@torch.no_grad()
def test_adapter_call_equals_the_pipeline_transformer_call(pipeline_folder, loaded):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_folder)
    table = _with_prompts(loaded)
    embeds, masks = [], []
    for prompt in PROMPTS:  # the pipeline's own encoding, as its __call__ runs it (no grad, clean_caption off)
        e, m, ne, nm = pipe.encode_prompt(prompt, do_classifier_free_guidance=True, clean_caption=False)
        embeds.append(e)
        masks.append(m)
    embeds, masks = torch.cat([*embeds, ne]), torch.cat([*masks, nm])
    assert torch.equal(table.embeddings, embeds) and torch.equal(table.mask, masks)
    x, t, y = _inputs()
    model = loaded.transformer
    adapter = adapter_for(model)
    assert isinstance(adapter, PixArtAdapter)
    out = adapter.forward(model, x, t, y)
    ref = pipe.transformer(x, encoder_hidden_states=embeds[y], encoder_attention_mask=masks[y], timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert out.shape == (4, 8, 8, 8) and torch.equal(out, ref)
    assert torch.equal(adapter.null_condition(model, y), torch.full_like(y, 3))


@torch.no_grad()
def test_bare_transformer_folder_with_a_separate_text_encoder(tmp_path, pipeline_folder, loaded):
    table = _with_prompts(loaded)
    bare = load_pixart(PixArtSource(str(pipeline_folder / "transformer"), text_encoder=str(pipeline_folder)))
    assert bare.vae is None and bare.scheduler is None
    attach_prompts(bare.transformer, encode_prompts(bare.text_encoder, bare.tokenizer, PROMPTS))
    x, t, y = _inputs()
    adapter = adapter_for(bare.transformer)
    assert torch.equal(adapter.forward(bare.transformer, x, t, y), adapter.forward(loaded.transformer, x, t, y))
    assert torch.equal(bare.transformer.__dict__["_ditquant_prompts"].embeddings, table.embeddings)
    no_text = load_pixart(PixArtSource(str(pipeline_folder / "transformer")))
    with pytest.raises(UserError, match="needs a text encoder"):
        encode_prompts(no_text.text_encoder, no_text.tokenizer, PROMPTS)


@torch.no_grad()
def test_resolution_condition_of_pixart_alpha_1024():
    """PixArt-α 1024 takes the image size and aspect ratio (in pixels) as extra conditions."""
    model = tiny_transformer(use_additional_conditions=True, head_dim=12)  # size embeddings: width / 3 each
    table = encode_prompts(*_text_parts(), PROMPTS, vae_scale_factor=8)
    attach_prompts(model, table)
    x, t, y = _inputs(2)
    out = PixArtAdapter().forward(model, x, t, y)
    sizes = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    ref = model(x, encoder_hidden_states=table.embeddings[y], encoder_attention_mask=table.mask[y], timestep=t,
                added_cond_kwargs=sizes, return_dict=False)[0]
    assert torch.equal(out, ref)


def _text_parts():
    from tests.tiny_pixart import tiny_text_encoder, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return tiny_text_encoder(len(tokenizer)), tokenizer


def test_prompt_file_errors_and_truncation(tmp_path, caplog):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(empty)
    good = tmp_path / "prompts.txt"
    good.write_text("a red shirt\n\n a blue dress \n")
    assert read_prompts(good) == ["a red shirt", "a blue dress"]
    with caplog.at_level(logging.WARNING):
        table = encode_prompts(*_text_parts(), ["a red shirt " * 10], max_length=8)
    assert "truncated to the text encoder's 8" in caplog.text and "prompt 1" in caplog.text
    assert table.embeddings.shape[:2] == (2, 8)


def test_pipeline_folder_errors(tmp_path, pipeline_folder):
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_folder, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError, match="missing tokenizer/"):
        load_pixart(PixArtSource(str(broken)))
    other = tmp_path / "other"
    shutil.copytree(pipeline_folder, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    with pytest.raises(UserError, match="not a PixArt pipeline"):
        load_pixart(PixArtSource(str(other)))
    wide = save_pipeline(tmp_path / "wide", text_width=20)  # a text encoder 20 wide, a caption projection for 12
    with pytest.raises(UserError, match="caption_channels=12"):
        load_pixart(PixArtSource(str(pipeline_folder), text_encoder=str(wide)))


@torch.no_grad()
def test_every_rescalable_input_folds_exactly(loaded):
    """adaLN-single inputs through the per-block multiplier on the shared modulation, attention outputs through V
    (self and cross), the rest online: the model's output is unchanged."""
    import copy

    model = copy.deepcopy(loaded.transformer)
    attach_prompts(model, _with_prompts(loaded))
    adapter = adapter_for(model)
    x, t, y = _inputs()
    before = adapter.forward(model, x, t, y)
    quantize_model(model, QuantConfig(weight=QuantSpec(bits=16), activation=QuantSpec(bits=16)))  # online folds:
    # the division lives in a QuantLayer (16 bits: not quantized, so only the fold changes the computation)
    points = adapter.rescalable_inputs(model)
    assert {(p.name, p.fold) for p in points if p.block == 0} == {
        ("attention", "modulation"), ("attn_out", "value"), ("cross_q", "online"), ("cross_kv", "online"),
        ("cross_out", "value"), ("mlp", "modulation"), ("fc2", "online")}
    g = torch.Generator().manual_seed(0)
    factors = {(p.block, p.name): torch.rand(p.consumers[0].layer.in_features, generator=g) * 3 + 0.2 for p in points}
    adapter.rescale_inputs(model, factors)
    after = adapter.forward(model, x, t, y)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.transformer_blocks[0].modulation_multiplier, torch.ones(96))

    # a block replayed from its captured inputs (block reconstruction) computes what it computes inside the model:
    # the capture takes the call as made, before the block's own multiplier hook, which the replay runs once
    from ditquant.calibration.capture import capture_input, replay, run_until_output

    block = model.transformer_blocks[1]
    signature, rows = capture_input(lambda: adapter.forward(model, x, t, y), block, batch=len(t))
    assert torch.equal(replay(block, signature, rows), run_until_output(lambda: adapter.forward(model, x, t, y), block))


@torch.no_grad()
def test_w8a8_quantizes_self_and_cross_attention(loaded):
    import copy

    model = copy.deepcopy(loaded.transformer)
    attach_prompts(model, _with_prompts(loaded))
    adapter = adapter_for(model)
    x, t, y = _inputs()
    fp = adapter.forward(model, x, t, y)
    config = QuantConfig(weight=QuantSpec(bits=8, granularity="channel"),
                         activation=QuantSpec(bits=8, dynamic=True),
                         attention=QuantSpec(bits=8, dynamic=True))
    quantize_model(model, config)
    roles = {q.role for q in quant_layers(model)}
    assert {"qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "fc1", "fc2", "adaln", "caption_mlp",
            "timestep_mlp", "patch_embed", "final_linear"} <= roles
    processors = [m for m in model.modules() if isinstance(m, QuantAttnProcessor)]
    assert len(processors) == 4  # attn1 and attn2 of both blocks
    out = adapter.forward(model, x, t, y)
    rel = ((out - fp).norm() / fp.norm()).item()
    assert 0 < rel < 0.05
    names = [name for name, _ in adapter.units(model)]
    assert names[:2] == ["pos_embed.proj", "adaln_single.emb.timestep_embedder.linear_1"]
    assert names[-3:] == ["transformer_blocks.0", "transformer_blocks.1", "proj_out"]
    assert all(any(q is m for _, u in adapter.units(model) for m in u.modules()) for q in quant_layers(model))


def test_overrides_keep_cross_attention_in_floating_point(loaded):
    """The ablation overlays: an override by attention name keeps the cross-attention's matmuls in floating
    point (linears still quantized); by role, its text K/V projections."""
    import copy
    from dataclasses import replace

    from ditquant.quant.config import LayerOverride

    base = QuantConfig(weight=QuantSpec(bits=8, granularity="channel"), activation=QuantSpec(bits=8, dynamic=True),
                       attention=QuantSpec(bits=8, dynamic=True))
    matmuls = replace(base, overrides=[LayerOverride(layers=["transformer_blocks.*.attn2"],
                                                     attention=QuantSpec(bits=16))])
    model = quantize_model(copy.deepcopy(loaded.transformer), matmuls)
    quantized = {n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)}
    assert quantized == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    assert {"cross_q", "cross_kv", "cross_out"} <= {q.role for q in quant_layers(model)}
    kv = replace(base, overrides=[LayerOverride(roles=["cross_kv"], weight=QuantSpec(bits=16),
                                                activation=QuantSpec(bits=16))])
    model = quantize_model(copy.deepcopy(loaded.transformer), kv)
    assert not any(q.weight_quantizer.spec.enabled for q in quant_layers(model) if q.role == "cross_kv")
    assert sum(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules()) == 4


def test_condition_index_out_of_range(loaded):
    _with_prompts(loaded)
    x, t, _ = _inputs(2)
    with pytest.raises(UserError, match="out of range"):
        adapter_for(loaded.transformer).forward(loaded.transformer, x, t, torch.tensor([0, 9]))


# ---- every method on a tiny PixArt, through the Python API (what ditquant fit runs) ----

@pytest.fixture(scope="module")
def tiny_calibration(pipeline_folder, tmp_path_factory):
    import ditquant as dq

    loaded = load_pixart(PixArtSource(str(pipeline_folder)))
    attach_prompts(loaded.transformer, loaded.prompts)
    sampler = dq.SamplerConfig(kind="ddpm", num_steps=4, cfg_scale=4.5)
    calibration = dq.calibration_set(loaded, sampler, num_timesteps=2, samples_per_timestep=4,
                                     cache_dir=tmp_path_factory.mktemp("calibration"))
    return loaded, sampler, calibration


W4A8 = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), activation=QuantSpec(bits=8),
                   attention=QuantSpec(bits=8))
GROUPED = QuantConfig(weight=QuantSpec(bits=4, granularity="group", group_size=8),
                      activation=QuantSpec(bits=8, granularity="group", group_size=8, dynamic=True),
                      roles=["qkv", "attn_out", "fc1", "fc2"])
SMOOTHED = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"),
                       activation=QuantSpec(bits=8, granularity="sample", dynamic=True),
                       roles=["qkv", "attn_out", "fc1", "fc2"])


@pytest.mark.parametrize("method", ["rtn", "qdiffusion", "ptq4dit", "qdit", "ditas"])
def test_every_method_runs_on_a_tiny_pixart(tiny_calibration, method):
    import copy

    import ditquant as dq

    loaded, sampler, calibration = tiny_calibration
    model = copy.deepcopy(loaded.transformer)
    attach_prompts(model, loaded.prompts)
    config = {"rtn": W4A8, "qdiffusion": W4A8, "ptq4dit": W4A8, "qdit": GROUPED, "ditas": SMOOTHED}[method]
    dq.quantize(model, config)
    if method == "ptq4dit":
        report = dq.balance(model, calibration)
        assert report
    if method == "ditas":
        dq.smooth(model, calibration)
        dq.low_rank(model, rank=2, iterations=2)
    if method == "qdit":
        dq.gptq(model, calibration)
    dq.calibrate(model, calibration)
    if method in ("qdiffusion", "ptq4dit"):
        summary = dq.reconstruct(model, calibration, dq.ReconstructionConfig(iterations=3, batch_size=4))
        assert [s["unit"] for s in summary][-3:] == ["transformer_blocks.0", "transformer_blocks.1", "proj_out"]
    roles = {q.role for q in quant_layers(model)}
    assert {"cross_q", "cross_kv", "cross_out"} <= roles  # the DiT method configs reach the cross-attention
    images = dq.generate(model, labels=torch.tensor([0, 1]), sampler=sampler)
    reference = dq.generate(loaded.transformer, labels=torch.tensor([0, 1]), sampler=sampler)
    assert images.shape == reference.shape == (2, 4, 8, 8) and torch.isfinite(images).all()
    assert not torch.equal(images, reference)


def test_fit_and_test_from_the_cli_with_a_prompts_file(tmp_path, pipeline_folder):
    """The DiT method config serves PixArt: the model option selects the family; test writes the prompts beside
    the samples and names them in the grid."""
    import numpy as np

    from tests.cli_helpers import run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red shirt\na blue dress\na small bag\n")
    common = ["--config", "configs/ptq4dit_w4a8.yaml", "--model.pixart.source", str(pipeline_folder),
              "--model.pixart.prompts", str(prompts), "--trainer.default_root_dir", str(tmp_path / "run"),
              "--data.cache_dir", str(tmp_path / "calibration"), "--model.sampler.num_steps", "6",
              "--data.num_timesteps", "3", "--data.samples_per_timestep", "4", "--model.reconstruction.iterations",
              "3", "--model.reconstruction.batch_size", "8", "--model.evaluation.fid_features", "none",
              "--trainer.enable_progress_bar", "false"]
    run("fit", *common)
    run("test", *common, "--data.num_test_samples", "6", "--data.test_batch_size", "3")
    out = tmp_path / "run" / "test"
    assert (out / "prompts.txt").read_text().splitlines() == ["a red shirt", "a blue dress", "a small bag"]
    with np.load(out / "samples.npz") as archive:
        assert archive["arr_0"].shape == (6, 16, 16, 3) and archive["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    assert json.loads((out / "metrics.json").read_text())["psnr_vs_fp"] > 0

    # integer inference in process and from both export formats: the same samples
    run("export", str(tmp_path / "run"))
    run("export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "diffusers"))
    ckpt = ["--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt")]
    samples = {}
    for name, extra in {"integer": ["--model.backend", "integer", *ckpt],
                        "exported": ["--model.load_integer", str(tmp_path / "run" / "integer")]}.items():
        run("test", *common, "--data.num_test_samples", "6", "--data.test_batch_size", "3",
            "--trainer.default_root_dir", str(tmp_path / name), *extra)
        samples[name] = np.load(tmp_path / name / "test" / "samples.npz")["arr_0"]
    assert samples["integer"].tobytes() == samples["exported"].tobytes()
    fake = np.load(out / "samples.npz")["arr_0"].astype(np.float64)
    mse = np.mean((samples["integer"].astype(np.float64) - fake) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 30  # the same images up to rare code flips
    with pytest.raises(SystemExit, match="holds no prompts"):
        prompts.write_text("\n")
        run("test", *common, "--data.num_test_samples", "6")


@torch.no_grad()
def test_dpm_solver_sampling_equals_the_pipeline(pipeline_folder, loaded):
    """ditquant's sampler on the adapter reproduces PixArtAlphaPipeline's own latents bit for bit (DPM-Solver++,
    guidance with the empty prompt, learned σ dropped), from the same initial noise."""
    import ditquant as dq
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_folder)
    _with_prompts(loaded)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = dq.SamplerConfig(kind="dpm_solver", num_steps=5, cfg_scale=4.5)
    ours = dq.diffusion.samplers.sample(loaded.transformer, noise.clone(), torch.tensor([1]), config)
    theirs = pipe(PROMPTS[1], latents=noise.clone(), num_inference_steps=5, guidance_scale=4.5, height=16, width=16,
                  output_type="latent", use_resolution_binning=False, clean_caption=False).images
    assert torch.equal(ours, theirs)
    assert config.timesteps() == [999, 799, 599, 400, 200]


def test_calibration_recipe_follows_the_prompts(tmp_path, pipeline_folder):
    """The same prompts give the same calibration file (byte-identical when recorded again); other prompts another."""
    import ditquant as dq

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("a red shirt\na blue dress\n")
    second.write_text("a red shirt\na small bag\n")
    sampler = dq.SamplerConfig(kind="dpm_solver", num_steps=4, cfg_scale=4.5)
    paths = []
    for prompts, cache in ((first, "one"), (first, "two"), (second, "one")):
        loaded = dq.load_pixart(pipeline_folder, prompts=str(prompts))
        _, path = load_or_record(loaded, sampler, tmp_path / cache, num_timesteps=2, samples_per_timestep=3)
        paths.append(path)
    assert paths[0].name == paths[1].name and paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[2].name != paths[0].name


def test_integer_pixart_agrees_per_block_and_loads_with_pixart_pipeline(tmp_path, pipeline_folder):
    """A calibrated PixArt (smoothing folded into the per-block modulation multipliers and the value rows) in integer
    form: every block reproduces the fake-quantized block; ``ditquant export --format diffusers`` writes a pipeline
    folder that ``PixArtAlphaPipeline.from_pretrained`` loads into integer layers in a fresh process and that samples
    exactly what ditquant's integer model samples."""
    import subprocess
    import sys

    import ditquant as dq
    from ditquant.export.command import main as export_main
    from ditquant.export.calibrated import save_quantized
    from ditquant.integer.agreement import block_sqnr
    from ditquant.integer.convert import to_integer
    from ditquant.integer.linear import IntLinear

    loaded = load_pixart(PixArtSource(str(pipeline_folder)))
    attach_prompts(loaded.transformer, loaded.prompts)
    sampler = dq.SamplerConfig(kind="dpm_solver", num_steps=4, cfg_scale=4.5)
    calibration = dq.calibration_set(loaded, sampler, num_timesteps=2, samples_per_timestep=4,
                                     cache_dir=tmp_path / "calibration")
    config = QuantConfig(weight=QuantSpec(bits=8, granularity="channel"), activation=QuantSpec(bits=8),
                         attention=QuantSpec(bits=8))
    model = loaded.transformer
    dq.quantize(model, config)
    dq.smooth(model, calibration)
    dq.calibrate(model, calibration)
    assert any(not torch.equal(b.modulation_multiplier, torch.ones_like(b.modulation_multiplier))
               for b in model.transformer_blocks)  # the adaLN-single fold is in play
    integer = to_integer(model)
    x, t, y = _inputs(4)
    assert min(block_sqnr(model, integer, x, t, y)) > 30

    run = tmp_path / "run"
    save_quantized(model, run / "quantized", loaded.source, config)
    export_main([str(run), "--format", "diffusers", "--out", str(tmp_path / "diffusers")])
    assert (tmp_path / "diffusers" / "model_index.json").is_file()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = dq.diffusion.samplers.sample(integer, noise.clone(), torch.tensor([1]), sampler)
    torch.save({"noise": noise, "expected": expected}, tmp_path / "expected.pt")
    script = tmp_path / "fresh.py"
    script.write_text(f"""
import torch
import ditquant  # registers quant_method "ditquant"
from diffusers import PixArtAlphaPipeline
from ditquant.integer.linear import IntLinear
pipe = PixArtAlphaPipeline.from_pretrained({str(tmp_path / "diffusers")!r})
assert sum(isinstance(m, IntLinear) for m in pipe.transformer.modules()) == \
    {sum(isinstance(m, IntLinear) for m in integer.modules())}
data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
latents = pipe({loaded.prompts.prompts[1]!r}, latents=data["noise"], num_inference_steps=4, guidance_scale=4.5,
               height=16, width=16, output_type="latent", use_resolution_binning=False, clean_caption=False).images
assert torch.equal(latents, data["expected"]), (latents - data["expected"]).abs().max()
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
