"""A1111, ComfyUI, InvokeAI and diffusers spellings of samplers and schedules -> our (sampler, schedule).

``resolve("DPM++ 2M Karras")`` -> ``("dpmpp_2m", "karras")``; ``resolve("Euler a")`` ->
``("euler_ancestral", None)`` (None: the name implies no schedule). Matching ignores case, spaces,
dashes and underscores, and a trailing " Karras" / " Exponential" / "_k" selects that schedule.
Canonical names resolve to themselves.
"""

from __future__ import annotations

import re

from . import registry

# Our sampler name -> other spellings (A1111 display names, diffusers classes, InvokeAI keys).
_SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "euler": ("Euler", "EulerDiscreteScheduler"),
    "euler_ancestral": ("Euler a", "euler_a", "k_euler_a", "EulerAncestralDiscreteScheduler"),
    "heun": ("Heun", "HeunDiscreteScheduler"),
    "dpm_2": ("DPM2", "kdpm_2", "KDPM2DiscreteScheduler"),
    "dpm_2_ancestral": ("DPM2 a", "kdpm_2_a", "KDPM2AncestralDiscreteScheduler"),
    "lms": ("LMS", "k_lms", "LMSDiscreteScheduler"),
    "dpm_fast": ("DPM fast",),
    "dpm_adaptive": ("DPM adaptive",),
    "dpmpp_2s_ancestral": ("DPM++ 2S a", "dpmpp_2s"),
    "dpmpp_sde": ("DPM++ SDE", "DPMSolverSDEScheduler"),
    "dpmpp_2m": ("DPM++ 2M", "DPMSolverMultistepScheduler", "dpmpp_2m"),
    "dpmpp_2m_sde": ("DPM++ 2M SDE",),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun",),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "dpmpp_3m"),
    "ddim": ("DDIM", "DDIMScheduler"),
    "ddpm": ("DDPM", "DDPMScheduler"),
    "plms": ("PLMS", "pndm", "PNDMScheduler"),
    "lcm": ("LCM", "LCMScheduler"),
    "tcd": ("TCD", "TCDScheduler"),
    "uni_pc": ("UniPC", "unipc_bh1"),
    "uni_pc_bh2": ("UniPC bh2", "UniPCMultistepScheduler"),
    "deis": ("DEIS", "DEISMultistepScheduler"),
    "ipndm": ("iPNDM", "IPNDMScheduler"),
    "ipndm_v": ("iPNDM v",),
    "heunpp2": ("Heun++ 2", "heunpp"),
    "restart": ("Restart",),
    "res_multistep": ("RES multistep",),
    "er_sde": ("ER SDE", "ER-SDE"),
    "sa_solver": ("SA-Solver", "SASolverScheduler"),
    "sa_solver_pece": ("SA-Solver PECE",),
    "seeds_2": ("SEEDS 2",),
    "seeds_3": ("SEEDS 3",),
    "euler_cfg_pp": ("DDIM CFG++", "Euler CFG++"),
    "euler_ancestral_cfg_pp": ("Euler a CFG++",),
    "dpmpp_2m_cfg_pp": ("DPM++ 2M CFG++",),
    "dpmpp_2s_ancestral_cfg_pp": ("DPM++ 2S a CFG++",),
    "res_multistep_cfg_pp": ("RES multistep CFG++",),
}

# Our schedule name -> other spellings (A1111's scheduler names, ComfyUI's, diffusers' flags).
_SCHEDULE_ALIASES: dict[str, tuple[str, ...]] = {
    "karras": ("Karras", "use_karras_sigmas"),
    "exponential": ("Exponential", "use_exponential_sigmas"),
    "polyexponential": ("Polyexponential",),
    "beta": ("Beta", "use_beta_sigmas"),
    "kl_optimal": ("KL Optimal",),
    "align_your_steps": ("Align Your Steps", "AYS", "ays"),
    "linear_quadratic": ("Linear Quadratic",),
    "laplace": ("Laplace",),
    "normal": ("Normal", "Uniform", "linspace"),
    "simple": ("Simple", "trailing"),
    "sgm_uniform": ("SGM Uniform",),
    "ddim_uniform": ("DDIM uniform", "leading"),
}

# Trailing words that pick a schedule ("DPM++ 2M Karras", InvokeAI's "dpmpp_2m_k").
_SUFFIXES = {"karras": "karras", "k": "karras", "exponential": "exponential"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _table(aliases: dict[str, tuple[str, ...]], canonical: list[str]) -> dict[str, str]:
    out = {_key(n): n for n in canonical}
    for ours, others in aliases.items():
        out.setdefault(_key(ours), ours)
        for other in others:
            out.setdefault(_key(other), ours)
    return out


def sampler_aliases() -> dict[str, str]:
    """Normalised spelling -> our sampler name (every registered name included)."""
    return _table(_SAMPLER_ALIASES, list(registry.SAMPLERS))


def schedule_aliases() -> dict[str, str]:
    return _table(_SCHEDULE_ALIASES, list(registry.SCHEDULES))


def resolve_schedule(name: str) -> str:
    """Our schedule name for a peer's spelling; raises UnknownNameError listing the valid ones."""
    found = schedule_aliases().get(_key(name))
    if found is None or found not in registry.SCHEDULES:
        raise registry.UnknownNameError("schedule", name, sorted(registry.SCHEDULES))
    return found


def resolve(name: str) -> tuple[str, str | None]:
    """(sampler, implied schedule or None) for a peer's spelling; raises UnknownNameError."""
    table = sampler_aliases()
    key = _key(name)
    if key in table:
        return table[key], None
    head, _, last = key.rpartition(" ")
    if head and last in _SUFFIXES and head in table:
        return table[head], _SUFFIXES[last]
    raise registry.UnknownNameError("sampler", name, sorted(registry.SAMPLERS))
