"""``sample_<name>`` (k-diffusion convention) for the samplers beyond k-diffusion's; see :mod:`.k_api`."""

from __future__ import annotations

from . import samplers_cfgpp as _cfgpp
from . import samplers_extra as _ex
from . import samplers_multistep as _ms
from . import samplers_sde as _sde
from .k_api import k_sampler

sample_ddim = k_sampler(_ex.ddim)
sample_ddpm = k_sampler(_ex.ddpm)
sample_plms = k_sampler(_ex.plms)
sample_lcm = k_sampler(_ex.lcm)
sample_tcd = k_sampler(_ex.tcd)
sample_ipndm = k_sampler(_ex.ipndm)
sample_ipndm_v = k_sampler(_ex.ipndm_v)
sample_heunpp2 = k_sampler(_ex.heunpp2)
sample_gradient_estimation = k_sampler(_ex.gradient_estimation)
sample_dpmpp_2m_sde_heun = k_sampler(_ex.dpmpp_2m_sde_heun)
sample_restart = k_sampler(_ex.restart)
sample_uni_pc = k_sampler(_ms.uni_pc)
sample_uni_pc_bh2 = k_sampler(_ms.uni_pc_bh2)
sample_deis = k_sampler(_ms.deis)
sample_sa_solver = k_sampler(_ms.sa_solver)
sample_sa_solver_pece = k_sampler(_ms.sa_solver_pece)
sample_er_sde = k_sampler(_sde.er_sde)
sample_seeds_2 = k_sampler(_sde.seeds_2)
sample_seeds_3 = k_sampler(_sde.seeds_3)
sample_res_multistep = k_sampler(_cfgpp.res_multistep)
sample_res_multistep_ancestral = k_sampler(_cfgpp.res_multistep_ancestral)
sample_res_multistep_cfg_pp = k_sampler(_cfgpp.res_multistep_cfg_pp)
sample_res_multistep_ancestral_cfg_pp = k_sampler(_cfgpp.res_multistep_ancestral_cfg_pp)
sample_euler_cfg_pp = k_sampler(_cfgpp.euler_cfg_pp)
sample_euler_ancestral_cfg_pp = k_sampler(_cfgpp.euler_ancestral_cfg_pp)
sample_dpmpp_2m_cfg_pp = k_sampler(_cfgpp.dpmpp_2m_cfg_pp)
sample_dpmpp_2s_ancestral_cfg_pp = k_sampler(_cfgpp.dpmpp_2s_ancestral_cfg_pp)

__all__ = [n for n in dir() if n.startswith("sample_")]
