"""tune_schedule: exact call counts for every deterministic sampler, clear errors, and the issue-16 targets
on the Gaussian mixture (held-out noise, exact ODE reference): tuned RMS error <= 0.2x the best
k-diffusion-only (sampler, schedule) pair and <= 0.5x our best untuned pair, at 10 and at 5 calls
(on 4,096 held-out draws; on the first 256 of them only the 0.5x target is met)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from service.sampling import TuningError, registry, tune, tune_schedule
from service.sampling.stepper import run
from service.sampling.tuning import deterministic_options, steps_for_nfe
from tests.support.gmm import DIM, SIGMA_MAX, SIGMA_MIN, GMMDenoiser

KD_SCHEDULES = ("karras", "exponential", "polyexponential", "vp")  # k-diffusion 0.1.1's own
# dpm_fast / dpm_adaptive stop at sigma_min and use only the schedule's end points (docs/SAMPLERS.md:
# max error 0.66 / 0.100 at 5 / 10 calls, far from the best pairs); not tunable, not compared here.
ENDPOINT_ONLY = {"dpm_fast", "dpm_adaptive"}
BENCH = Path(__file__).resolve().parents[2] / "docs" / "bench_samplers_quality.json"


def _noise(n: int, seed: int) -> Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_ODE_MAPS: dict[tuple[int, float, bytes], Tensor] = {}  # the same draws from the same sigma: solved once


def _ode_map(gmm: GMMDenoiser, x: Tensor, sigma_start: float) -> Tensor:
    """Exact probability-flow ODE map to sigma = 0 (1e-8), scipy DOP853, rtol = atol = 1e-12.

    Kept per (mixture, sigma_start, x's bytes) for the module: both budgets and the tuned schedules
    are measured against the same maps of the same held-out draws, so each is solved once."""
    key = (id(gmm), sigma_start, hashlib.sha256(x.numpy().tobytes()).digest())
    if key not in _ODE_MAPS:
        _ODE_MAPS[key] = _solve_ode(gmm, x, sigma_start)
    return _ODE_MAPS[key]


def _solve_ode(gmm: GMMDenoiser, x: Tensor, sigma_start: float) -> Tensor:
    from scipy.integrate import solve_ivp

    n = x.shape[0]

    def f(u: float, y: np.ndarray) -> np.ndarray:
        xx = torch.from_numpy(y.reshape(n, DIM))
        return (xx - gmm(xx, torch.full((n,), math.exp(u), dtype=torch.float64))).numpy().ravel()

    sol = solve_ivp(
        f, (math.log(sigma_start), math.log(1e-8)), x.numpy().ravel(), "DOP853", rtol=1e-12, atol=1e-12
    )
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(n, DIM))


def _rms(gmm: GMMDenoiser, name: str, opts: dict[str, Any], sigmas: Tensor, x: Tensor, ref: Tensor) -> float:
    out = run(registry.get_sampler(name).stepper(x * sigmas[0], sigmas, **opts), gmm)
    return float((out - ref).pow(2).mean().sqrt())


def _candidates(budget: int) -> list[tuple[str, str]]:
    """Every k-diffusion sampler on k-diffusion's schedules, and the 12 best untuned pairs (RMS) of the
    full 40 x 5 sweep in docs/bench_samplers_quality.json at this budget (re-measured here)."""
    rows = json.loads(BENCH.read_text())["gmm"]["rows"]
    rows = sorted(
        (r for r in rows if r["budget"] == budget and r["err_rms"] is not None), key=lambda r: r["err_rms"]
    )
    out = [(r["sampler"], r["schedule"]) for r in rows[:12]]
    kd = [n for n, i in registry.SAMPLERS.items() if i.origin == "k-diffusion" and n not in ENDPOINT_ONLY]
    return out + [(n, s) for n in kd for s in KD_SCHEDULES if (n, s) not in out]


def _best_pairs(gmm: GMMDenoiser, budget: int, held: Tensor) -> dict[str, tuple[float, str, str]]:
    """Best (RMS, sampler, schedule) on held-out noise: k-diffusion-only pairs, and all untuned pairs."""
    refs: dict[float, Tensor] = {}
    best = {"kdiffusion": (math.inf, "", ""), "ours": (math.inf, "", "")}
    for name, sched in _candidates(budget):
        info = registry.get_sampler(name)
        try:
            opts = deterministic_options(info)
        except TuningError:
            continue
        steps = max(n for n in range(1, budget + 1) if info.expected_nfe(n, opts) <= budget)
        sig = registry.schedule_sigmas(sched, steps, SIGMA_MIN, SIGMA_MAX).double()
        s0 = float(sig[0])
        if s0 not in refs:
            refs[s0] = _ode_map(gmm, held * s0, s0)
        err = _rms(gmm, name, opts, sig, held, refs[s0])
        kd = info.origin == "k-diffusion" and sched in KD_SCHEDULES
        for key in ["ours"] + (["kdiffusion"] if kd else []):
            best[key] = min(best[key], (err, name, sched))
    return best


CAL, HELD, HELD_SMALL = 2048, 4096, 256  # calibration draws (seed 0), held-out draws (seed 1) and a prefix
VARIANTS = ({}, {"max_order": 3})  # ipndm's default order 4 and order 3: the test keeps the better one
TUNE: dict[str, Any] = {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "teacher_steps": 200}


def held_out_ratios(
    gmm: GMMDenoiser, nfe: int, name: str, opts: dict[str, Any], sigmas: Tensor, n: int
) -> tuple[float, float, str]:
    """Tuned RMS on the first ``n`` held-out draws (seed 1) over that of the best k-diffusion pair and of
    our best untuned pair on the same draws, and a line naming them."""
    held = _noise(n, seed=1)
    best = _best_pairs(gmm, nfe, held)
    tuned = _rms(gmm, name, opts, sigmas, held, _ode_map(gmm, held * SIGMA_MAX, SIGMA_MAX))
    (kd, kd_name, kd_sched), (ours, ours_name, ours_sched) = best["kdiffusion"], best["ours"]
    msg = (
        f"{n} held-out draws: tuned RMS {tuned:.4g} = {tuned / ours:.3f}x our best untuned pair "
        f"{ours_name} + {ours_sched} ({ours:.4g}), {tuned / kd:.3f}x the best k-diffusion pair "
        f"{kd_name} + {kd_sched} ({kd:.4g})"
    )
    return tuned / kd, tuned / ours, msg


@pytest.mark.parametrize(("nfe", "starts"), [(10, 2), (5, 4)])
def test_tuned_schedule_beats_the_best_fixed_pairs(gmm: GMMDenoiser, nfe: int, starts: int) -> None:
    """Issue 16 on the mixture: ipndm (order 4 or 3, whichever fits the calibration draws better) tuned
    on 2,048 calibration draws, measured on 4,096 held-out draws against the exact ODE map: <= 0.2x the
    best k-diffusion pair and <= 0.5x our best untuned pair, both re-measured on the same draws. On the
    first 256 of those draws alone (the set this test used before) the 0.5x target is asserted too; the
    0.2x one is printed: it is not met there (0.26x at 10 calls, 0.22x at 5: one draw that ends between
    two modes dominates 256; docs/SAMPLERS.md)."""
    cal = _noise(CAL, seed=0)
    runs = [tune(gmm, "ipndm", nfe, cal, starts=starts, options=o, **TUNE) for o in VARIANTS]
    res = min(runs, key=lambda r: r.rms_tuned)
    print(f"\nipndm {res.options} tuned at {nfe} calls: calibration RMS (to the teacher) {res.rms_tuned:.4g}")
    for n in (HELD, HELD_SMALL):
        kd_ratio, ours_ratio, msg = held_out_ratios(gmm, nfe, "ipndm", res.options, res.sigmas, n)
        print(msg)
        assert ours_ratio <= 0.5, msg
        if n == HELD:
            assert kd_ratio <= 0.2, msg


def _counted(model: Any) -> Any:
    def call(x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        call.calls += 1  # type: ignore[attr-defined]
        return model(x, sigma, **kw)

    call.calls = 0  # type: ignore[attr-defined]
    return call


def _tunable(name: str) -> bool:
    """A sampler with a deterministic mode (the ones without are refused: tested below)."""
    try:
        deterministic_options(registry.SAMPLERS[name])
        return True
    except TuningError:
        return False


@pytest.mark.parametrize("name", [n for n in registry.SAMPLERS if n not in ENDPOINT_ONLY and _tunable(n)])
def test_every_deterministic_sampler_is_tuned_to_its_exact_call_count(gmm: GMMDenoiser, name: str) -> None:
    info = registry.SAMPLERS[name]
    opts = deterministic_options(info)
    nfe = info.expected_nfe(4, opts)
    x = _noise(16, seed=0)
    res = tune(
        gmm, name, nfe, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, teacher_steps=20, iters=2, starts=1
    )
    s = res.sigmas
    assert s[0] == SIGMA_MAX and s[-1] == 0 and bool((s[1:] < s[:-1]).all()) and float(s[-2]) >= SIGMA_MIN
    assert res.rms_tuned <= res.rms_init <= res.rms_karras
    counter = _counted(gmm)
    run(info.stepper(x * s[0], s, **res.options), counter)
    assert counter.calls == nfe


def test_nfe_a_sampler_cannot_make_is_refused_naming_the_allowed_values(gmm: GMMDenoiser) -> None:
    with pytest.raises(TuningError, match=r"'heun' cannot make exactly 4 model calls.*allowed: 1, 3, 5, 7"):
        tune_schedule(gmm, "heun", 4, _noise(4, 0), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    with pytest.raises(TuningError, match=r"0 model calls \(below its minimum of 1\)"):
        steps_for_nfe(registry.get_sampler("euler"), 0)


def test_stochastic_samplers_tune_in_their_deterministic_mode_or_are_refused(gmm: GMMDenoiser) -> None:
    res = tune(gmm, "euler_ancestral", 3, _noise(8, 0), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, iters=1)
    assert res.options == {"eta": 0.0, "s_noise": 1.0} or res.options["eta"] == 0.0
    with pytest.raises(TuningError, match="no deterministic mode"):
        tune_schedule(gmm, "ddpm", 3, _noise(4, 0), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    with pytest.raises(TuningError, match="eta=0.5"):
        tune(
            gmm,
            "euler_ancestral",
            3,
            _noise(4, 0),
            sigma_min=SIGMA_MIN,
            sigma_max=SIGMA_MAX,
            options={"eta": 0.5},
        )
    with pytest.raises(TuningError, match="no schedule to tune"):
        tune_schedule(gmm, "dpm_fast", 3, _noise(4, 0), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


def test_non_finite_model_output_is_a_clear_error(gmm: GMMDenoiser) -> None:
    def broken(x: Tensor, sigma: Tensor, **kw: Any) -> Tensor:
        out = gmm(x, sigma)
        return out.masked_fill(sigma.reshape(-1, 1) < 1.0, math.nan)

    with pytest.raises(TuningError, match="not finite"):
        tune_schedule(broken, "euler", 5, _noise(4, 0), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
