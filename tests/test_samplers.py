import numpy as np
import pytest
import torch

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.diffusion.schedule import ddim_timesteps, respaced_timesteps
from ditquant.models.dit import DiTConfig, build_dit
from tests.reference_diffusion import RespacedDiffusion, torch_model_fn


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = build_dit(DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2, input_size=8, in_channels=4,
                                num_classes=10)).eval()
    # adaLN-Zero initialises gates to zero; randomise so the model output depends on its input.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_respacing_matches_dit():
    assert respaced_timesteps(250)[:4] == [0, 4, 8, 12] and respaced_timesteps(250)[-1] == 999
    assert len(set(respaced_timesteps(50))) == 50 and respaced_timesteps(50)[1] == 20  # round(999/49)=20.39->20
    assert ddim_timesteps(50) == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="DDIM"):
        ddim_timesteps(30)
    with pytest.raises(ValueError, match="sampling steps"):
        respaced_timesteps(0)


@pytest.mark.parametrize("cfg_scale,cfg_channels", [(1.0, None), (1.5, None), (4.0, 3)])
def test_ddpm_matches_reference(tiny_model, cfg_scale, cfg_channels):
    config = SamplerConfig(kind="ddpm", num_steps=10, cfg_scale=cfg_scale, cfg_channels=cfg_channels)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 5, 9])
    ours = sample(tiny_model, noise, labels, config, [torch.Generator().manual_seed(10 + i) for i in range(3)])

    ref_gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    draw = lambda: torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in ref_gens]).double().numpy()  # noqa: E731
    ref = RespacedDiffusion(respaced_timesteps(10)).ddpm(
        torch_model_fn(tiny_model, labels, 10, cfg_scale, cfg_channels), noise.double().numpy(), draw)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_ddim_matches_reference(tiny_model):
    config = SamplerConfig(kind="ddim", num_steps=20, cfg_scale=1.5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 4])
    ours = sample(tiny_model, noise, labels, config)
    ref = RespacedDiffusion(ddim_timesteps(20)).ddim(torch_model_fn(tiny_model, labels, 10, 1.5), noise.double().numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-4)


def test_sampler_config_errors():
    with pytest.raises(ValueError, match="kind"):
        SamplerConfig(kind="euler")
    with pytest.raises(ValueError, match="cfg_scale"):
        SamplerConfig(cfg_scale=0.5)
    with pytest.raises(ValueError, match="DDIM"):
        SamplerConfig(kind="ddim", num_steps=30)
