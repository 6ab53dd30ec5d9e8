"""ditquant as a diffusers quantization backend: ``ditquant export --format diffusers`` folders load with
``DiTTransformer2DModel.from_pretrained`` / ``DiTPipeline.from_pretrained`` in a fresh process into integer layers and
sample exactly what ditquant's integer model samples; ``save_pretrained`` round-trips; bad folders are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ditquant as dq
from ditquant.export.diffusers_format import DitQuantConfig
from ditquant.integer.linear import IntLinear
from ditquant.models.bundled import DIT_DIR
from tests.cli_helpers import run, small_run
from tests.tiny_models import random_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["ditquant"])


def fresh_python(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a new interpreter (nothing of this process's state: only what the folder says)."""
    script = tmp_path / "fresh.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained yet")
def test_bundled_export_loads_with_from_pretrained_and_samples_like_the_integer_backend(tmp_path):
    root, out = tmp_path / "run", tmp_path / "diffusers"
    # rotation pieces, groups of 64, 4-bit packed weights: every kind of integer-layer state travels
    common = small_run("configs/rotated_grouped_gptq_w4a8.yaml", root, tmp_path / "calib", 10, 10,
                       "--model.backend", "integer")
    run("fit", *common)
    run("test", *common)
    run("export", str(root), "--format", "diffusers", "--out", str(out))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]  # nothing to unpickle
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "ditquant" and config["layers"]

    fresh_python(f"""
import numpy as np, torch
import ditquant as dq
from diffusers import DiTTransformer2DModel
from ditquant.integer.linear import IntLinear
model = DiTTransformer2DModel.from_pretrained({str(out)!r})
assert sum(isinstance(m, IntLinear) for m in model.modules()) == {len(config["layers"])}
assert not any(p.is_floating_point() and p.dim() == 2 and p.shape[0] > 32 for n, p in model.named_parameters()
               if ".attn1.to_" in n or ".ff." in n)  # no FP weight of a quantized layer was built
images = dq.generate(model, torch.arange(10) % 10, dq.SamplerConfig(num_steps=10, cfg_scale=1.5))
np.save({str(tmp_path / "loaded.npy")!r}, dq.to_uint8(images))
model.save_pretrained({str(tmp_path / "again")!r})
again = DiTTransformer2DModel.from_pretrained({str(tmp_path / "again")!r})
assert torch.equal(dq.generate(again, torch.arange(10) % 10, dq.SamplerConfig(num_steps=10, cfg_scale=1.5)), images)
""", tmp_path)
    with np.load(root / "test" / "samples.npz") as tested:
        assert np.array_equal(np.load(tmp_path / "loaded.npy"), tested["arr_0"])


def tiny_pipeline(folder: Path) -> Path:
    """A random latent DiTPipeline (1000 classes, as DiTPipeline's null label assumes) saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from ditquant.models.dit import DiTConfig, build_dit

    torch.manual_seed(0)
    transformer = build_dit(DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, input_size=8,
                                      in_channels=4, num_classes=1000))
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def calibrated_run(source: Path, run_dir: Path, quant: dq.QuantConfig) -> torch.nn.Module:
    """A calibrated model of ``source`` saved where ``ditquant export`` looks (``<run>/quantized``)."""
    loaded = dq.load(source)
    sampler = dq.SamplerConfig(num_steps=4, cfg_scale=1.5)
    calibration = dq.calibration_set(loaded, sampler, num_timesteps=2, samples_per_timestep=2, cache_dir=run_dir)
    model = dq.quantize(loaded.transformer, quant)
    dq.calibrate(model, calibration)
    dq.save_quantized(model, run_dir / "quantized", dq.DiTSource(str(source)), quant)
    return model


W8A8 = dq.QuantConfig(weight=dq.QuantSpec(bits=8, granularity="channel"), activation=dq.QuantSpec(bits=8))


def test_pipeline_export_loads_with_dit_pipeline(tmp_path):
    from diffusers import DiTPipeline

    source = tiny_pipeline(tmp_path / "pipeline")
    model = calibrated_run(source, tmp_path / "run", W8A8)
    out = tmp_path / "exported"
    run("export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(out))
    assert (out / "vae").is_dir() and (out / "scheduler").is_dir() and (out / "transformer" / "config.json").is_file()

    fresh_python(f"""
import numpy as np, torch
import ditquant
from diffusers import DiTPipeline
from ditquant.integer.linear import IntLinear
pipe = DiTPipeline.from_pretrained({str(out)!r})
assert any(isinstance(m, IntLinear) for m in pipe.transformer.modules())
images = pipe(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.5,
              generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
np.save({str(tmp_path / "pipeline.npy")!r}, images)
""", tmp_path)
    # the same pipeline around ditquant's own integer model, in this process
    reference = DiTPipeline.from_pretrained(source)
    reference.transformer = dq.to_integer(model)
    expected = reference(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.5,
                         generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    assert np.array_equal(np.load(tmp_path / "pipeline.npy"), expected)


def test_keep_float_and_bad_folders(tmp_path, caplog):
    from diffusers import DiTTransformer2DModel

    source = tmp_path / "dit"
    random_dit().save_pretrained(source)
    model = calibrated_run(source, tmp_path / "run", W8A8)
    out = tmp_path / "exported"
    keep = "transformer_blocks.1.ff.net.2"
    run("export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(out), "--keep-float", keep)

    loaded = DiTTransformer2DModel.from_pretrained(out)
    assert type(loaded.get_submodule(keep)) is torch.nn.Linear
    assert isinstance(loaded.get_submodule("transformer_blocks.0.ff.net.2"), IntLinear)
    assert isinstance(loaded.config.quantization_config, DitQuantConfig)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    expected = dq.to_integer(model, keep_float=(keep,))
    assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, expected(x, timestep=t, class_labels=y).sample)

    # torch_dtype casts the float parts only: the integer layers' scales stay as stored
    half = DiTTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    layer = half.get_submodule("transformer_blocks.0.ff.net.2")
    assert layer.weight_scale.dtype == torch.float32 and half.get_submodule(keep).weight.dtype == torch.bfloat16
    assert half(x.bfloat16(), timestep=t, class_labels=y).sample.dtype == torch.bfloat16

    with pytest.raises(SystemExit, match="not a quantized layer"):
        run("export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "x"), "--keep-float",
            "pos_embed")

    def edited(name: str, edit) -> Path:
        folder = tmp_path / name
        subprocess.run(["cp", "-r", str(out), str(folder)], check=True)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    deeper = edited("deeper", lambda c: c.update(num_layers=3))
    with pytest.raises(ValueError, match="was made for"):
        DiTTransformer2DModel.from_pretrained(deeper)
    four_bit = edited("four_bit", lambda c: c["quantization_config"]["quant"]["weight"].update(bits=4))
    with pytest.raises(ValueError, match="do not match the model it builds|not made for this"):
        DiTTransformer2DModel.from_pretrained(four_bit)
    integer_as_float = edited("as_float", lambda c: c["quantization_config"].update(
        modules_to_not_convert=[keep, "transformer_blocks.0.ff.net.2"]))
    with pytest.raises(ValueError, match="stored as integer layers"):
        DiTTransformer2DModel.from_pretrained(integer_as_float)
