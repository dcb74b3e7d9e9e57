"""A linear multistep solver whose per-step coefficients are fitted to one model (``ipndm_tuned``).

iPNDM's step is x' = x + (s' - s) * sum_j c_j d_{i-j} with Adams-Bashforth's equal-step coefficients
c (lower orders while the history fills). Here each step has its own c, fitted against a teacher's
trajectories by :func:`service.sampling.tuning.tune` (``solver=True``), as S4S (Frankel et al. 2025,
https://arxiv.org/abs/2502.17423) fits a solver's coefficients and LD3 / OSS its time steps. Without
fitted coefficients it is iPNDM itself (the same floats in the same order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from ..catalog import Bounds, sampler
from ..errors import InputError
from ..stepper import StepIO, Stepper
from .common import check_order, evaluate
from .linear_multistep import AB_COEFFS

ORIGIN = "S4S-style fitted coefficients (Frankel et al. 2025) on iPNDM (Zhang & Chen 2022)"
MAX_ORDER = {"max_order": Bounds(lo=1, hi=4, integer=True)}
Fitted = Sequence[float] | None  # flat, step by step, newest derivative first
COEFF_LIMIT = 100.0  # |c| above this is no solver a fit would make (and overflows float16 models)


def history_lengths(steps: int, max_order: int) -> list[int]:
    """How many derivatives step i combines: iPNDM's min(i + 1, max_order)."""
    return [min(i + 1, max_order) for i in range(steps)]


def analytic_coefficients(steps: int, max_order: int) -> list[float]:
    """iPNDM's coefficients for ``steps`` steps, flattened step by step (newest derivative first)."""
    return [c for k in history_lengths(steps, max_order) for c in AB_COEFFS[k]]


def step_coefficients(
    steps: int, max_order: int, coefficients: Sequence[float] | None
) -> list[tuple[float, ...]]:
    """Per-step coefficient tuples from the flat list (None: iPNDM's); an InputError naming
    ``coefficients`` when their count does not fit the steps or a value is not a finite number."""
    lengths = history_lengths(steps, max_order)
    if coefficients is None:
        return [AB_COEFFS[k] for k in lengths]
    flat = list(coefficients)
    for v in flat:
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or not math.isfinite(v)
            or abs(v) > COEFF_LIMIT
        ):
            raise InputError("coefficients", f"coefficients must be finite numbers in [-100, 100], got {v!r}")
    if len(flat) != sum(lengths):
        raise InputError(
            "coefficients",
            f"coefficients has {len(flat)} values; {steps} steps at max_order {max_order} take "
            f"{sum(lengths)} ({'+'.join(map(str, lengths))}, newest derivative first)",
        )
    out, at = [], 0
    for k in lengths:
        out.append(tuple(float(v) for v in flat[at : at + k]))
        at += k
    return out


@sampler(order=2, options=MAX_ORDER, internal=("coefficients",), origin=ORIGIN)
def ipndm_tuned(
    x: Tensor, sigmas: Tensor, io: StepIO, *, max_order: int = 4, coefficients: Fitted = None
) -> Stepper:
    """iPNDM with per-step coefficients fitted to the model (schedule `tuned`, made by kdiff tune-schedule).

    Without ``coefficients`` (a flat list, step by step, newest derivative first) it is ``ipndm``.
    Its registered order is what iPNDM's equal-step coefficients reach on varying steps.
    """
    max_order = check_order("max_order", max_order, len(AB_COEFFS))
    s = sigmas.tolist()
    table = step_coefficients(len(s) - 1, max_order, coefficients)
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = yield from evaluate(x, sigmas, s, i, io.callback)
        ds = [*ds[-(max_order - 1) :], (x - denoised) / s[i]] if max_order > 1 else [(x - denoised) / s[i]]
        x = x + sum(c * dj for c, dj in zip(table[i], reversed(ds), strict=True)) * (s[i + 1] - s[i])
    return x
