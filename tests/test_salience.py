"""PTQ4DiT's salience balancing and Spearman-ρ calibration, on small tensors with known answers."""

import torch

from ditquant.methods.salience import (activation_salience, balancing_factor, calibrated_salience, spearman,
                                       weight_salience)


def test_balancing_equalises_activation_and_weight_salience():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 10, 8, generator=g) * torch.linspace(0.1, 20, 8)  # outlier channels
    w = torch.randn(16, 8, generator=g)
    f = balancing_factor(activation_salience(x), weight_salience([w]))
    sx, sw = activation_salience(x / f), weight_salience([w * f])
    torch.testing.assert_close(sx, sw)
    torch.testing.assert_close(sx, (activation_salience(x) * weight_salience([w])).sqrt())
    torch.testing.assert_close((x / f) @ (w * f).T, x @ w.T, rtol=1e-5, atol=1e-4)  # the product is unchanged


def test_shared_input_uses_the_largest_weight_column():
    a, b = torch.tensor([[1.0, -5.0]]), torch.tensor([[-3.0, 2.0]])
    assert torch.equal(weight_salience([a, b]), torch.tensor([3.0, 5.0]))


def test_ssc_weights_less_correlated_timesteps_more():
    sw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    aligned, reversed_ = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert spearman(aligned, sw) == 1.0 and spearman(reversed_, sw) == -1.0
    s, eta = calibrated_salience(torch.stack([aligned, reversed_]), sw)
    e = torch.exp(torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(eta, e / e.sum())  # η = softmax(−ρ)
    torch.testing.assert_close(s, eta[0] * aligned + eta[1] * reversed_)
