import pytest
import torch

from diffuse.schedule import Schedule


def gaussian_eps(schedule: Schedule, mu: float, std: float):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, std^2 I), as a plain (x_t, index) -> eps function.

    x_t ~ N(alpha mu, alpha^2 std^2 + sigma^2), so E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 std^2 + sigma^2).
    """

    def eps(x, index):
        t = (index.to(torch.float64) + 1) / schedule.T
        a = schedule.alpha(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        s = schedule.sigma(t).to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return s * (x - a * mu) / (a**2 * std**2 + s**2)

    return eps


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and lose a lot when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
