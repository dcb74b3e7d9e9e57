"""Flow forms of the samplers that add noise, for rectified-flow models (see service/sampling/flow.py).

A flow model's sigma is its time t (x = (1 - t) x0 + t eps). Samplers that only solve the ODE run
on it as they are; the others (ancestral, SDE, churn, CFG++) run their own stepper in the
variance-exploding coordinates of the same process, sigma_ve = t / (1 - t), x_ve = x / (1 - t),
where their re-noising is exact: :func:`flow_stepper`. No sampler is written twice, and each keeps
its name, options and model-call count; ``service.sampling.flow.FlowSpec`` is a spec whose
``info`` is that form, and ``sample_<name>`` runs it when its model is a flow model (k_api.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..stepper import Eval, Guided, Stepper

if TYPE_CHECKING:  # the catalog makes each sample_<name> with its flow form: no import back
    from ..catalog import SamplerInfo

T_MAX = 1.0 - 1e-4  # where flow forms start instead of t = 1 (sigma_ve = 9999)
NOISE_OPTIONS = {"s_churn": 0.0, "eta": 0.0}  # options that make a noise-taking sampler an ODE at 0


def is_ode(info: SamplerInfo, options: dict[str, Any]) -> bool:
    """Whether the sampler, with these options, only solves the ODE (then it runs as it is)."""
    if info.needs_uncond:
        return False
    if info.noise == "none":
        return True
    if info.stochastic:
        return False
    opts = {**info.options, **options}
    return all(float(opts.get(k) or 0.0) == v for k, v in NOISE_OPTIONS.items() if k in opts)


def flow_stepper(stepper: Callable[..., Stepper]) -> Callable[..., Stepper]:
    """The flow form of a stepper: it runs on (x_ve, sigma_ve) = (x / (1 - t), t / (1 - t))."""

    def run(
        x: Tensor, sigmas: Tensor, *, callback: Any = None, noise_sampler: Any = None, **options: Any
    ) -> Stepper:
        dtype = x.dtype
        wide = torch.float32 if x.device.type == "mps" else torch.float64
        t = sigmas.to(wide).clamp(max=T_MAX)
        s_ve = t / (1 - t)
        x_ve = x.to(wide) * (s_ve[0] if float(sigmas[0]) >= 1.0 else 1 / (1 - t[0]))

        def to_t(s: Tensor) -> Tensor:
            return (s / (1 + s)).to(sigmas.dtype)

        ns = None
        if noise_sampler is not None:
            ns = lambda a, b: noise_sampler(to_t(a), to_t(b)).to(wide)  # noqa: E731
        cb = None
        if callback is not None:

            def cb(d: dict[str, Any]) -> None:
                s = d["sigma"]
                callback(
                    {
                        **d,
                        "x": (d["x"] / (1 + s)).to(dtype),
                        "sigma": to_t(s),
                        "sigma_hat": to_t(d["sigma_hat"]),
                    }
                )

        inner = stepper(x_ve, s_ve, callback=cb, noise_sampler=ns, **options)
        try:
            ev = next(inner)
            while True:
                sig = ev.sigma.to(wide)
                out = yield Eval((ev.x / (1 + sig)).to(dtype), to_t(sig), ev.step)
                if isinstance(out, Guided):
                    ev = inner.send(Guided(out.denoised.to(wide), out.uncond.to(wide)))  # type: ignore[arg-type]
                else:
                    ev = inner.send(out.to(wide))
        except StopIteration as stop:
            return (stop.value / (1 + s_ve[-1])).to(dtype)

    run.__name__ = run.__qualname__ = f"{getattr(stepper, '__name__', 'stepper')}_flow"
    run.__doc__ = stepper.__doc__
    return run


def flow_info(info: SamplerInfo, options: dict[str, Any]) -> SamplerInfo:
    """The sampler as it runs on a flow model: itself for the ODE samplers, else its flow form."""
    if is_ode(info, options):
        return info
    return dataclasses.replace(info, stepper=flow_stepper(info.stepper))
