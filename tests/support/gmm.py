"""An analytic Gaussian-mixture denoiser and its probability-flow ODE reference.

Data: x0 ~ sum_k w_k N(mu_k, s_k^2 I) in ``dim`` dimensions. Then x = x0 + sigma * n has
p_sigma(x) = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I) and the exact denoiser is
D(x; sigma) = sum_k gamma_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
gamma_k the posterior responsibilities. The reference maps start points at sigma_max to
sigma_min along the ODE dx/dlog(sigma) = x - D(x; sigma), solved by scipy (DOP853, rtol 1e-13)
and cached in tests/data/gmm_ode_reference.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DIM = 2
WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[1.5, 0.5], [-1.0, 1.0], [0.0, -1.5]])
STDS = np.array([0.3, 0.5, 0.4])
SIGMA_MIN, SIGMA_MAX = 0.02, 20.0
N_POINTS = 16
CACHE = Path(__file__).resolve().parent.parent / "data" / "gmm_ode_reference.npz"


class GMMDenoiser:
    """Exact D(x; sigma) for the mixture; rows are independent, any float dtype, x of shape [B, DIM]."""

    sigma_min, sigma_max, sigma_data = SIGMA_MIN, SIGMA_MAX, 1.0
    num_classes = 0

    def __init__(
        self, weights: np.ndarray = WEIGHTS, means: np.ndarray = MEANS, stds: np.ndarray = STDS
    ) -> None:
        self.w, self.mu, self.s = (torch.as_tensor(a, dtype=torch.float64) for a in (weights, means, stds))

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: object) -> Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(shape[0], -1).double()
        sigma = sigma.double().reshape(-1, 1)  # [B, 1]
        var = self.s**2 + sigma**2  # [B, K]
        diff = x[:, None, :] - self.mu[None]  # [B, K, D]
        logp = torch.log(self.w) - 0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[1] * torch.log(var)
        gamma = torch.softmax(logp, dim=1)  # [B, K]
        post = self.mu[None] + (self.s**2 / var)[..., None] * diff  # [B, K, D]
        return (gamma[..., None] * post).sum(1).reshape(shape).to(dtype)

    def sample_data(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, DIM, generator=generator, dtype=torch.float64)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the data distribution."""
        mean = (self.w[:, None] * self.mu).sum(0)
        second = sum(
            self.w[k]
            * (torch.outer(self.mu[k], self.mu[k]) + self.s[k] ** 2 * torch.eye(DIM, dtype=torch.float64))
            for k in range(len(self.w))
        )
        return mean, second - torch.outer(mean, mean)


def start_points() -> Tensor:
    """Fixed unit-variance start noise (float64), scaled by SIGMA_MAX by the caller."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N_POINTS, DIM, generator=g, dtype=torch.float64)


def _solve(x_start: np.ndarray) -> np.ndarray:
    from scipy.integrate import solve_ivp

    model = GMMDenoiser()

    def f(u: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y.reshape(N_POINTS, DIM))
        d = model(x, torch.full((N_POINTS,), np.exp(u), dtype=torch.float64))
        return (x - d).numpy().ravel()

    sol = solve_ivp(
        f, (np.log(SIGMA_MAX), np.log(SIGMA_MIN)), x_start.ravel(), method="DOP853", rtol=1e-13, atol=1e-13
    )
    assert sol.success, sol.message
    return sol.y[:, -1].reshape(N_POINTS, DIM)


def _params() -> np.ndarray:
    return np.concatenate([WEIGHTS, MEANS.ravel(), STDS, [SIGMA_MIN, SIGMA_MAX, N_POINTS]])


def ode_reference() -> tuple[Tensor, Tensor]:
    """(x at SIGMA_MAX, exact ODE solution at SIGMA_MIN), from the cache; recomputed if parameters changed."""
    x_start = (start_points() * SIGMA_MAX).numpy()
    if CACHE.exists():
        data = np.load(CACHE)
        if np.array_equal(data["params"], _params()) and np.array_equal(data["x_start"], x_start):
            return torch.from_numpy(x_start), torch.from_numpy(data["x_end"])
    x_end = _solve(x_start)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, params=_params(), x_start=x_start, x_end=x_end)
    return torch.from_numpy(x_start), torch.from_numpy(x_end)


# A second mixture for held-out checks of tuned solvers (issue 28 §6): fixed before any solver was
# measured on it, and never used to choose a method, an option or a regularisation weight.
UNSEEN_MIXTURE = {
    "weights": np.array([0.35, 0.3, 0.2, 0.15]),
    "means": np.array([[-1.5, -0.5], [1.2, 1.2], [0.5, -1.8], [-0.6, 1.9]]),
    "stds": np.array([0.2, 0.45, 0.3, 0.25]),
}
