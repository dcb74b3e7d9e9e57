"""Schedules tuned to one model: sigmas that make a sampler's few-step result match a fine teacher.

:func:`tune_schedule` distils the step sizes of a deterministic sampler at a fixed number of model
calls from the model's own trajectories, in the spirit of Optimal Stepsize Distillation (Pei et al.
2025, https://arxiv.org/abs/2503.01719) and Align Your Steps (Sabour et al. 2024): a high-order
teacher at many steps gives the target x0 of the caller's calibration noise; the start is the best
of a few fixed schedules, then Levenberg-Marquardt on the log-sigmas (Jacobian by forward
differences through the unmodified stepper, so every deterministic sampler, multistep ones
included, is tuned as it runs) minimises the mean squared distance to the teacher's x0.

With ``solver=True`` the solver is tuned too: a sampler that takes per-step ``coefficients``
(``ipndm_tuned``) gets them fitted jointly with the time steps, from the tuned schedule and its
analytic coefficients, by the same Levenberg-Marquardt on the same residual, regularised toward the
analytic coefficients (S4S, Frankel et al. 2025, fits a solver's coefficients to a teacher this way;
DPM-Solver-v3 and AMED-Solver fit a few per-step numbers to the model too).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import registry
from .catalog import DETERMINISTIC_MODES
from .registry import SamplerInfo
from .stepper import Model, NonFiniteError, run

METHODS = ("lm", "search")
INIT_SCHEDULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("karras", {}),
    ("karras", {"rho": 3.0}),
    ("exponential", {}),
    ("kl_optimal", {}),
)
MIN_LOG_GAP = 1e-3  # neighbouring sigmas differ by at least 0.1 % (no repeats, even in float32)
MAX_STEPS = 1000
# The coefficient penalty: reg * mean((c - c_analytic)^2) against the schedule-only squared error taken
# as 1 (scale-free across models). Unless the caller gives one, each of these is fitted on the first
# 3/4 of the calibration draws and the one closest to the teacher on the last 1/4 is kept (no
# held-out draw chooses it); the range was set on the project's own mixture (tests/support/gmm.py).
SOLVER_REGS = (1e-2, 1e-1, 1.0)
Progress = Callable[[int, int], None]


class TuningError(ValueError):
    """Input tune_schedule cannot tune for (nfe, sampler, options) or a model that fails during tuning."""


@dataclass
class TuneResult:
    """Tuned sigmas and how they were made (errors are RMS distances to the teacher's x0)."""

    sigmas: Tensor
    sampler: str
    nfe: int
    steps: int
    options: dict[str, Any]
    method: str
    init: str
    rms_karras: float
    rms_init: float
    rms_tuned: float
    iterations: int = 0
    runs: int = 0
    seconds: float = 0.0
    teacher: dict[str, Any] = field(default_factory=dict)
    coefficients: list[float] | None = None  # the fitted solver (solver=True), flat, step by step
    rms_schedule: float | None = None  # solver=True: the calibration RMS of the tuned schedule alone
    schedule_sigmas: Tensor | None = None  # solver=True: that schedule (before the joint fit)
    reg: float | None = None
    validation: dict[str, float] = field(default_factory=dict)  # reg -> RMS on the validation quarter


def steps_for_nfe(info: SamplerInfo, nfe: int, options: Mapping[str, Any] | None = None) -> int:
    """The step count giving exactly ``nfe`` model calls (registry ``expected_nfe``); else a TuningError."""
    allowed: dict[int, int] = {}
    for steps in range(1, MAX_STEPS + 1):
        calls = info.expected_nfe(steps, options)
        allowed.setdefault(calls, steps)
        if calls > max(nfe, 20):
            break
    if nfe in allowed:
        return allowed[nfe]
    shown = ", ".join(str(v) for v in sorted(allowed) if v <= max(nfe, 20))
    low = min(allowed)
    why = f"below its minimum of {low}" if nfe < low else "not a count it can make"
    raise TuningError(
        f"sampler {info.name!r} cannot make exactly {nfe} model calls ({why}); allowed: {shown}, ..."
    )


def deterministic_options(info: SamplerInfo, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sampler's options in its deterministic (ODE) mode; a TuningError if it has none."""
    opts = registry.check_options("sampler", info.name, info.bounds, dict(options or {}))
    if info.sigma_range or info.batch_coupled:
        raise TuningError(
            f"sampler {info.name!r} uses only the schedule's first and last sigma (or adapts its own "
            "steps): there is no schedule to tune"
        )
    if not info.stochastic:
        return opts
    for key, value in DETERMINISTIC_MODES:
        if key in info.bounds:
            if key in opts and opts[key] != value:
                raise TuningError(
                    f"sampler {info.name!r} draws noise with {key}={opts[key]}; tune it at {key}={value}"
                )
            return {**opts, key: value}
    raise TuningError(
        f"sampler {info.name!r} is stochastic and has no deterministic mode (eta=0, gamma=0, "
        "restart_times=0): a schedule can only be tuned for a deterministic sampler"
    )


def _fixed_sigmas(name: str, steps: int, lo: float, hi: float, opts: dict[str, Any]) -> Tensor:
    return registry.schedule_sigmas(name, steps, lo, hi, **opts).double()


def _sigmas(theta: Tensor, lo: float, hi: float) -> Tensor:
    """Stick-breaking logits -> [hi, s_1, ..., s_k, 0]: each log-gap is MIN_LOG_GAP plus sigmoid(theta_i)
    of what is left down to ``lo`` (descending, inside (lo, hi); s_i depends on theta_1..theta_i only)."""
    k, log_lo = theta.numel(), math.log(lo)
    out, log_s = [theta.new_tensor(hi)], theta.new_tensor(math.log(hi))
    for i, v in enumerate(torch.sigmoid(theta)):
        room = (log_s - log_lo - MIN_LOG_GAP * (k - i)).clamp_min(0.0)
        log_s = log_s - MIN_LOG_GAP - v * room
        out.append(log_s.exp())
    return torch.stack([*out, theta.new_tensor(0.0)])


def _logits(sigmas: Tensor, lo: float, hi: float) -> Tensor:
    """Inverse of :func:`_sigmas` for a schedule from ``hi`` to ``lo`` (fractions within [1e-3, 0.999])."""
    logs, k = sigmas[:-1].clamp(lo, hi).log().tolist(), len(sigmas) - 2
    out, log_s = [], math.log(hi)
    for i in range(k):
        room = max(log_s - math.log(lo) - MIN_LOG_GAP * (k - i), 1e-12)
        v = min(max((log_s - logs[i + 1] - MIN_LOG_GAP) / room, 1e-3), 1 - 1e-3)
        out.append(math.log(v / (1 - v)))
        log_s = log_s - MIN_LOG_GAP - v * room
    return sigmas.new_tensor(out)


class _Objective:
    """Residual (student x0 - teacher x0) of a schedule, counting sampler runs."""

    def __init__(
        self, info: SamplerInfo, opts: dict[str, Any], model: Model, x: Tensor, target: Tensor, extra: dict
    ) -> None:
        self.info, self.opts, self.model, self.extra = info, opts, model, extra
        self.x, self.target, self.runs = x, target, 0
        self.base: dict[tuple[float, bytes], Tensor] = {}  # the calls of the current point's run
        self.last: dict[tuple[float, bytes], Tensor] = {}

    def keep(self) -> None:
        """Reuse the last run's model calls (a perturbed schedule shares the calls before its change)."""
        self.base = self.last

    def _call(self, x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).digest()
        key = (float(sigma.flatten()[0]), digest)
        out = self.base.get(key)
        if out is None:
            out = self.model(x, sigma, **kw)
        self.last[key] = out
        return out

    def residual(
        self, sigmas: Tensor, strict: bool = False, coefficients: Tensor | None = None
    ) -> Tensor | None:
        """Flattened float64 residual; None when the run is not finite (unless strict: then an error).
        ``coefficients``: the solver's (a sampler that takes them), else its own."""
        self.runs += 1
        opts = self.opts if coefficients is None else {**self.opts, "coefficients": coefficients.tolist()}
        if not strict and not bool((sigmas[1:-1] < sigmas[:-2]).all()):
            return None  # gaps that underflowed to repeated sigmas
        try:
            self.last = {}
            out = run(self.info.stepper(self.x * sigmas[0], sigmas, **opts), self._call, self.extra)
        except NonFiniteError as exc:
            if strict:
                raise TuningError(f"tune_schedule: the model's output is not finite: {exc}") from exc
            return None
        except (ArithmeticError, ValueError):  # a candidate the sampler cannot step (division by 0, ...)
            if strict:
                raise
            return None
        r = (out.double() - self.target).flatten()
        if not bool(torch.isfinite(r).all()):
            if strict:
                raise TuningError(f"tune_schedule: sampler {self.info.name!r} diverged on the start schedule")
            return None
        return r


def _rms(r: Tensor | None) -> float:
    return math.inf if r is None else float(r.pow(2).mean().sqrt())


Residual = Callable[[Tensor], Tensor | None]


def _levenberg_marquardt(
    obj: _Objective, fun: Residual, theta: Tensor, r: Tensor, iters: int, progress: Progress | None
) -> tuple[Tensor, Tensor, int]:
    """Damped Gauss-Newton on the parameters ``theta`` of ``fun`` (the gap logits, and the solver's
    coefficients), forward-difference Jacobian (Levenberg 1944, Marquardt 1963)."""
    h = 1e-6 if obj.x.dtype == torch.float64 else 1e-3
    lam, done = 1e-2, 0
    obj.keep()  # r is the last run's residual
    for it in range(iters):
        cols = []
        for j in range(theta.numel()):
            dt = theta.clone()
            dt[j] += h
            rj = fun(dt)
            cols.append(torch.zeros_like(r) if rj is None else (rj - r) / h)
        jac = torch.stack(cols, 1)
        a, g = jac.T @ jac, jac.T @ r
        scale = torch.diag(a) + 1e-9 * float(torch.diag(a).max()) + 1e-300
        gain = 0.0
        for _ in range(8):
            cand = theta + torch.linalg.solve(a + torch.diag(lam * scale), -g)
            rc = fun(cand)
            if rc is not None and _rms(rc) < _rms(r):
                gain = 1 - _rms(rc) / _rms(r)
                theta, r, lam = cand, rc, max(lam / 4, 1e-9)
                obj.keep()
                break
            lam *= 4
        done = it + 1
        if progress is not None:
            progress(done, iters)
        if gain < 1e-5:
            break
    return theta, r, done


def _descend(
    obj: _Objective, theta: Tensor, lo: float, hi: float, iters: int, progress: Progress | None
) -> tuple[float, Tensor, int] | None:
    """(RMS, sigmas, iterations) of Levenberg-Marquardt from ``theta``; None if its schedule does not run."""

    def fun(t: Tensor) -> Tensor | None:
        return obj.residual(_sigmas(t, lo, hi))

    r = fun(theta)
    if r is None:
        return None
    theta, r, its = _levenberg_marquardt(obj, fun, theta, r, iters, progress)
    return _rms(r), _sigmas(theta, lo, hi), its


def takes_coefficients(info: SamplerInfo) -> bool:
    """Whether the sampler's steps take fitted ``coefficients`` (``ipndm_tuned``)."""
    return "coefficients" in inspect.signature(info.stepper).parameters


def analytic_coefficients(info: SamplerInfo, steps: int, opts: Mapping[str, Any]) -> list[float]:
    """The coefficients with which a coefficient-taking sampler is its analytic self."""
    from .samplers.tuned_multistep import analytic_coefficients as ipndm_coefficients

    return ipndm_coefficients(steps, int(opts.get("max_order", info.options["max_order"])))


def _fit_solver(
    obj: _Objective,
    sigmas: Tensor,
    c0: list[float],
    lo: float,
    hi: float,
    reg: float,
    iters: int,
    progress: Progress | None,
) -> tuple[Tensor, Tensor, int]:
    """(sigmas, coefficients, iterations): Levenberg-Marquardt on the gap logits and the per-step
    coefficients together, from the tuned schedule and the analytic coefficients ``c0``. The
    residual is the run's (scaled so the start's mean square is 1) stacked over
    sqrt(reg / m) (c - c0): the coefficients stay near the analytic solver's unless the teacher's
    trajectories pay for the move."""
    k, c_start = len(sigmas) - 2, sigmas.new_tensor(c0)
    theta0 = _logits(sigmas, lo, hi) if k > 0 else sigmas.new_zeros(0)
    r0 = obj.residual(sigmas)
    assert r0 is not None  # the tuned schedule ran
    scale = 1.0 / max(float(r0.pow(2).sum().sqrt()), 1e-300)
    weight = math.sqrt(reg / max(len(c0), 1))

    def split(p: Tensor) -> tuple[Tensor, Tensor]:
        return (_sigmas(p[:k], lo, hi) if k > 0 else sigmas), p[k:]

    def fun(p: Tensor) -> Tensor | None:
        sig, c = split(p)
        r = obj.residual(sig, coefficients=c)
        return None if r is None else torch.cat([r * scale, weight * (c - c_start)])

    p = torch.cat([theta0, c_start])
    r = fun(p)
    if r is None:
        return sigmas, c_start, 0
    p, r, its = _levenberg_marquardt(obj, fun, p, r, iters, progress)
    sig, c = split(p)
    return sig, c, its


def _rows(extra: dict, n: int, part: slice) -> dict:
    """The conditioning of the calibration rows ``part`` (tensors with one row per draw are sliced)."""
    return {
        k: v[part] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v for k, v in extra.items()
    }


def _choose_reg(
    obj: _Objective, sigmas: Tensor, c0: list[float], lo: float, hi: float, iters: int
) -> tuple[float, dict[str, float]]:
    """The SOLVER_REGS value whose fit on the first 3/4 of the calibration draws comes closest to the
    teacher on the last 1/4 (fewer than 8 draws: the middle one, unvalidated)."""
    n = obj.x.shape[0]
    if n < 8:
        return SOLVER_REGS[len(SOLVER_REGS) // 2], {}
    cut = slice(0, n * 3 // 4), slice(n * 3 // 4, n)
    fit_obj, val_obj = (
        _Objective(obj.info, obj.opts, obj.model, obj.x[p], obj.target[p], _rows(obj.extra, n, p))
        for p in cut
    )
    scores: dict[str, float] = {}
    for reg in SOLVER_REGS:
        sig, c, _ = _fit_solver(fit_obj, sigmas, c0, lo, hi, reg, iters, None)
        scores[f"{reg:g}"] = _rms(val_obj.residual(sig, coefficients=c))
        obj.runs += fit_obj.runs + val_obj.runs
        fit_obj.runs = val_obj.runs = 0
    best = min(scores, key=lambda k: scores[k])
    return float(best), scores


def tune(
    denoiser: Model,
    sampler: str,
    nfe: int,
    x_T: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    sigma_min: float,
    sigma_max: float,
    options: Mapping[str, Any] | None = None,
    teacher: str = "ipndm",
    teacher_steps: int = 100,
    method: str = "lm",
    iters: int = 30,
    starts: int = 2,
    hops: int = 0,
    solver: bool = False,
    reg: float | None = None,
    solver_iters: int | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune and report (sigmas, errors before/after, cost): :func:`tune_schedule` (OSS, Pei et al. 2025).

    ``solver``: then fit the sampler's per-step coefficients jointly with the sigmas (a sampler that
    takes them: ``ipndm_tuned``), regularised by ``reg`` toward its analytic ones (None: chosen among
    SOLVER_REGS on a validation quarter of ``x_T``), for ``solver_iters`` Levenberg-Marquardt
    iterations (default ``iters``)."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise TuningError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not 0 < sigma_min < sigma_max:
        raise TuningError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    info = registry.get_sampler(sampler)
    opts = deterministic_options(info, options)
    if solver and not takes_coefficients(info):
        fitted = sorted(n for n, i in registry.SAMPLERS.items() if takes_coefficients(i))
        raise TuningError(f"sampler {info.name!r} has no coefficients to fit; samplers that do: {fitted}")
    if solver and reg is not None and (not math.isfinite(reg) or reg < 0):
        raise TuningError(f"reg must be a finite number >= 0, got {reg!r}")
    steps = steps_for_nfe(info, nfe, opts)
    extra = dict(extra_args or {})
    t_info = registry.get_sampler(teacher)
    t_opts = deterministic_options(t_info)
    t_sig = _fixed_sigmas("karras", teacher_steps, sigma_min, sigma_max, {})
    with torch.no_grad():
        try:
            target = run(t_info.stepper(x_T * sigma_max, t_sig, **t_opts), denoiser, extra).double()
        except NonFiniteError as exc:
            raise TuningError(
                f"tune_schedule: the model's output is not finite (teacher run): {exc}"
            ) from exc
        obj = _Objective(info, opts, denoiser, x_T, target, extra)
        inits = []
        for name, sched_opts in INIT_SCHEDULES:
            sig = _fixed_sigmas(name, steps, sigma_min, sigma_max, sched_opts)
            inits.append((_rms(obj.residual(sig, strict=name == "karras")), name, sched_opts, sig))
        rms_karras = inits[0][0]
        rms_init, init_name, init_opts, sig = min(inits, key=lambda t: t[0])
        label = init_name + "".join(f" {k}={v}" for k, v in init_opts.items())
        r = obj.residual(sig)
        iterations = 0
        if method == "lm" and steps > 1:
            best = (rms_init, sig)
            seeds = [start for *_, start in sorted(inits, key=lambda t: t[0])[:starts]]
            gen = torch.Generator().manual_seed(0)
            for k in range(len(seeds) + hops):  # the best starts, then basin hopping around the best
                theta = _logits(seeds[k] if k < len(seeds) else best[1], sigma_min, sigma_max)
                if k >= len(seeds):  # perturb the best logits, descend again
                    theta = theta + 0.5 * torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
                found = _descend(obj, theta, sigma_min, sigma_max, iters, progress)
                if found is not None:
                    iterations += found[2]
                    best = min(best, found[:2], key=lambda t: t[0])
            sig = best[1]
            r = obj.residual(sig)
        rms_schedule, schedule_sigmas = _rms(r), sig
        coefficients: list[float] | None = None
        validation: dict[str, float] = {}
        if solver:
            c0 = analytic_coefficients(info, steps, opts)
            s_iters = iters if solver_iters is None else solver_iters
            if reg is None:
                reg, validation = _choose_reg(obj, sig, c0, sigma_min, sigma_max, s_iters)
            sig, c, its = _fit_solver(obj, sig, c0, sigma_min, sigma_max, reg, s_iters, progress)
            iterations += its
            coefficients = [float(v) for v in c]
            r = obj.residual(sig, coefficients=c)
    return TuneResult(
        sigmas=sig,
        sampler=info.name,
        nfe=nfe,
        steps=steps,
        options=opts,
        method=method,
        init=label,
        rms_karras=rms_karras,
        rms_init=rms_init,
        rms_tuned=_rms(r),
        iterations=iterations,
        runs=obj.runs,
        seconds=time.perf_counter() - t0,
        teacher={"sampler": teacher, "steps": teacher_steps, "schedule": "karras"},
        coefficients=coefficients,
        rms_schedule=rms_schedule if solver else None,
        schedule_sigmas=schedule_sigmas if solver else None,
        reg=reg if solver else None,
        validation=validation,
    )


def tune_schedule(denoiser: Model, sampler: str, nfe: int, x_T: Tensor, **kwargs: Any) -> Tensor:
    """Descending sigmas ending in 0 giving ``sampler`` exactly ``nfe`` model calls, tuned to ``denoiser``.

    ``x_T`` is the caller's unit-variance calibration noise (runs start at ``x_T * sigma_max``);
    ``extra_args`` go to every model call. Teacher: ``ipndm`` at ``teacher_steps`` karras steps;
    ``method`` "lm" (best fixed schedule, then Levenberg-Marquardt on the log-sigmas, after Optimal
    Stepsize Distillation, Pei et al. 2025) or "search" (the best fixed schedule only). Stochastic
    samplers run in their deterministic mode (eta=0, ...); ``options`` (keyword) sets others.
    The keywords are :func:`tune`'s (``sigma_min`` and ``sigma_max`` required).
    """
    return tune(denoiser, sampler, nfe, x_T, **kwargs).sigmas
