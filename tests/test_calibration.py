import pytest
import torch

from ditquant.calibration.dataset import (CalibrationRecipe, CalibrationSet, calibration_path, collate_pairs,
                                          load_calibration_set, record_calibration_set, save_calibration_set)
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.models.dit import DiTConfig, build_dit

SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_dit(DiTConfig(hidden_size=32, depth=1, num_heads=2, patch_size=2, input_size=8, num_classes=10)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m


def recipe(**kw):
    args = dict(model="tiny", sampler=SamplerConfig(num_steps=10, cfg_scale=1.5), num_timesteps=5,
                samples_per_timestep=6, seed=3)
    return CalibrationRecipe(**{**args, **kw})


def test_recording_layout_and_positions(model):
    r = recipe()
    data = record_calibration_set(model, r, SHAPE, batch_size=4)  # two chunks: noise is seeded per sample
    assert data["xs"].shape == (5, 6, *SHAPE)
    timesteps = r.sampler.timesteps()
    assert data["ts"].tolist() == [timesteps[i] for i in (0, 2, 4, 6, 8)]  # noisiest first, stride S // N
    assert data["ys"].shape == (6,) and data["ys"].max() < 10
    same = record_calibration_set(model, r, SHAPE, batch_size=6)
    # Same trajectories up to GEMM rounding (batch shapes change the float summation order).
    torch.testing.assert_close(data["xs"], same["xs"], rtol=1e-4, atol=1e-4)
    assert torch.equal(data["ys"], same["ys"])


def test_same_seed_same_file_and_reuse(model, tmp_path):
    r = recipe()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_calibration_set(record_calibration_set(model, r, SHAPE), r, a)
    save_calibration_set(record_calibration_set(model, r, SHAPE), r, b)
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(load_calibration_set(a, r)["xs"], record_calibration_set(model, r, SHAPE)["xs"])
    other = record_calibration_set(model, recipe(seed=4), SHAPE)
    assert not torch.equal(other["xs"], load_calibration_set(a)["xs"])
    assert calibration_path(tmp_path, r) != calibration_path(tmp_path, recipe(seed=4))


def test_recipe_mismatch_and_bad_files(model, tmp_path):
    r = recipe()
    path = tmp_path / "c.safetensors"
    save_calibration_set(record_calibration_set(model, r, SHAPE), r, path)
    with pytest.raises(ValueError, match="different recipe"):
        load_calibration_set(path, recipe(samples_per_timestep=7))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration_set(tmp_path / "missing.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read calibration file"):
        load_calibration_set(truncated)


def test_recipe_validation():
    with pytest.raises(ValueError, match="num_timesteps"):
        recipe(num_timesteps=11)
    with pytest.raises(ValueError, match="samples_per_timestep"):
        recipe(samples_per_timestep=0)


def test_guidance_pairs_stay_together(model):
    data = record_calibration_set(model, recipe(), SHAPE)
    ds = CalibrationSet(data, null_label=10, guidance=True)
    assert len(ds) == 30
    batch = collate_pairs([ds[i] for i in (0, 7, 29)])
    assert batch["x"].shape == (6, *SHAPE)
    assert torch.equal(batch["x"][0], batch["x"][1]) and batch["y"][1] == 10 and batch["y"][0] < 10
    assert batch["t"][2] == data["ts"][1]  # index 7 = timestep position 1, sample 1
    plain = CalibrationSet(data, null_label=10, guidance=False)
    assert collate_pairs([plain[0], plain[1]])["x"].shape == (2, *SHAPE)
