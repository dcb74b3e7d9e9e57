"""The k-diffusion call convention: ``sample_<name>(model, x, sigmas, extra_args, callback, disable, **kw)``.

:func:`k_sampler` makes that function from a stepper; it drives the one stepper of its sampler with
:func:`.stepper.run`, so code written against k-diffusion switches by changing one import. The
registry makes one for every sampler (``service.sampling.sample_<name>``); ``sample_dpm_fast`` and
``sample_dpm_adaptive`` are written by hand beside their steppers, with k-diffusion's own signatures
(sigma_min, sigma_max[, n]) instead of a sigma list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .stepper import Callback, Model, Stepper, run

_HEAD = ["model", "x", "sigmas"]
_TAIL = {"extra_args": None, "callback": None, "disable": None}


def progress(
    callback: Callback | None, disable: bool | None, total: int | None
) -> tuple[Callback | None, Any]:
    """Wrap the user's callback so a tqdm bar advances once per step (nothing when disable=True)."""
    if disable is True:
        return callback, None
    bar = tqdm(total=total, disable=disable)

    def cb(info: dict[str, Any]) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    return cb, bar


def drive(
    make: Callable[[Callback | None], Stepper],
    model: Model,
    extra_args: dict[str, Any] | None,
    callback: Callback | None,
    disable: bool | None,
    total: int | None,
) -> Tensor:
    """Run the stepper ``make(callback)`` with one model call per yield and a progress bar."""
    cb, bar = progress(callback, disable, total)
    try:
        return run(make(cb), model, extra_args)
    finally:
        if bar is not None:
            bar.close()


FlowForm = Callable[[dict[str, Any]], Callable[..., Stepper]]  # options -> the stepper a flow model runs


def is_flow(model: Any, sigma_max: float, name: str) -> bool:
    """Whether ``model`` is a flow-matching denoiser (``model.flow``: SD3, Flux; sigma = its time t).

    On one, sigmas above 1 have no meaning: refused here, naming the function, instead of
    sampling nonsense. A model wrapped for guidance (CFGDenoiser) keeps the flag."""
    if not getattr(model, "flow", False):
        return False
    if not sigma_max <= 1.0 + 1e-6:
        raise ValueError(
            f"sample_{name} on a flow-matching model takes sigmas (times t) in [0, 1], got "
            f"{sigma_max:.4g}: use the model's schedule (get_sigmas_flow) or sigma_max=1"
        )
    return True


def _signature(stepper: Callable[..., Stepper], head: list[str]) -> inspect.Signature:
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in head]
    params += [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in _TAIL.items()
    ]
    for p in inspect.signature(stepper).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("callback", "info"):
            params.append(p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(params)


def k_sampler(
    stepper: Callable[..., Stepper], name: str | None = None, flow_form: FlowForm | None = None
) -> Callable[..., Tensor]:
    """Make ``sample_<name>(model, x, sigmas, ...)`` from a stepper ``name(x, sigmas, *, ...)``.

    On a flow-matching model (``model.flow``) it runs ``flow_form(options)`` instead: the sampler's
    flow form where it adds noise (as ComfyUI switches to its RF samplers), the stepper itself where
    it only solves the ODE (samplers/flow_forms.py). ``x`` is then x_t = (1 - t) x0 + t noise: the
    noise itself at t = 1, as k-diffusion's x = noise * sigmas[0]."""
    sig = _signature(stepper, _HEAD)
    label = name or stepper.__name__

    @torch.no_grad()
    def sample(*args: Any, **kwargs: Any) -> Tensor:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        model, x, sigmas = a.pop("model"), a.pop("x"), a.pop("sigmas")
        extra_args, disable = a.pop("extra_args"), a.pop("disable")
        callback = a.pop("callback")
        make = stepper
        if flow_form is not None and is_flow(model, float(sigmas.max()), label):
            make = flow_form({k: v for k, v in a.items() if k != "noise_sampler"})
        return drive(
            lambda cb: make(x, sigmas, callback=cb, **a),
            model,
            extra_args,
            callback,
            disable,
            len(sigmas) - 1,
        )

    sample.__name__ = sample.__qualname__ = f"sample_{label}"
    sample.__doc__ = stepper.__doc__
    sample.__signature__ = sig  # type: ignore[attr-defined]
    return sample
