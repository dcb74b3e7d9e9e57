"""The sampling driver: one batch of images under one spec, as a state machine any loop can drive.

It owns what every way of sampling shares: the sigmas, the seeded start latents, one stepper per
slice of images, the classifier-free guidance rows (cond, then uncond; CFG++ samplers are also
sent the uncond prediction), the inpainting blend and the finiteness check. Its loops:

- :func:`drive`: one model call per pending evaluation (KSampler, direct Stable Diffusion);
- the engine: the pending evaluations of many drivers packed into one model call.

Both answer ``pending()`` with ``inputs(track)`` -> model -> ``feed(track, out)``; neither repeats
any of the above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .guidance import cfg_combine
from .spec import SamplingSpec, make_sigmas, make_steppers, start_latents
from .stepper import Callback, Eval, Guided, Stepper, check_finite

Cond = dict[str, Tensor]


@dataclass
class Track:
    """One stepper over a slice of the images, with its pending model evaluation."""

    part: slice
    stepper: Stepper
    pending: Eval | None = None
    out: Tensor | None = None
    denoised: Tensor | None = None  # the latest denoised prediction (what an interrupt returns)
    reached: float = math.inf  # adaptive samplers: the sigma its current step starts from


class Driver:
    """Samples ``x`` (the scaled start: noise * sigmas[0], plus the init for img2img) under ``spec``.

    ``cond`` / ``uncond`` hold one row per image; guidance is on when ``uncond`` is given and
    ``cfg_scale != 1``. With ``mask`` (1 = repaint) and ``init``, each prediction keeps ``init``
    outside the mask.
    """

    def __init__(
        self,
        spec: SamplingSpec,
        sigmas: Tensor,
        x: Tensor,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        cfg_scale: float = 1.0,
        init: Tensor | None = None,
        mask: Tensor | None = None,
        callback: Callback | None = None,
    ) -> None:
        self.spec, self.sigmas = spec, sigmas
        self.cond = {} if cond is None else cond
        self.uncond, self.scale = uncond, cfg_scale
        self.guided = uncond is not None and cfg_scale != 1.0
        self.needs_uncond = spec.info.needs_uncond
        # how far guidance can grow a prediction: |uncond + (cond - uncond) * s| <= (1 + 2|s|) max|row|
        self._growth = 1.0 + 2.0 * (
            float(cfg_scale.abs().max()) if isinstance(cfg_scale, Tensor) else abs(cfg_scale)
        )
        self.latest: Tensor | None = None  # the latest prediction fed (any track): the engine's preview
        self.init, self.mask = init, mask
        self.tracks = [Track(part, st) for part, st in make_steppers(spec, x, sigmas, callback)]
        self.evals = 0
        self.expected_evals = spec.info.expected_nfe(spec.run_steps, spec.options) * len(self.tracks)
        # an adaptive sampler's evaluations are not counted ahead: its progress is its way from the
        # schedule's first sigma to its last > 0, in log sigma (0 = no log span: progress by evals)
        self._log_top, self._log_span = _log_span(sigmas) if spec.info.adaptive else (0.0, 0.0)
        for track in self.tracks:
            self._advance(track, None)  # runs each sampler's set-up up to its first evaluation

    @classmethod
    def start(
        cls,
        spec: SamplingSpec,
        model: Any,
        shape: Sequence[int],
        *,
        cond: Cond | None = None,
        uncond: Cond | None = None,
        cfg_scale: float = 1.0,
        init: Tensor | None = None,
        mask: Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        callback: Callback | None = None,
        sigmas: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Driver:
        """Sigmas from the spec and the model's range (unless given), seeded start latents of
        ``shape`` [n, ...] (or ``noise``: the caller's unit-variance start noise of that shape),
        everything moved to ``device`` (the sampler state in ``dtype``). Every way of sampling
        starts here, so a flow model's ``prepare`` runs whatever the start noise."""
        sigmas = (make_sigmas(spec, model, device) if sigmas is None else sigmas).to(
            device=device, dtype=dtype
        )
        init = None if init is None else init.to(device=device, dtype=dtype)
        x = start_latents(spec, shape, sigmas, device, dtype, init, noise)
        if getattr(model, "flow", False):  # rectified flow: flow forms, Flux's shift, img2img start (flow.py)
            spec, sigmas, x = model.prepare(spec, x, sigmas, init)
        return cls(
            spec,
            sigmas,
            x,
            _to(cond, device),
            None if uncond is None else _to(uncond, device),
            cfg_scale,
            init,
            None if mask is None else mask.to(device=device, dtype=dtype),
            callback,
        )

    # --- what a loop asks ---
    @property
    def done(self) -> bool:
        return all(t.pending is None for t in self.tracks)

    @property
    def step(self) -> int:
        """Steps completed by the slowest track (an adaptive sampler: its sigma fraction of the steps;
        its own steps, tries included, are not the schedule's)."""
        pending = [t.pending.step for t in self.tracks if t.pending is not None]
        if not pending:
            return self.spec.run_steps
        fraction = self._pass_fraction()
        if fraction is None:
            return min(pending)
        return min(self.spec.run_steps - 1, int(fraction * self.spec.run_steps))

    @property
    def sigma_fraction(self) -> float | None:
        """How far the slowest track has come in log sigma from the schedule's first sigma to its last
        > 0 (0 to 1), for a sampler whose evaluation count is not known ahead; None for the others
        (their progress is evaluations done over ``expected_evals``)."""
        return self._pass_fraction()

    def _pass_fraction(self) -> float | None:
        """``sigma_fraction`` of this pass alone (Passes weighs it into the job's)."""
        if not self._log_span:
            return None
        reached = max((t.reached for t in self.tracks if t.pending is not None), default=0.0)
        if reached <= 0:
            return 1.0
        return min(1.0, max(0.0, (self._log_top - math.log(reached)) / self._log_span))

    # one pass; a job of two (hires fix) runs as sampling/passes.Passes, which counts both
    pass_no, passes = 0, 1

    @property
    def total_steps(self) -> int:
        return self.spec.run_steps

    @property
    def pass_step(self) -> int:
        return self.step

    @property
    def pass_steps(self) -> int:
        return self.spec.run_steps

    def pending(self) -> list[Track]:
        return [t for t in self.tracks if t.pending is not None]

    def rows(self, track: Track) -> int:
        """Model input rows of a track's evaluation (guided: cond and uncond rows)."""
        n = track.part.stop - track.part.start
        return n * (2 if self.guided else 1)

    def inputs(self, track: Track) -> tuple[Tensor, Tensor, Cond]:
        """Model input for a track's pending evaluation: x, sigma[rows], conditioning (cond, then uncond)."""
        ev = track.pending
        assert ev is not None
        xs, conds = self.parts(track)
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        cond = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in conds.items()}
        # a view of the one sigma (no per-row multiply); a loop that hands it to the model as it is
        # (drive) makes it contiguous
        return x, ev.sigma.to(x.dtype).expand(x.shape[0]), cond

    def parts(self, track: Track) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """A track's model input as the pieces to concatenate: its x (twice when guided: cond rows, then
        uncond rows) and each conditioning key's rows (cond, then uncond). A key whose tensor holds
        exactly the track's rows is handed as it is (no slice: a view per key per row per step)."""
        ev = track.pending
        assert ev is not None
        part = track.part
        xs = [ev.x, ev.x] if self.guided else [ev.x]
        conds = {k: [_rows(v, part)] for k, v in self.cond.items()}
        if self.guided:
            assert self.uncond is not None
            for k, v in conds.items():
                v.append(_rows(self.uncond[k], part))
        return xs, conds

    def feed(self, track: Track, out: Tensor, bound: float | None = None) -> Tensor:
        """Hand a track the model's output rows; returns the denoised prediction it was sent.

        ``bound``: the caller already found every value of the output ``out`` was sliced from finite,
        at most ``bound`` in size (:func:`finite_bound`, one check for a whole batched call); then the
        per-row check runs only where guidance could still overflow. None: checked here."""
        ev = track.pending
        assert ev is not None
        uncond_out = None
        if self.guided:
            cond_out, uncond_out = out.chunk(2)
            out = cfg_combine(cond_out, uncond_out, self.scale)
            if self.spec.guidance_rescale > 0:
                out = rescale_cfg(ev.x, ev.sigma, cond_out, out, self.spec.guidance_rescale)
        if not self._covered(bound, out):
            check_finite(out, ev)
        if self.mask is not None and self.init is not None:
            out = self._blend(track, out)
            uncond_out = None if uncond_out is None else self._blend(track, uncond_out)
        self.evals += 1
        # kept for partial() and the preview. A slice of the batched output pins that output until the
        # next feed; the multistep samplers already keep the prediction they are sent (a view) a step
        # longer, so a copy per row here bought nothing but the copy
        track.denoised = self.latest = out
        if self.needs_uncond:
            self._advance(track, Guided(out, out if uncond_out is None else uncond_out))
        else:
            self._advance(track, out)
        return out

    def result(self) -> Tensor:
        """The sampled latents, in image order (once ``done``)."""
        return torch.cat([t.out for t in self.tracks if t.out is not None])

    def partial(self) -> Tensor:
        """The images as they stand (an interrupted job's result, as A1111 returns it): a finished
        track's latents, else its latest denoised prediction, else (no step made yet) its current x."""
        parts = []
        for t in self.tracks:
            if t.out is not None:
                parts.append(t.out)
            elif t.denoised is not None:
                parts.append(t.denoised)
            else:
                assert t.pending is not None
                parts.append(t.pending.x)
        return torch.cat(parts)

    # --- internals ---
    def _covered(self, bound: float | None, out: Tensor) -> bool:
        """Whether a batched check with ``bound`` already proves ``check_finite(out)`` would pass: the
        raw rows (unguided), or a plain CFG combine of them that cannot reach the dtype's limit nor
        overflow check_finite's float32 sum. CFG rescale divides by a std that may be 0: checked."""
        if bound is None:
            return False
        if self.guided:
            if self.spec.guidance_rescale > 0:
                return False
            bound *= self._growth
        return (
            bound
            < min(_DTYPE_MAX.get(out.dtype) or _dtype_max(out.dtype), _FLOAT32_MAX / max(1, out.numel())) / 4
        )

    def _blend(self, track: Track, denoised: Tensor) -> Tensor:
        """Inpainting: the kept region's prediction is the init image itself."""
        assert self.mask is not None and self.init is not None
        m = self.mask[track.part] if self.mask.shape[0] > 1 else self.mask
        return denoised * m + self.init[track.part] * (1 - m)

    def _advance(self, track: Track, denoised: Tensor | Guided | None) -> None:
        before = track.pending
        try:
            # a Guided goes only to needs_uncond steppers, which accept it
            track.pending = next(track.stepper) if denoised is None else track.stepper.send(denoised)  # type: ignore[arg-type]
        except StopIteration as stop:
            track.pending, track.out = None, stop.value
            return
        ev = track.pending
        if self._log_span and (before is None or ev.step != before.step):
            # a step's first evaluation is at the sigma it starts from (what k-diffusion's callback
            # reports as ``sigma``): dpm_adaptive's accepted time, read without touching its math.
            # Once per step; the solver syncs on its time every step anyway.
            track.reached = float(ev.sigma)


def rescale_cfg(x: Tensor, sigma: Tensor, cond_out: Tensor, guided: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al. 2023, eqs. 15-16): scale the guided noise prediction to the std of the
    conditional one (per image), then blend ``phi`` of it with plain CFG. In noise space, as the paper
    and diffusers do: eps = (x - denoised) / sigma."""
    dims = list(range(1, x.ndim))
    eps_cond, eps_cfg = (x - cond_out) / sigma, (x - guided) / sigma
    ratio = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
    eps = phi * (eps_cfg * ratio) + (1 - phi) * eps_cfg
    return x - eps * sigma


def finite_bound(out: Tensor) -> float | None:
    """The largest |value| of ``out`` (one reduction, one sync), or None when any value is NaN or inf."""
    low, high = torch.stack(torch.aminmax(out)).tolist()
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else None


_FLOAT32_MAX = torch.finfo(torch.float32).max
_DTYPE_MAX: dict[torch.dtype, float] = {}


def _dtype_max(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).max``, looked up once per dtype (read per row per step)."""
    top = _DTYPE_MAX.get(dtype)
    if top is None:
        top = _DTYPE_MAX[dtype] = torch.finfo(dtype).max
    return top


def _log_span(sigmas: Tensor) -> tuple[float, float]:
    """(log of the first sigma, log span down to the last sigma > 0): what an adaptive sampler
    crosses (the sigma range its stepper is given, see catalog._over_sigma_range)."""
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        return 0.0, 0.0
    top, bottom = math.log(float(positive.max())), math.log(float(positive.min()))
    return top, top - bottom


def _rows(v: Tensor, part: slice) -> Tensor:
    return v if part.start == 0 and part.stop == v.shape[0] else v[part]


def batch_inputs(pending: Sequence[tuple[Driver, Track]]) -> tuple[Tensor, Tensor, Cond]:
    """The model input of several tracks' pending evaluations in one call: bit for bit what
    concatenating each ``driver.inputs(track)`` in order gives, in one op per tensor instead of a
    few per track (the sigmas: one stack of the 0-dim sigmas, repeated per row only where a track
    has several rows). Every track must have the same conditioning keys (the scheduler groups by them)."""
    xs: list[Tensor] = []
    sigmas: list[Tensor] = []
    counts: list[int] = []
    conds: dict[str, list[Tensor]] = {}
    keys = None
    for driver, track in pending:
        x_parts, c_parts = driver.parts(track)
        if keys is None:
            keys = c_parts.keys()
            conds = {k: [] for k in keys}
        elif c_parts.keys() != keys:
            raise ValueError(f"conditioning keys differ: {sorted(keys)} vs {sorted(c_parts)}")
        xs += x_parts
        for k, v in c_parts.items():
            conds[k] += v
        assert track.pending is not None
        sigmas.append(track.pending.sigma)
        counts.append(len(x_parts) * x_parts[0].shape[0])
    x = torch.cat(xs)
    if all(s.ndim == 0 for s in sigmas):
        sigma = torch.stack(sigmas).to(x.dtype)
        if len(counts) != x.shape[0]:  # some track has several rows: its sigma once per row
            repeats = torch.tensor(counts, device=sigma.device)
            sigma = sigma.repeat_interleave(repeats, output_size=x.shape[0])
    else:  # a sampler that yields a sigma of another shape: each expanded to its rows, as inputs() does
        sigma = torch.cat([s.to(x.dtype).expand(n) for s, n in zip(sigmas, counts, strict=True)])
    return x, sigma, {k: torch.cat(v) for k, v in conds.items()}


def _to(cond: Cond | None, device: torch.device | str) -> Cond:
    return {} if cond is None else {k: v.to(device) for k, v in cond.items()}


Model = Callable[..., Tensor]


def drive(driver: Driver, model: Model) -> Tensor:
    """The direct loop: one ``model(x, sigma, **cond)`` call per pending evaluation, until done."""
    while not driver.done:
        for track in driver.pending():
            x, sigma, cond = driver.inputs(track)
            driver.feed(track, model(x, sigma.contiguous(), **cond))
    return driver.result()
