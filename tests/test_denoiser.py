import pytest
import torch

from diffuse import Denoiser, Schedule
from diffuse.denoiser import eps_to_score, predict, training_target


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction):
    """For x_t = alpha x0 + sigma eps, a network that outputs the exact target recovers (x0, eps)."""
    g = torch.Generator().manual_seed(0)
    s = Schedule.cosine()
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x0, eps = torch.randn(2, 8, 3, 4, 4, generator=g, dtype=torch.float64)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in (s.alpha(t), s.sigma(t)))
    x_t = alpha * x0 + sigma * eps
    pred = predict(training_target(x0, eps, alpha, sigma, prediction), x_t, alpha, sigma, prediction)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)


def test_v_is_the_rotation_of_salimans_and_ho():
    """v = alpha eps - sigma x0 (Salimans & Ho 2022): with alpha = cos phi, sigma = sin phi, v = d x_t / d phi."""
    phi = torch.tensor(0.7, dtype=torch.float64)
    x0, eps = torch.tensor(1.3, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    h = 1e-6
    x_t = lambda p: torch.cos(p) * x0 + torch.sin(p) * eps  # noqa: E731
    dxdphi = (x_t(phi + h) - x_t(phi - h)) / (2 * h)
    v = training_target(x0, eps, torch.cos(phi), torch.sin(phi), "v")
    assert float(v) == pytest.approx(float(dxdphi), rel=1e-8)


def test_score_of_a_gaussian():
    """For q(x_t) = N(0, 1) (VP with x_0 ~ N(0, 1)), E[eps|x_t] = sigma x_t and the score is -x_t."""
    x_t = torch.randn(5, dtype=torch.float64)
    sigma = torch.tensor(0.6, dtype=torch.float64)
    torch.testing.assert_close(eps_to_score(sigma * x_t, sigma), -x_t)


def test_plain_function_as_network_gets_the_step_index():
    s = Schedule.linear()
    seen = {}

    def eps_fn(x, index):
        seen["index"] = index
        return torch.zeros_like(x)

    den = Denoiser(eps_fn, s)
    x = torch.ones(3, 1, 2, 2)
    pred = den(x, torch.tensor(1.0))
    assert seen["index"].tolist() == [999.0] * 3
    # eps = 0 means x_t = alpha x0
    torch.testing.assert_close(pred.x0, x / s.alpha(torch.tensor(1.0)).float())


def test_errors():
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x, t: x, Schedule.linear(), prediction="score")
    bad = Denoiser(lambda x, t: x[:, :1], Schedule.linear())
    with pytest.raises(ValueError, match="returned shape"):
        bad(torch.zeros(2, 3, 4, 4), torch.tensor(0.5))
