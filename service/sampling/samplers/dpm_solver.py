"""DPM-Solver (Lu et al. 2022, https://arxiv.org/abs/2206.00927): fixed-step 'fast' and adaptive.

Written as steppers in t = -log(sigma). ``eps`` evaluations are cached per step under the same
keys k-diffusion uses, so the second- and third-order stages share evaluations exactly as there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import torch
from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..k_api import drive, is_flow
from ..stepper import Callback, Eval, Model, StepIO, Stepper
from ..utils import get_ancestral_step
from .common import gaussian
from .flow_forms import flow_stepper

EpsGen = Generator[Eval, Tensor, Tensor]
StepGen = Generator[Eval, Tensor, Tensor]


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def _t(sigma: Tensor) -> Tensor:
    return -sigma.log()


class PIDStepSizeController:
    """PID controller for adaptive step sizes (Söderlind 2003), with an arctan limiter."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float = 1,
        accept_safety: float = 0.81,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: Tensor | float) -> bool:
        """Scale h from the last three inverse errors; return whether this step is accepted."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class _Solver:
    """The stage formulas of DPM-Solver-1/2/3 over one step; each eps evaluation yields."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.cache: dict[str, Tensor] = {}

    def eps(self, key: str, x: Tensor, t: Tensor) -> EpsGen:
        if key not in self.cache:
            sigma = _sigma(t)
            denoised = yield Eval(x, sigma, self.step)
            self.cache[key] = (x - denoised) / sigma
        return self.cache[key]

    # Scalar factors are combined before they multiply tensors: same formulas, fewer tensor ops.

    def step_1(self, x: Tensor, t: Tensor, t_next: Tensor) -> StepGen:
        eps = yield from self.eps("eps", x, t)
        return x - (_sigma(t_next) * (t_next - t).expm1()) * eps

    def step_2(self, x: Tensor, t: Tensor, t_next: Tensor, r1: float = 1 / 2) -> StepGen:
        h = t_next - t
        eps = yield from self.eps("eps", x, t)
        s1 = t + r1 * h
        u1 = x - (_sigma(s1) * (r1 * h).expm1()) * eps
        eps_r1 = yield from self.eps("eps_r1", u1, s1)
        a = _sigma(t_next) * h.expm1()  # x_2 = x - a * eps - a / (2 r1) * (eps_r1 - eps)
        b = a / (2 * r1)
        return x - (a - b) * eps - b * eps_r1

    def step_3(self, x: Tensor, t: Tensor, t_next: Tensor, r1: float = 1 / 3, r2: float = 2 / 3) -> StepGen:
        h = t_next - t
        eps = yield from self.eps("eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - (_sigma(s1) * (r1 * h).expm1()) * eps
        eps_r1 = yield from self.eps("eps_r1", u1, s1)
        sigma_s2, e2 = _sigma(s2), (r2 * h).expm1()
        a2 = sigma_s2 * e2  # u2 = x - a2 * eps - b2 * (eps_r1 - eps)
        b2 = sigma_s2 * (r2 / r1) * (e2 / (r2 * h) - 1)
        u2 = x - (a2 - b2) * eps - b2 * eps_r1
        eps_r2 = yield from self.eps("eps_r2", u2, s2)
        sigma_next, e = _sigma(t_next), h.expm1()
        a = sigma_next * e  # x_3 = x - a * eps - b * (eps_r2 - eps)
        b = sigma_next / r2 * (e / h - 1)
        return x - (a - b) * eps - b * eps_r2


def _info_callback(callback: Callback | None, info: dict[str, Any]) -> None:
    if callback is not None:
        callback({"sigma": _sigma(info["t"]), "sigma_hat": _sigma(info["t_up"]), **info})


def _ancestral_t(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    """(t_next_, su): the deterministic part of an ancestral step from t to t_next ends at t_next_."""
    if not eta:
        return t_next, 0.0
    sd, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, _t(sd))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


def _log_range(x: Tensor, sigma_min: float, sigma_max: float, io: StepIO) -> tuple[Any, Tensor, Tensor]:
    """(noise sampler, t_start, t_end): where both solvers start and end in t = -log(sigma)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise InputError("sigma_min", "sigma_min and sigma_max must not be 0")
    return gaussian(x, io.noise_sampler), _t(torch.as_tensor(sigma_max)), _t(torch.as_tensor(sigma_min))


def _range_sampler(**traits: Any) -> Callable[[Callable[..., Stepper]], Callable[..., Stepper]]:
    """Both solvers' registration: third order, Gaussian noise, (sigma_min, sigma_max) for sigmas."""
    return sampler(order=3, noise="gaussian", sigma_range=True, origin="k-diffusion", **traits)


# k-diffusion's own signatures for these two (sigma_min, sigma_max[, n] instead of sigmas); the
# registry makes every other sample_<name> from its stepper.


def _range_run(
    fn: Any, model: Model, x: Tensor, sigma_min: float, sigma_max: float, eta: float, *args: Any
) -> Callable[..., Stepper]:
    """``run(io, **options)``: ``fn(x, sigma_min, sigma_max, *args, io, **options)``, or with eta > 0 on
    a flow-matching model its flow form (VE coordinates, as the registered sampler runs there)."""
    if not (is_flow(model, sigma_max, fn.__name__) and eta > 0):
        return lambda io, **kw: fn(x, sigma_min, sigma_max, *args, io, **kw)

    def ve(xv: Tensor, sv: Tensor, *, callback: Any, noise_sampler: Any, **kw: Any) -> Stepper:
        # sv = [sigma_max, sigma_min] in VE units; fn ends at sigma_min, where flow_stepper maps back
        return fn(xv, float(sv[-1]), float(sv[0]), *args, StepIO(callback, noise_sampler), **kw)

    flow = flow_stepper(ve)
    ends = torch.tensor([sigma_max, sigma_min], dtype=torch.float64, device=x.device)
    return lambda io, **kw: flow(x, ends, callback=io.callback, noise_sampler=io.noise_sampler, **kw)


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
    run = _range_run(dpm_fast, model, x, sigma_min, sigma_max, eta, n)
    return drive(
        lambda cb: run(StepIO(cb, noise_sampler), eta=eta, s_noise=s_noise),
        model,
        extra_args,
        callback,
        disable,
        n,
    )


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
    options: dict[str, Any] = {
        "order": order,
        "rtol": rtol,
        "atol": atol,
        "h_init": h_init,
        "pcoeff": pcoeff,
        "icoeff": icoeff,
        "dcoeff": dcoeff,
        "accept_safety": accept_safety,
        "eta": eta,
        "s_noise": s_noise,
    }

    run = _range_run(dpm_adaptive, model, x, sigma_min, sigma_max, eta)

    def make(cb: Callback | None) -> Stepper:
        return run(StepIO(cb, noise_sampler), info=info, **options)

    x = drive(make, model, extra_args, callback, disable, None)
    return (x, info) if return_info else x


@_range_sampler(sample=sample_dpm_fast, aliases=("DPM fast",))
def dpm_fast(
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    io: StepIO,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Stepper:
    """DPM-Solver-Fast: orders 3,3,...,(2,1) on steps uniform in log sigma, exactly n evaluations."""
    noise_sampler, t_start, t_end = _log_range(x, sigma_min, sigma_max, io)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError("n", f"n (model evaluations) must be an integer >= 1, got {n!r}")
    if eta < 0:
        raise InputError("eta", f"eta must be >= 0, got {eta!r}")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        solver = _Solver(i)
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _ancestral_t(t, t_next, t_end, eta)
        eps = yield from solver.eps("eps", x, t)
        _info_callback(io.callback, {"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": x - _sigma(t) * eps})
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = yield from step(x, t, t_next_)
        if eta:  # k-diffusion draws (and discards) noise here even when eta = 0
            x = x + su * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


@_range_sampler(
    nfe_per_step=3,
    batch_coupled=True,
    adaptive=True,
    options={
        "order": Bounds(choices=(2, 3)),
        "rtol": Bounds(lo=1e-6, hi=10.0),
        "atol": Bounds(lo=1e-6, hi=10.0),
        "h_init": Bounds(lo=1e-4, hi=10.0),
        # PID gains: outside this box the step size controller can diverge (measured on the
        # digits model: icoeff -1, dcoeff -1 or pcoeff -1 give NaN), inside it every corner ran.
        "pcoeff": Bounds(lo=0.0, hi=1.0),
        "icoeff": Bounds(lo=0.05, hi=2.0),
        "dcoeff": Bounds(lo=0.0, hi=1.0),
        "accept_safety": Bounds(lo=0.0, hi=1.0),
    },
    internal=("info",),
    sample=sample_dpm_adaptive,
    aliases=("DPM adaptive",),
)
def dpm_adaptive(
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    io: StepIO,
    *,
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
    info: dict[str, int] | None = None,
) -> Stepper:
    """DPM-Solver-12/23 with embedded error estimates and PID step size control."""
    noise_sampler, t_start, t_end = _log_range(x, sigma_min, sigma_max, io)
    if order not in {2, 3}:
        raise InputError("order", "order should be 2 or 3", [2, 3])
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value < 0:
            raise InputError(name, f"{name} must be >= 0, got {value!r}")
    if h_init == 0:
        raise InputError("h_init", "h_init must be nonzero")
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise InputError("eta", "eta must be 0 for reverse sampling", [0])
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    s, x_prev = t_start, x
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {} if info is None else info
    info.update(steps=0, nfe=0, n_accept=0, n_reject=0)
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        solver = _Solver(info["steps"])
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        t_, su = _ancestral_t(s, t, t_end, eta)
        eps = yield from solver.eps("eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = yield from solver.step_1(x, s, t_)
            x_high = yield from solver.step_2(x, s, t_)
        else:
            x_low = yield from solver.step_2(x, s, t_, r1=1 / 3)
            x_high = yield from solver.step_3(x, s, t_)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(_sigma(s), _sigma(t)) if eta else x_high
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        _info_callback(
            io.callback,
            {
                "x": x,
                "i": info["steps"] - 1,
                "t": s,
                "t_up": s,
                "denoised": denoised,
                "error": error,
                "h": pid.h,
                **info,
            },
        )
    return x
