"""Sampler nodes (KSampler, KSamplerAdvanced, the custom-sampling set): each becomes a
:class:`~service.comfy.sample.SampleCall` run through the serving layer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from service.sampling.spec import StepWindow

from .node import Catalog, Enum, Float, In, Int, Seed, node
from .runtime import NodeRun
from .sample import SampleCall, sample
from .values import Guider, Latent, ModelRef, NoiseRef, SamplerRef, SigmasRef

MODEL, COND, LATENT = In("MODEL"), In("CONDITIONING"), In("LATENT")
DENOISE = Float(1.0, 0.0, 1.0, 0.01)
CFG = Float(8.0, 0.0, 100.0, 0.1, extra=(("round", 0.01),))
CS = "sampling/custom_sampling/"  # the custom-sampling categories
SIGMA = Float(1.0, 0.0, 5000.0, 0.01, extra=(("round", False),))


def _sampler(c: Catalog) -> In:
    return Enum(c.samplers, "euler", accepts=c.resolves_sampler)


def _scheduler(c: Catalog) -> In:
    return Enum(c.schedules, "normal", accepts=c.resolves_schedule)


def _steps(c: Catalog) -> In:
    return Int(20, 1, c.max_steps)


def _ksampler(c: Catalog, seed: str, head: dict[str, In], tail: dict[str, In]) -> dict[str, In]:
    """KSampler's inputs in ComfyUI's order (KSamplerAdvanced adds add_noise first, steps last)."""
    names = {
        seed: Seed(),
        "steps": _steps(c),
        "cfg": CFG,
        "sampler_name": _sampler(c),
        "scheduler": _scheduler(c),
    }
    conds = {"positive": COND, "negative": COND, "latent_image": LATENT}
    return {"model": MODEL, **head, **names, **conds, **tail}


async def _run(call: SampleCall, rt: NodeRun) -> Latent:
    if call.sigmas.denoise <= 0:  # ComfyUI: nothing to do, the latent as it came
        return call.latent
    return await sample(call, rt)


def _call(kw: dict[str, Any], sigmas: SigmasRef, seed: int | None) -> SampleCall:
    m, p, n, latent = kw["model"], kw["positive"], kw["negative"], kw["latent_image"]
    return SampleCall(m, p, n, kw["cfg"], kw["sampler_name"], sigmas, seed, latent)


@node("KSampler", "sampling", ["LATENT"], lambda c: _ksampler(c, "seed", {}, {"denoise": DENOISE}))
async def ksampler(rt: NodeRun, **kw: Any) -> tuple[Any, ...]:
    """Samples with our engine (batched with all other requests)."""
    sigmas = SigmasRef(kw["scheduler"], kw["steps"], kw["denoise"])
    return (await _run(_call(kw, sigmas, kw["seed"]), rt),)


def _advanced(c: Catalog) -> dict[str, In]:
    at = {"start_at_step": Int(0, 0, 10000), "end_at_step": Int(10000, 0, 10000)}
    return _ksampler(c, "noise_seed", {"add_noise": Enum(("enable", "disable"))}, at) | {
        "return_with_leftover_noise": Enum(("disable", "enable"))
    }


@node("KSamplerAdvanced", "sampling", ["LATENT"], _advanced)
async def ksampler_advanced(rt: NodeRun, **kw: Any) -> tuple[Any, ...]:
    """ComfyUI's rules: the schedule of ``steps`` steps; end_at_step < steps stops there, at sigma 0
    (its last step jumps there) or, with return_with_leftover_noise, with that step's noise left in
    the latents; start_at_step runs from there (at or past the end: the latent as it came);
    add_noise disable adds no noise to the start (a leftover-noise latent continues as it is)."""
    steps, start, end = kw["steps"], kw["start_at_step"], kw["end_at_step"]
    if start >= min(end, steps):
        return (kw["latent_image"],)
    leftover = kw["return_with_leftover_noise"] == "enable"
    window = StepWindow(start, end if end < steps else None, leftover)
    call = _call(kw, SigmasRef(kw["scheduler"], steps), kw["noise_seed"])
    call = replace(call, add_noise=kw["add_noise"] == "enable", window=window)
    return (await _run(call, rt),)


@node("KSamplerSelect", CS + "samplers", ["SAMPLER"], lambda c: {"sampler_name": _sampler(c)})
async def ksampler_select(rt: NodeRun, sampler_name: str) -> tuple[Any, ...]:
    return (SamplerRef(sampler_name),)


def _basic(c: Catalog) -> dict[str, In]:
    return {"model": MODEL, "scheduler": _scheduler(c), "steps": _steps(c), "denoise": DENOISE}


@node("BasicScheduler", CS + "schedulers", ["SIGMAS"], _basic)
async def basic_scheduler(
    rt: NodeRun, model: ModelRef, scheduler: str, steps: int, denoise: float
) -> tuple[Any, ...]:
    """The schedule is made for the sampler's model when it samples."""
    return (SigmasRef(scheduler, steps, denoise, model=model.name),)


def _karras(c: Catalog) -> dict[str, In]:
    bounds = {"sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}
    return {"steps": _steps(c)} | {
        k: In("FLOAT", v, 0.0, 5000.0, 0.01, extra=SIGMA.extra) for k, v in bounds.items()
    }


@node("KarrasScheduler", CS + "schedulers", ["SIGMAS"], _karras)
async def karras_scheduler(rt: NodeRun, steps: int, **kw: float) -> tuple[Any, ...]:
    return (SigmasRef("karras", steps, 1.0, tuple(sorted(kw.items()))),)


@node("RandomNoise", CS + "noise", ["NOISE"], {"noise_seed": Seed()})
async def random_noise(rt: NodeRun, noise_seed: int) -> tuple[Any, ...]:
    return (NoiseRef(noise_seed),)


_CFG_GUIDER = {"model": MODEL, "positive": COND, "negative": COND, "cfg": CFG}


@node("CFGGuider", CS + "guiders", ["GUIDER"], _CFG_GUIDER)
async def cfg_guider(
    rt: NodeRun, model: ModelRef, positive: Any, negative: Any, cfg: float
) -> tuple[Any, ...]:
    return (Guider(model, positive, negative, cfg),)


@node("BasicGuider", CS + "guiders", ["GUIDER"], {"model": MODEL, "conditioning": COND})
async def basic_guider(rt: NodeRun, model: ModelRef, conditioning: Any) -> tuple[Any, ...]:
    """No negative prompt, no classifier-free guidance (cfg 1)."""
    return (Guider(model, conditioning, None, 1.0),)


async def _custom(rt: NodeRun, g: Guider, kw: dict[str, Any], seed: int | None) -> tuple[Any, ...]:
    sampler: SamplerRef = kw["sampler"]
    call = SampleCall(
        g.model, g.positive, g.negative, g.cfg, sampler.name, kw["sigmas"], seed, kw["latent_image"]
    )
    out = await _run(call, rt)
    return out, out  # the run ends at sigma 0: the output is its own denoised prediction


_CUSTOM_TAIL = {"sampler": In("SAMPLER"), "sigmas": In("SIGMAS"), "latent_image": LATENT}


def _sampler_custom(c: Catalog) -> dict[str, In]:
    head = {"model": MODEL, "add_noise": In("BOOLEAN", True), "noise_seed": Seed(), "cfg": CFG}
    return head | {"positive": COND, "negative": COND} | _CUSTOM_TAIL


@node("SamplerCustom", CS[:-1], [("LATENT", "output"), ("LATENT", "denoised_output")], _sampler_custom)
async def sampler_custom(rt: NodeRun, **kw: Any) -> tuple[Any, ...]:
    guider = Guider(kw["model"], kw["positive"], kw["negative"], kw["cfg"])
    return await _custom(rt, guider, kw, kw["noise_seed"] if kw["add_noise"] else None)


@node(
    "SamplerCustomAdvanced",
    CS[:-1],
    [("LATENT", "output"), ("LATENT", "denoised_output")],
    {"noise": In("NOISE"), "guider": In("GUIDER")} | _CUSTOM_TAIL,
)
async def sampler_custom_advanced(rt: NodeRun, noise: NoiseRef, guider: Guider, **kw: Any) -> tuple[Any, ...]:
    return await _custom(rt, guider, kw, noise.seed)
