"""Schedules that need a model's discrete sigma table (DDPM-trained models such as Stable Diffusion).

Each is called as ``fn(n, model, device=...)`` where ``model.sigmas`` is the ascending table
(index t = 0 .. T-1). All return n + 1 descending sigmas ending in 0. Timesteps between table
entries map to sigmas by linear interpolation in log sigma (k-diffusion's ``t_to_sigma``).

- ``normal``: n timesteps uniform from T-1 to 0 (k-diffusion ``get_sigmas(n)``; A1111 "uniform").
- ``sgm_uniform``: n + 1 timesteps uniform from T-1 to 0, the last dropped (SGM / SDXL reference).
- ``simple``: every T/n-th table entry counted down from the top (ComfyUI "simple").
- ``ddim_uniform``: timesteps 1 + k * (T // n), k = 0 .. n-1 (diffusers "leading" spacing, offset 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .catalog import schedule
from .schedules import _check_n


def _table(model: Any, device: torch.device | str) -> Tensor:
    sigmas = getattr(model, "sigmas", None)
    if sigmas is None:
        raise ValueError("this schedule needs a model with a discrete sigma table (model.sigmas)")
    table = torch.as_tensor(sigmas, dtype=torch.float32).detach().to(device)
    if table.ndim != 1 or len(table) < 2:
        raise ValueError("model.sigmas must be a 1-D table of at least two sigmas")
    return table


def _t_to_sigma(table: Tensor, t: Tensor) -> Tensor:
    log_sigmas = table.log()
    t = t.clamp(0, len(table) - 1)
    lo, hi = t.floor().long(), t.ceil().long()
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def _finish(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


@schedule(
    discrete=True,
    doc="uniform in t over the model's discrete table (A1111 'uniform')",
    aliases=("Normal", "Uniform", "linspace"),
)
def get_sigmas_normal(n: int, model: Any, device: torch.device | str = "cpu") -> Tensor:
    """Uniform in t from T-1 to 0 (n sigmas) plus a final 0."""
    _check_n(n)
    table = _table(model, device)
    t = torch.linspace(len(table) - 1, 0, n, device=table.device, dtype=torch.float64).float()
    return _finish(_t_to_sigma(table, t))


@schedule(discrete=True, doc="uniform in t, n+1 points with the last dropped (SGM)", aliases=("SGM Uniform",))
def get_sigmas_sgm_uniform(n: int, model: Any, device: torch.device | str = "cpu") -> Tensor:
    """n + 1 points uniform in t from T-1 to 0, the last (t = 0) replaced by 0."""
    _check_n(n)
    table = _table(model, device)
    t = torch.linspace(len(table) - 1, 0, n + 1, device=table.device, dtype=torch.float64)[:-1].float()
    return _finish(_t_to_sigma(table, t))


@schedule(
    discrete=True, doc="every T/n-th entry of the model's table, from the top", aliases=("Simple", "trailing")
)
def get_sigmas_simple(n: int, model: Any, device: torch.device | str = "cpu") -> Tensor:
    """Table entries T-1 - floor(k * T / n), k = 0 .. n-1, plus a final 0."""
    _check_n(n)
    table = _table(model, device)
    big_t = len(table)
    idx = [big_t - 1 - int(k * big_t / n) for k in range(n)]
    return _finish(table[torch.tensor(idx, device=table.device).clamp(0, big_t - 1)])


@schedule(discrete=True, doc="DDIM 'leading' timesteps 1 + k*(T//n)", aliases=("DDIM uniform", "leading"))
def get_sigmas_ddim_uniform(n: int, model: Any, device: torch.device | str = "cpu") -> Tensor:
    """Timesteps 1 + k * max(T // n, 1), k = n-1 .. 0, plus a final 0 (offset 0 where 1 would overflow)."""
    _check_n(n)
    table = _table(model, device)
    big_t = len(table)
    stride = max(big_t // n, 1)
    offset = 1 if 1 + (n - 1) * stride <= big_t - 1 else 0
    idx = [min(offset + k * stride, big_t - 1) for k in reversed(range(n))]
    return _finish(table[torch.tensor(idx, device=table.device)])
