"""Model loading: exact conversion of original DiT checkpoints, diffusers folders, pipelines, and the errors."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditquant.models import bundled, loading
from ditquant.models.dit import DIT_PATCHES, DIT_SIZES, DiTConfig, config_of
from ditquant.models.loading import DiTSource, load_dit
from ditquant.models.original import (convert_original_state_dict, infer_config, load_original_checkpoint,
                                      original_shapes, original_to_diffusers)
from tests.reference_dit import TINY, random_inputs, random_reference

# Wider, pixel-space, patch 4, eps-only output: exercises the other branches of the conversion.
PIXEL = DiTConfig(hidden_size=64, depth=2, num_heads=2, patch_size=4, input_size=16, in_channels=1, num_classes=10,
                  learn_sigma=False)


def output_error(model, reference, config: DiTConfig, batch: int = 2) -> tuple[float, float]:
    """(max |model - reference|, tolerance 1e-5 x output scale) on seeded inputs."""
    x, t, y = random_inputs(config, batch=batch)
    with torch.no_grad():
        want = reference(x, t, y)  # (N, C_out, H, W)
        got = model(x, t, y).sample
    assert got.shape == want.shape
    return (got - want).abs().max().item(), 1e-5 * want.abs().max().item()


def assert_matches(model, reference, config: DiTConfig, batch: int = 2) -> None:
    err, tol = output_error(model, reference, config, batch)
    assert err <= tol, f"converted model differs from the reference DiT: max error {err:.3g} > {tol:.3g}"


def meta_state(config: DiTConfig) -> dict:
    """An original-layout state dict with the right shapes and no data (enough for infer_config)."""
    return {k: torch.empty(shape, device="meta") for k, shape in original_shapes(config).items()}


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)


# --------------------------------------------------------------------------------------------------------------
# Original checkpoints: exact conversion
# --------------------------------------------------------------------------------------------------------------

def _save(state: dict, path: Path, layout: str) -> Path:
    if layout == "plain":
        torch.save(state, path)
    elif layout == "train":  # DiT's train.py: model, EMA, optimizer state and the argparse Namespace
        other = {k: v + 1.0 for k, v in state.items()}
        opt = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
        torch.save({"model": other, "ema": state, "opt": opt, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    elif layout == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif layout == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("config", [TINY, PIXEL], ids=["tiny", "pixel"])
@pytest.mark.parametrize("layout", ["plain", "train", "ddp", "safetensors"])
def test_original_checkpoint_matches_reference(tmp_path, config, layout):
    reference = random_reference(config, seed=0)
    path = _save(reference.state_dict(), tmp_path / "dit.pt", layout)
    model = load_original_checkpoint(path, num_heads=config.num_heads)
    assert config_of(model) == config
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert_matches(model, reference, config)


def test_use_ema_selects_the_weights(tmp_path):
    ema, raw = random_reference(TINY, seed=0), random_reference(TINY, seed=1)
    path = tmp_path / "train.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict()}, path)
    assert_matches(load_original_checkpoint(path, num_heads=2), ema, TINY)
    assert_matches(load_original_checkpoint(path, num_heads=2, use_ema=False), raw, TINY)

    torch.save({"model": raw.state_dict()}, path)
    with pytest.raises(ValueError, match=r"train\.pt has no 'ema' weights.*use_ema=False"):
        load_original_checkpoint(path, num_heads=2)


def test_converted_model_owns_its_tensors(tiny_reference):
    """Each block owns its embedder copy, q/k/v do not alias (safetensors refuses shared storage)."""
    state = tiny_reference.state_dict()
    converted = convert_original_state_dict(state, TINY)
    pointers = [t.untyped_storage().data_ptr() for t in converted.values()]
    assert len(set(pointers)) == len(pointers)
    assert all(t.untyped_storage().data_ptr() != state["blocks.0.attn.qkv.weight"].untyped_storage().data_ptr()
               for t in converted.values())


def test_stock_diffusers_numerics_differ(tiny_reference):
    """Why use_original_numerics exists: the same weights in a stock diffusers DiT miss the reference."""
    stock = original_to_diffusers(tiny_reference.state_dict(), TINY, original_numerics=False)
    err, tol = output_error(stock, tiny_reference, TINY)
    assert err > 100 * tol
    assert_matches(original_to_diffusers(tiny_reference.state_dict(), TINY), tiny_reference, TINY)


def test_dit_xl_2_matches_reference():
    """DiT-XL/2 at 256 px (32x32x4 latents): 675M parameters, one batch-1 forward each."""
    config = DiTConfig.named("DiT-XL/2", input_size=32)
    reference = random_reference(config, seed=0)
    state = reference.state_dict()
    assert infer_config(state, "DiT-XL/2") == config
    assert infer_config(state) == config  # 16 heads from the XL width
    model = original_to_diffusers(state, config, copy=False)  # shares the reference's tensors: 2.7 GB, not 5.4
    assert_matches(model, reference, config, batch=1)


# --------------------------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES])
def test_infer_config_of_named_sizes(name):
    config = DiTConfig.named(name, input_size=32)
    state = meta_state(config)
    assert infer_config(state, name) == config
    assert infer_config(state) == config  # heads from the width of the named sizes


def test_infer_config_heads_and_overrides():
    state = meta_state(TINY)
    assert infer_config(state, num_heads=2) == TINY
    assert infer_config(state, num_heads=2, depth=2, input_size=8, learn_sigma=True) == TINY
    with pytest.raises(ValueError, match="hidden size 32.*pass num_heads"):
        infer_config(state)
    with pytest.raises(ValueError, match="unknown option.*heads"):
        infer_config(state, heads=2)
    no_null_row = infer_config(state, num_heads=2, class_dropout_prob=0.0)
    assert no_null_row.num_classes == TINY.num_classes + 1


def test_name_disagreeing_with_weights():
    state = meta_state(DiTConfig.named("DiT-S/2"))
    with pytest.raises(ValueError, match=r"name='DiT-B/2' means hidden_size=768, but the weights have hidden_size=384"):
        infer_config(state, "DiT-B/2")
    with pytest.raises(ValueError, match=r"name='DiT-S/4' means patch_size=4.*patch_size=2"):
        infer_config(state, "DiT-S/4")
    with pytest.raises(ValueError, match=r"num_heads=4 disagrees with name='DiT-S/2'"):
        infer_config(state, "DiT-S/2", num_heads=4)


def test_override_disagreeing_with_weights(tiny_original_checkpoint):
    with pytest.raises(ValueError, match=r"tiny\.pt: option depth=3 disagrees with the weights, which have depth=2"):
        load_original_checkpoint(tiny_original_checkpoint, num_heads=2, depth=3)
    with pytest.raises(ValueError, match=r"option input_size=16 .* input_size=8"):
        load_original_checkpoint(tiny_original_checkpoint, num_heads=2, input_size=16)


def test_unknown_model_name(tiny_original_checkpoint):
    with pytest.raises(ValueError, match="unknown model name 'DiT-XXL/2'; known names: DiT-S/2"):
        load_original_checkpoint(tiny_original_checkpoint, name="DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model name"):
        DiTSource(str(tiny_original_checkpoint), name="XL/3")


# --------------------------------------------------------------------------------------------------------------
# Broken checkpoints
# --------------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        load_original_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        load_dit(DiTSource(str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match=r"runs/nope\.pt does not exist"):  # owner/name-shaped, but a path
        load_dit(DiTSource("runs/nope.pt"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, tiny_reference, suffix):
    path = _save(tiny_reference.state_dict(), tmp_path / "dit.pt", "plain" if suffix == ".pt" else "safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"dit\{suffix}: cannot read checkpoint"):
        load_original_checkpoint(path, num_heads=2)


class NotAWeight:
    """A custom class: torch.load(weights_only=True) must refuse to build it."""


def test_pickle_with_code_is_refused(tmp_path, tiny_reference):
    path = tmp_path / "evil.pt"
    torch.save({"ema": tiny_reference.state_dict(), "extra": NotAWeight()}, path)
    refused = r"evil\.pt: refused to unpickle \(it needs tests\.test_models\.NotAWeight\).*weights_only=True"
    with pytest.raises(ValueError, match=refused):
        load_original_checkpoint(path, num_heads=2)


def test_wrong_keys(tmp_path, tiny_reference):
    state = tiny_reference.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"},
                    r"missing keys: blocks\.1\.mlp\.fc2\.bias"),
        "extra": ({**state, "blocks.0.attn.q_norm.weight": torch.ones(16)},
                  r"unexpected keys: blocks\.0\.attn\.q_norm\.weight"),
        "renamed": ({k.replace("adaLN_modulation.1", "ada.1"): v for k, v in state.items()},
                    r"missing keys: blocks\.0\.adaLN_modulation\.1\.bias, .*unexpected keys: blocks\.0\.ada\.1\.bias"),
    }
    for case, (broken, message) in cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save(broken, path)
        with pytest.raises(ValueError, match=rf"{case}\.pt: .*{message}"):
            load_original_checkpoint(path, num_heads=2)

    # A diffusers state dict handed to the original loader says what it is.
    diffusers_state = original_to_diffusers(state, TINY).state_dict()
    path = tmp_path / "diffusers.safetensors"
    save_file(diffusers_state, path)
    with pytest.raises(ValueError, match="missing keys.*looks like a diffusers state dict"):
        load_original_checkpoint(path, num_heads=2)


def test_shape_mismatch(tmp_path, tiny_reference):
    state = tiny_reference.state_dict()
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape\.pt: shape mismatch .*blocks\.1\.mlp\.fc1\.weight: expected "
                                         r"\(128, 32\), found \(100, 32\)"):
        load_original_checkpoint(path, num_heads=2)


def test_pos_embed_must_be_the_fixed_table(tmp_path, tiny_reference):
    state = tiny_reference.state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])  # a learned table diffusers cannot represent
    path = tmp_path / "learned_pos.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="learned_pos.pt: pos_embed is not DiT's fixed 2D sin-cos table"):
        load_original_checkpoint(path, num_heads=2)


# --------------------------------------------------------------------------------------------------------------
# load_dit: every kind of source
# --------------------------------------------------------------------------------------------------------------

def test_load_dit_original_checkpoint(tiny_original_checkpoint, tiny_reference):
    loaded = load_dit(DiTSource(str(tiny_original_checkpoint), num_heads=2))
    assert loaded.config == TINY and loaded.vae is None and loaded.latent_scale == 1.0
    assert "original checkpoint" in loaded.description and "no VAE" in loaded.description
    assert_matches(loaded.transformer, tiny_reference, TINY)


def test_diffusers_folder_round_trip(tiny_dit_folder, tiny_reference):
    loaded = load_dit(DiTSource(str(tiny_dit_folder)))
    assert loaded.config == TINY and loaded.vae is None
    assert not loaded.transformer.training
    assert not any(p.requires_grad for p in loaded.transformer.parameters())
    assert "diffusers folder" in loaded.description
    assert_matches(loaded.transformer, tiny_reference, TINY)  # pos_embed recomputed by diffusers: still exact

    stock = load_dit(DiTSource(str(tiny_dit_folder), original_numerics=False))
    err, tol = output_error(stock.transformer, tiny_reference, TINY)
    assert err > 100 * tol


def test_bin_folder_is_read_with_weights_only(tmp_path, tiny_original_checkpoint, tiny_reference):
    folder = tmp_path / "bin"
    load_original_checkpoint(tiny_original_checkpoint, num_heads=2).save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    assert_matches(load_dit(DiTSource(str(folder))).transformer, tiny_reference, TINY)


def test_hub_layout_transformer_class_name(tmp_path, tiny_dit_folder, tiny_reference):
    """facebook/DiT-XL-2-256 was converted before DiTTransformer2DModel existed: its config says Transformer2DModel."""
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_dit_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(_class_name="Transformer2DModel", norm_eps=1e-5)
    (folder / "config.json").write_text(json.dumps(config))
    assert_matches(load_dit(DiTSource(str(folder))).transformer, tiny_reference, TINY)


def test_pipeline_folder(tmp_path, tiny_dit_folder, tiny_reference):
    from diffusers import DDIMScheduler, DiTPipeline

    transformer = load_dit(DiTSource(str(tiny_dit_folder))).transformer
    folder = tmp_path / "pipeline"
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {"transformer", "vae", "scheduler", "model_index.json"}

    loaded = load_dit(DiTSource(str(folder), name=None, num_heads=2, in_channels=4))
    assert loaded.config == TINY
    assert loaded.vae is not None and not loaded.vae.training
    assert loaded.latent_scale == pytest.approx(0.18215)
    assert "DiTPipeline folder" in loaded.description and "VAE from" in loaded.description
    assert_matches(loaded.transformer, tiny_reference, TINY)

    pixel_only = load_dit(DiTSource(str(folder), vae="none"))
    assert pixel_only.vae is None and pixel_only.latent_scale == 1.0

    # The VAE of a pipeline can be named for another source, by its folder or the pipeline's.
    for vae in (folder, folder / "vae"):
        assert load_dit(DiTSource(str(tiny_dit_folder), vae=str(vae))).vae is not None


def test_vae_channels_must_match(tmp_path, tiny_reference):
    pixel = random_reference(PIXEL, seed=0)
    folder = tmp_path / "pixel"
    original_to_diffusers(pixel.state_dict(), PIXEL).save_pretrained(folder)
    vae_folder = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_folder)
    with pytest.raises(ValueError, match="4 latent channels, but the DiT takes in_channels=1"):
        load_dit(DiTSource(str(folder), vae=str(vae_folder)))
    with pytest.raises(ValueError, match=r"holds a AutoencoderKL, not a DiTTransformer2DModel"):
        load_dit(DiTSource(str(vae_folder)))


def test_bundled(monkeypatch, tmp_path, tiny_dit_folder, tiny_reference):
    monkeypatch.setattr(bundled, "DIT_DIR", tmp_path / "not_trained_yet")
    with pytest.raises(FileNotFoundError, match="bundled DiT .*not_trained_yet does not exist yet; train it"):
        load_dit(DiTSource())
    monkeypatch.setattr(bundled, "DIT_DIR", tiny_dit_folder)
    loaded = load_dit(DiTSource("bundled"))
    assert loaded.vae is None and loaded.latent_scale == 1.0 and "bundled model" in loaded.description
    assert_matches(loaded.transformer, tiny_reference, TINY)


def test_folder_config_disagreement(tiny_dit_folder):
    with pytest.raises(ValueError, match=r"option depth=12 disagrees with the model, which has depth=2"):
        load_dit(DiTSource(str(tiny_dit_folder), depth=12))
    with pytest.raises(ValueError, match=r"name='DiT-S/2' means hidden_size=384, but the model has hidden_size=32"):
        load_dit(DiTSource(str(tiny_dit_folder), name="DiT-S/2"))


def test_folder_errors(tmp_path, tiny_dit_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is neither a diffusers model folder .* nor a DiTPipeline folder"):
        load_dit(DiTSource(str(tmp_path / "empty")))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_dit_folder / "config.json", no_weights)
    with pytest.raises(ValueError, match="has config.json but no weights"):
        load_dit(DiTSource(str(no_weights)))

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(tiny_dit_folder, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    # diffusers itself only warns about missing weights and initialises them randomly: the loader must not.
    (wrong_shape / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match=r"wrong_shape: cannot load DiTTransformer2DModel .*missing keys: "
                                         r"transformer_blocks\.2\."):
        load_dit(DiTSource(str(wrong_shape)))
    (wrong_shape / "config.json").write_text(json.dumps({**config, "num_embeds_ada_norm": 20}))
    with pytest.raises(ValueError, match=r"(?s)wrong_shape: cannot load DiTTransformer2DModel .*size mismatch "
                                         r".*embedding_table"):
        load_dit(DiTSource(str(wrong_shape)))


def test_source_validation():
    with pytest.raises(ValueError, match="DiTSource.depth must be a positive integer, got -1"):
        DiTSource("x", depth=-1)
    with pytest.raises(ValueError, match="DiTSource.learn_sigma must be true or false"):
        DiTSource("x", learn_sigma=1)
    with pytest.raises(ValueError, match="DiTSource.source"):
        DiTSource("")
    assert DiTSource(Path("a/b")).source == "a/b"


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"cannot download hub model 'nobody/no-such-dit'.*pass a local folder"):
        load_dit(DiTSource("nobody/no-such-dit"))
    assert time.perf_counter() - start < 10


def test_hub_id_without_network_fails_fast(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading.socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"cannot download hub model 'facebook/DiT-XL-2-256' \(no network\?"):
        load_dit(DiTSource("facebook/DiT-XL-2-256"))
    assert time.perf_counter() - start < 10
