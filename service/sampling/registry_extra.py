"""Registry entries for the samplers and schedules beyond k-diffusion's (imported at the end of registry)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import samplers_cfgpp as cfgpp
from . import samplers_extra as ex
from . import samplers_multistep as ms
from . import samplers_sde as sde
from . import schedules_extra as sx
from .registry import (
    _ANCESTRAL,
    _CHURN,
    _RANGE,
    _S_NOISE,
    INF,
    Option,
    SamplerInfo,
    ScheduleInfo,
    register_sampler,
    register_schedule,
)


def _plms_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return steps + 1 if steps > 1 else 1


def _heunpp2_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return 3 * steps - 3 if steps > 1 else 1


def _pece_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    return 2 * steps - 1 if steps > 1 else 1


def _restart_nfe(steps: int, opts: Mapping[str, Any]) -> int:
    times = opts.get("restart_times")
    times = (2 if steps >= 19 else 0) if times is None else int(times)
    if steps < 2:
        return 1
    return 2 * steps - 1 + times * (int(opts.get("restart_steps", 10)) - 1) * 2


_ORDER3 = {"order": Option(3, 1, 3, integer=True)}
_SA = {
    "predictor_order": Option(3, 1, 4, integer=True),
    "corrector_order": Option(4, 1, 4, integer=True),
    "eta": Option(1.0, 0.0, 10.0),
    "s_noise": _S_NOISE,
    # diffusers' / ComfyUI's default noise window (SD timesteps 200..800), as the samplers' defaults
    "tau_sigma_lo": Option(0.5716, 0.0, INF),
    "tau_sigma_hi": Option(5.112, 0.0, INF),
}


def _cfgpp(
    name: str, fn: Any, order: int, nfe: int, stochastic: bool, noise: str = "none", bounds: Any = None
) -> SamplerInfo:
    """A CFG++ sampler: the driver must send Guided(guided, uncond)."""
    return SamplerInfo(
        name,
        fn,
        order,
        nfe,
        stochastic,
        noise,
        needs_uncond=True,
        bounds=bounds or {},
        origin="CFG++ (Chung et al. 2024)",
    )


for _info in [
    SamplerInfo(
        "ddim",
        ex.ddim,
        1,
        1,
        False,
        "gaussian",
        bounds={"eta": Option(0.0, 0.0, 1.0), "s_noise": _S_NOISE},
        origin="DDIM (Song et al. 2021)",
    ),
    SamplerInfo(
        "ddpm", ex.ddpm, 1, 1, True, "gaussian", bounds={"s_noise": _S_NOISE}, origin="DDPM (Ho et al. 2020)"
    ),
    SamplerInfo("plms", ex.plms, 4, 1, False, nfe=_plms_nfe, origin="PNDM (Liu et al. 2022)"),
    SamplerInfo(
        "lcm", ex.lcm, 1, 1, True, "gaussian", bounds={"s_noise": _S_NOISE}, origin="LCM (Luo et al. 2023)"
    ),
    SamplerInfo(
        "tcd",
        ex.tcd,
        1,
        1,
        True,
        "gaussian",
        bounds={"gamma": Option(0.3, 0.0, 1.0), "s_noise": _S_NOISE},
        origin="TCD (Zheng et al. 2024)",
    ),
    SamplerInfo("uni_pc", ms.uni_pc, 3, 1, False, bounds=_ORDER3, origin="UniPC (Zhao et al. 2023)"),
    SamplerInfo("uni_pc_bh2", ms.uni_pc_bh2, 3, 1, False, bounds=_ORDER3, origin="UniPC (Zhao et al. 2023)"),
    SamplerInfo(
        "deis",
        ms.deis,
        3,
        1,
        False,
        bounds={"max_order": Option(3, 1, 3, integer=True)},
        origin="DEIS (Zhang & Chen 2022)",
    ),
    SamplerInfo(
        "ipndm",
        ex.ipndm,
        4,
        1,
        False,
        bounds={"max_order": Option(4, 1, 4, integer=True)},
        origin="iPNDM (Zhang & Chen 2022)",
    ),
    SamplerInfo(
        "ipndm_v",
        ex.ipndm_v,
        4,
        1,
        False,
        bounds={"max_order": Option(4, 1, 4, integer=True)},
        origin="iPNDM-v (Zhang & Chen 2022)",
    ),
    SamplerInfo(
        "heunpp2",
        ex.heunpp2,
        1,
        3,
        False,
        "gaussian",
        bounds=_CHURN,
        nfe=_heunpp2_nfe,
        origin="Heun++ (Carzit / ComfyUI)",
    ),
    SamplerInfo(
        "dpmpp_2m_sde_heun",
        ex.dpmpp_2m_sde_heun,
        2,
        1,
        True,
        "brownian",
        bounds=_ANCESTRAL,
        origin="DPM-Solver++ (Lu et al. 2022)",
    ),
    SamplerInfo("res_multistep", cfgpp.res_multistep, 2, 1, False, origin="RES (Zhang et al. 2023)"),
    SamplerInfo(
        "res_multistep_ancestral",
        cfgpp.res_multistep_ancestral,
        2,
        1,
        True,
        "gaussian",
        bounds=_ANCESTRAL,
        origin="RES (Zhang et al. 2023)",
    ),
    SamplerInfo(
        "er_sde",
        sde.er_sde,
        3,
        1,
        True,
        "gaussian",
        bounds={"s_noise": _S_NOISE, "max_stage": Option(3, 1, 3, integer=True)},
        origin="ER-SDE (Cui et al. 2023)",
    ),
    SamplerInfo(
        "seeds_2",
        sde.seeds_2,
        2,
        2,
        True,
        "gaussian",
        bounds={**_ANCESTRAL, "r": Option(0.5, 0.01, 0.99)},
        origin="SEEDS (Gonzalez et al. 2023)",
    ),
    SamplerInfo(
        "seeds_3",
        sde.seeds_3,
        3,
        3,
        True,
        "gaussian",
        bounds={**_ANCESTRAL, "r_1": Option(1 / 3, 0.01, 0.98), "r_2": Option(2 / 3, 0.02, 0.99)},
        origin="SEEDS (Gonzalez et al. 2023)",
    ),
    SamplerInfo(
        "sa_solver", ms.sa_solver, 3, 1, True, "gaussian", bounds=_SA, origin="SA-Solver (Xue et al. 2023)"
    ),
    SamplerInfo(
        "sa_solver_pece",
        ms.sa_solver_pece,
        3,
        2,
        True,
        "gaussian",
        bounds=_SA,
        nfe=_pece_nfe,
        origin="SA-Solver (Xue et al. 2023)",
    ),
    SamplerInfo(
        "gradient_estimation",
        ex.gradient_estimation,
        1,
        1,
        False,
        bounds={"ge_gamma": Option(2.0, -10.0, 10.0)},
        origin="Permenter & Yuan (2023)",
    ),
    SamplerInfo(
        "restart",
        ex.restart,
        2,
        2,
        True,
        "gaussian",
        nfe=_restart_nfe,
        origin="Restart (Xu et al. 2023)",
        bounds={
            "s_noise": _S_NOISE,
            "restart_times": Option(None, 0, 20, integer=True),
            "restart_steps": Option(10, 2, 100, integer=True),
            "restart_sigma_lo": Option(0.1, 0.0, INF),
            "restart_sigma_hi": Option(2.0, 0.0, INF),
        },
    ),
    _cfgpp("euler_cfg_pp", cfgpp.euler_cfg_pp, 1, 1, False),
    _cfgpp("euler_ancestral_cfg_pp", cfgpp.euler_ancestral_cfg_pp, 1, 1, True, "gaussian", bounds=_ANCESTRAL),
    _cfgpp("dpmpp_2m_cfg_pp", cfgpp.dpmpp_2m_cfg_pp, 2, 1, False),
    _cfgpp(
        "dpmpp_2s_ancestral_cfg_pp",
        cfgpp.dpmpp_2s_ancestral_cfg_pp,
        2,
        2,
        True,
        "gaussian",
        bounds=_ANCESTRAL,
    ),
    _cfgpp("res_multistep_cfg_pp", cfgpp.res_multistep_cfg_pp, 2, 1, False),
    _cfgpp(
        "res_multistep_ancestral_cfg_pp",
        cfgpp.res_multistep_ancestral_cfg_pp,
        2,
        1,
        True,
        "gaussian",
        bounds=_ANCESTRAL,
    ),
]:
    register_sampler(_info)


for _sched in [
    ScheduleInfo(
        "beta",
        sx.get_sigmas_beta,
        {**_RANGE, "alpha": Option(0.6, 0.01, 100.0), "beta": Option(0.6, 0.01, 100.0)},
        doc="Lee et al. (2024): Beta(alpha, beta) quantiles, spread in log sigma",
    ),
    ScheduleInfo(
        "kl_optimal", sx.get_sigmas_kl_optimal, _RANGE, doc="Sabour et al. (2024): uniform in arctan(sigma)"
    ),
    ScheduleInfo(
        "linear_quadratic",
        sx.get_sigmas_linear_quadratic,
        {
            "sigma_max": _RANGE["sigma_max"],
            "threshold_noise": Option(0.025, 1e-4, 0.5),
            "linear_steps": Option(None, 1, 10_000, integer=True),
        },
        doc="Movie Gen / Mochi: linear then quadratic in sigma / sigma_max",
    ),
    ScheduleInfo(
        "align_your_steps",
        sx.get_sigmas_align_your_steps,
        {"model": Option("sd15", choices=tuple(sx.AYS_TABLES))},
        uses_range=False,
        doc="Sabour et al. (2024): NVIDIA's tables (sd15, sdxl, svd), log-linear interpolation",
    ),
    ScheduleInfo(
        "laplace",
        sx.get_sigmas_laplace,
        {**_RANGE, "mu": Option(0.0, -10.0, 10.0), "beta": Option(0.5, 0.01, 10.0)},
        doc="Hang et al. (2024): Laplace(mu, beta) quantiles of log sigma",
    ),
]:
    register_schedule(_sched)
