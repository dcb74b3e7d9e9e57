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
from .k_api_extra import (
    sample_ddim,
    sample_ddpm,
    sample_deis,
    sample_dpmpp_2m_cfg_pp,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral_cfg_pp,
    sample_er_sde,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
    sample_gradient_estimation,
    sample_heunpp2,
    sample_ipndm,
    sample_ipndm_v,
    sample_lcm,
    sample_plms,
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_res_multistep_ancestral_cfg_pp,
    sample_res_multistep_cfg_pp,
    sample_restart,
    sample_sa_solver,
    sample_sa_solver_pece,
    sample_seeds_2,
    sample_seeds_3,
    sample_tcd,
    sample_uni_pc,
    sample_uni_pc_bh2,
)
from .ksampler import KSampler, SamplingSpec, make_sigmas, make_steppers, sampling_dtype, start_latents
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
from .schedules_extra import (
    AlignYourStepsSchedule,
    BetaSchedule,
    KLOptimalSchedule,
    get_sigmas_align_your_steps,
    get_sigmas_beta,
    get_sigmas_kl_optimal,
    get_sigmas_laplace,
    get_sigmas_linear_quadratic,
)
from .stepper import Eval, Guided, NonFiniteError, Stepper, run
from .utils import append_dims, append_zero, get_ancestral_step, to_d

__all__ = [name for name in dir() if not name.startswith("_")]
