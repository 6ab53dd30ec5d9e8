import pytest
import torch

from ditquant.quant.adaround import AdaRoundWeight, RoundingSchedule
from ditquant.quant.quantizer import UniformQuantizer
from ditquant.quant.spec import QuantSpec


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("granularity,group", [("channel", None), ("group", 8)])
def test_hard_rounding_at_init_is_round_to_nearest(symmetric, granularity, group):
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group)
    shape = (16, 1) if granularity == "channel" else (16, 4, 1)
    q = UniformQuantizer(spec, is_weight=True, scale_shape=shape)
    q.init_from(w)
    grouped = w.reshape(16, 4, 8) if granularity == "group" else w
    ada = AdaRoundWeight(grouped, q.scale, q.zero_point, spec)
    ada.hard = True
    assert torch.equal(ada().reshape(w.shape), q(w))
    ada.hard = False  # the soft weight starts at the FP weight (up to the clamp of h at 1e-4)
    assert torch.allclose(ada(), grouped.clamp(*(((spec.qmin - q.zero_point) * q.scale, (spec.qmax - q.zero_point)
                                                  * q.scale))), atol=1e-3 * q.scale.max().item())


def test_symmetric_grid_keeps_negative_weights():
    w = torch.tensor([[-0.9, -0.5, 0.3, 0.8]])
    spec = QuantSpec(bits=4, symmetric=True, granularity="channel")
    q = UniformQuantizer(spec, is_weight=True, scale_shape=(1, 1))
    q.init_from(w)
    ada = AdaRoundWeight(w, q.scale, q.zero_point, spec)
    ada.hard = True
    assert (ada()[0, :2] < 0).all()


def test_regularizer_pushes_to_binary_and_schedule():
    ada = AdaRoundWeight(torch.randn(4, 8), torch.full((4, 1), 0.1), torch.zeros(4, 1), QuantSpec(bits=4))
    opt = torch.optim.Adam(ada.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        ada.regularizer(beta=2.0).backward()
        opt.step()
    h = ada.rounding()
    assert ((h < 0.01) | (h > 0.99)).float().mean() > 0.95
    s = RoundingSchedule(iterations=100)
    assert s.at(0) == (0.0, 20.0) and s.at(19)[0] == 0.0
    assert s.at(20) == (0.01, 20.0) and s.at(100)[1] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        RoundingSchedule(iterations=0)
