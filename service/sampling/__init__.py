"""The sampling core: pure torch, k-diffusion compatible (``sample_<name>``, ``get_sigmas_<name>``).

Imports nothing from the web, engine or model layers.
"""

from .denoisers import DiscreteEpsDenoiser, DiscreteSchedule, DiscreteVDenoiser, KarrasDenoiser, VDenoiser
from .guidance import CFGDenoiser, cat_cond, cfg_combine
from .k_api import (
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpm_adaptive,
    sample_dpm_fast,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from .ksampler import KSampler, SamplingSpec, make_sigmas, make_steppers, start_latents
from .noise import (
    BrownianNoiseSampler,
    BrownianTreeNoiseSampler,
    GaussianNoiseSampler,
    NoiseSource,
    default_noise_sampler,
    make_noise,
)
from .registry import SAMPLERS, SCHEDULES, UnknownNameError, get_sampler, get_schedule
from .schedules import (
    CosineSchedule,
    CustomSchedule,
    ExponentialSchedule,
    KarrasSchedule,
    LinearSchedule,
    PolyExponentialSchedule,
    Schedule,
    VPSchedule,
    get_sigmas_cosine,
    get_sigmas_custom,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_linear,
    get_sigmas_polyexponential,
    get_sigmas_vp,
)
from .stepper import Eval, NonFiniteError, Stepper, run
from .utils import append_dims, append_zero, get_ancestral_step, to_d

__all__ = [name for name in dir() if not name.startswith("_")]
