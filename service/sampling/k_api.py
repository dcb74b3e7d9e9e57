"""k-diffusion compatible API: ``sample_<name>(model, x, sigmas, extra_args, callback, disable, **options)``.

Each function drives the one stepper of its sampler with :func:`.stepper.run`; code written against
k-diffusion switches by changing one import. ``sample_dpm_fast`` and ``sample_dpm_adaptive`` keep
k-diffusion's own signatures (sigma_min, sigma_max[, n]) instead of a sigma list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import dpm_solver, samplers
from .stepper import Callback, Model, Stepper, run

_HEAD = ["model", "x", "sigmas"]
_TAIL = {"extra_args": None, "callback": None, "disable": None}


def _progress(
    callback: Callback | None, disable: bool | None, total: int | None
) -> tuple[Callback | None, Any]:
    """Wrap the user's callback so a tqdm bar advances once per step (nothing when disable=True)."""
    if disable is True:
        return callback, None
    bar = tqdm(total=total, disable=disable)

    def cb(info: dict[str, Any]) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    return cb, bar


def _signature(stepper: Callable[..., Stepper], head: list[str]) -> inspect.Signature:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in head]
    params += [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in _TAIL.items()
    ]
    for p in inspect.signature(stepper).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("callback", "info"):
            params.append(p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(params)


def k_sampler(stepper: Callable[..., Stepper]) -> Callable[..., Tensor]:
    """Make ``sample_<name>(model, x, sigmas, ...)`` from a stepper ``name(x, sigmas, *, ...)``."""
    sig = _signature(stepper, _HEAD)

    @torch.no_grad()
    def sample(*args: Any, **kwargs: Any) -> Tensor:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        model, x, sigmas = a.pop("model"), a.pop("x"), a.pop("sigmas")
        extra_args, disable = a.pop("extra_args"), a.pop("disable")
        callback, bar = _progress(a.pop("callback"), disable, len(sigmas) - 1)
        try:
            return run(stepper(x, sigmas, callback=callback, **a), model, extra_args)
        finally:
            if bar is not None:
                bar.close()

    sample.__name__ = sample.__qualname__ = f"sample_{stepper.__name__}"
    sample.__doc__ = stepper.__doc__
    sample.__signature__ = sig  # type: ignore[attr-defined]
    return sample


sample_euler = k_sampler(samplers.euler)
sample_euler_ancestral = k_sampler(samplers.euler_ancestral)
sample_heun = k_sampler(samplers.heun)
sample_dpm_2 = k_sampler(samplers.dpm_2)
sample_dpm_2_ancestral = k_sampler(samplers.dpm_2_ancestral)
sample_lms = k_sampler(samplers.lms)
sample_dpmpp_2s_ancestral = k_sampler(samplers.dpmpp_2s_ancestral)
sample_dpmpp_sde = k_sampler(samplers.dpmpp_sde)
sample_dpmpp_2m = k_sampler(samplers.dpmpp_2m)
sample_dpmpp_2m_sde = k_sampler(samplers.dpmpp_2m_sde)
sample_dpmpp_3m_sde = k_sampler(samplers.dpmpp_3m_sde)


@torch.no_grad()
def sample_dpm_fast(
    model: Model,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: Any = None,
) -> Tensor:
    """DPM-Solver-Fast (fixed step size). See https://arxiv.org/abs/2206.00927."""
    cb, bar = _progress(callback, disable, n)
    try:
        stepper = dpm_solver.dpm_fast(
            x, sigma_min, sigma_max, n, callback=cb, noise_sampler=noise_sampler, eta=eta, s_noise=s_noise
        )
        return run(stepper, model, extra_args)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: Any = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, int]]:
    """DPM-Solver-12 and 23 (adaptive step size). See https://arxiv.org/abs/2206.00927."""
    info: dict[str, int] = {}
    cb, bar = _progress(callback, disable, None)
    try:
        stepper = dpm_solver.dpm_adaptive(
            x,
            sigma_min,
            sigma_max,
            callback=cb,
            noise_sampler=noise_sampler,
            order=order,
            rtol=rtol,
            atol=atol,
            h_init=h_init,
            pcoeff=pcoeff,
            icoeff=icoeff,
            dcoeff=dcoeff,
            accept_safety=accept_safety,
            eta=eta,
            s_noise=s_noise,
            info=info,
        )
        x = run(stepper, model, extra_args)
    finally:
        if bar is not None:
            bar.close()
    return (x, info) if return_info else x
