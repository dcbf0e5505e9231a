import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffuse.schedule import Schedule


def gaussian_eps(schedule: Schedule, mu: float, std: float):
    """The exact E[eps | x_t] for data x_0 ~ N(mu, std^2 I), as a plain (x_t, index) -> eps function.

    x_t ~ N(alpha mu, alpha^2 std^2 + sigma^2), so E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 std^2 + sigma^2).
    """

    def eps(x, index):
        t = schedule.t_from_model_time(index)
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


class GaussianMixture:
    """Data x_0 ~ sum_k pi_k N(mu_k, s_k^2 I) in D dimensions, shaped (B, D, 1, 1); its exact denoisers.

    x_t | k ~ N(alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2, so with responsibilities
    r_k(x_t) = p(k | x_t):  E[x_0 | x_t] = sum_k r_k (mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k)),
    and E[eps | x_t] = (x_t - alpha E[x_0 | x_t]) / sigma. A label y = k conditions on component k
    (r = one-hot); y = K (the null label) is the whole mixture.
    """

    def __init__(self, schedule: Schedule, weights, means, stds):
        self.schedule = schedule
        self.pi = torch.tensor(weights, dtype=torch.float64)
        self.mu = torch.tensor(means, dtype=torch.float64)  # (K, D)
        self.s = torch.tensor(stds, dtype=torch.float64)    # (K,)
        self.K, self.D = self.mu.shape

    def _scales(self, index, x):
        t = self.schedule.t_from_model_time(index)
        t = t.expand(x.shape[0])
        return self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]  # (B, 1)

    def logits(self, x, index):
        """log pi_k + log N(x_t; alpha mu_k, v_k I): log p(k | x_t) up to a constant; (B, K)."""
        x = x.flatten(1).to(torch.float64)
        a, s = self._scales(index, x)
        v = a**2 * self.s**2 + s**2                                   # (B, K)
        d2 = ((x[:, None, :] - a[:, :, None] * self.mu[None]) ** 2).sum(-1)
        return self.pi.log() - d2 / (2 * v) - self.D / 2 * torch.log(2 * torch.pi * v)

    def eps(self, x, index, label=None):
        shape, dtype = x.shape, x.dtype
        xf = x.flatten(1).to(torch.float64)
        a, s = self._scales(index, xf)
        r = torch.softmax(self.logits(x, index), dim=1)
        if label is not None:  # the component's index; K, the null label, is the whole mixture
            onehot = torch.nn.functional.one_hot(label.clamp(max=self.K - 1), self.K).to(torch.float64)
            r = torch.where((label == self.K)[:, None], r, onehot)
        v = a**2 * self.s**2 + s**2
        x0_k = self.mu[None] + (a * self.s**2 / v)[:, :, None] * (xf[:, None, :] - a[:, :, None] * self.mu[None])
        x0 = (r[:, :, None] * x0_k).sum(1)
        return ((xf - a * x0) / s).to(dtype).reshape(shape)

    def component(self, x0):
        """The nearest component of each sample (B,)."""
        return torch.cdist(x0.flatten(1).to(torch.float64), self.mu).argmin(1)


# --- processes as torchrun starts them (tests/test_ddp.py, tests/test_kinds.py) -----------------------------------------
def start_workers(argv: list[str], logs: list[Path], **env: str) -> list[subprocess.Popen]:
    """Start len(logs) workers `python *argv` with the environment torchrun gives its workers (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, a free MASTER_PORT), one thread each and no GPU, plus `env`; each writes to its log.
    Starting them directly spares the launcher's own start-up (importing torch once more costs seconds on 2 cores)."""
    world = len(logs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "PYTEST_"))}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, *argv], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                          stdout=f, stderr=subprocess.STDOUT))
    return procs


def wait_workers(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Wait for the workers; fail with the end of each one's log if one fails or they run past `timeout` seconds (then
    they are killed, only ours, by their Popen handles)."""
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
        problem = None if codes == [0] * len(procs) else f"exit codes {codes}"
    except subprocess.TimeoutExpired:
        problem = f"timed out after {timeout} s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if problem:
        output = "\n".join(f"--- rank {r} ---\n{log.read_text()[-8000:]}" for r, log in enumerate(logs))
        pytest.fail(f"the {len(procs)}-process run failed: {problem}\n{output}")


def nan_loss_from(monkeypatch, bad_step: int) -> None:
    """Make the diffusion kind's L_simple NaN from its `bad_step`-th call (0-based) on."""
    import math

    from diffuse.kinds import diffusion as diffusion_kind

    real, calls = diffusion_kind.l_simple, []

    def l_simple(*args, **kw):
        calls.append(1)
        loss = real(*args, **kw)
        return loss * math.nan if len(calls) > bad_step else loss

    monkeypatch.setattr(diffusion_kind, "l_simple", l_simple)
