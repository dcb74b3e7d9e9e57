"""The sampling core: pure torch, k-diffusion compatible (``sample_<name>``, ``get_sigmas_<name>``).

``sample_<name>`` exists for every registered sampler and ``get_sigmas_<name>`` for every
registered schedule; both are taken from the registry at import (k-diffusion's 13 samplers keep
k-diffusion's signatures). Imports nothing from the web, engine or model layers.
"""

from . import registry
from .denoisers import DiscreteEpsDenoiser, DiscreteSchedule, DiscreteVDenoiser, KarrasDenoiser, VDenoiser
from .guidance import CFGDenoiser, cat_cond, cfg_combine
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
    AlignYourStepsSchedule,
    BetaSchedule,
    CosineSchedule,
    CustomSchedule,
    ExponentialSchedule,
    KarrasSchedule,
    KLOptimalSchedule,
    LinearSchedule,
    PolyExponentialSchedule,
    Schedule,
    VPSchedule,
    get_sigmas_custom,
)
from .stepper import Eval, Guided, NonFiniteError, Stepper, run
from .tuning import TuneResult, TuningError, tune, tune_schedule
from .utils import append_dims, append_zero, get_ancestral_step, to_d

globals().update({f"sample_{name}": info.sample for name, info in SAMPLERS.items()})
globals().update({info.function.__name__: info.function for info in SCHEDULES.values()})

__all__ = [name for name in dir() if not name.startswith("_")]
