"""A job's sampling state: its steppers and their pending evaluations (touched by the engine thread only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.sampling.guidance import cfg_combine
from service.sampling.ksampler import make_sigmas, make_steppers, sampling_dtype, start_latents
from service.sampling.stepper import Eval, Guided, Stepper, check_finite

from .jobs import JobRequest


@dataclass
class Track:
    """One stepper over a slice of the job's images, with its pending model evaluation."""

    part: slice
    stepper: Stepper
    pending: Eval | None = None
    out: Tensor | None = None


class JobWork:
    """Builds a job's steppers (seeded per image) and feeds them denoised predictions."""

    def __init__(
        self, req: JobRequest, denoiser: Any, latent_shape: tuple[int, ...], device: Any, dtype: Any
    ):
        self.req = req
        dtype = sampling_dtype(dtype)  # the model casts to its own dtype; the sampler state stays exact
        self.sigmas = make_sigmas(req.spec, denoiser, device).to(dtype)
        init = None if req.init is None else req.init.to(device=device, dtype=dtype)
        shape = req.latent_shape or latent_shape
        x = start_latents(req.spec, (req.n, *shape), self.sigmas, device, dtype, init)
        self.init = init
        self.mask = None if req.mask is None else req.mask.to(device=device, dtype=dtype)
        self.cond = {k: v.to(device) for k, v in req.cond.items()}
        self.uncond = None if req.uncond is None else {k: v.to(device) for k, v in req.uncond.items()}
        self.scale = req.cfg_scale
        self.guided = req.guided
        self.needs_uncond = req.spec.info.needs_uncond  # CFG++ samplers are sent Guided(denoised, uncond)
        self.tracks = [Track(part, st) for part, st in make_steppers(req.spec, x, self.sigmas)]
        self.evals = 0
        self.expected_evals = req.spec.info.expected_nfe(req.spec.steps, req.spec.options) * len(self.tracks)
        for track in self.tracks:
            self._advance(track, None)

    @property
    def done(self) -> bool:
        return all(t.pending is None for t in self.tracks)

    @property
    def step(self) -> int:
        """Steps completed by the slowest track."""
        pending = [t.pending.step for t in self.tracks if t.pending is not None]
        return min(pending) if pending else self.req.spec.steps

    def rows(self, track: Track) -> int:
        n = track.part.stop - track.part.start
        return n * (2 if self.guided else 1)

    def inputs(self, track: Track) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Model input rows for a track's pending eval: x, sigma[B], conditioning (cond rows, then uncond)."""
        ev = track.pending
        assert ev is not None
        x = ev.x
        cond = {k: v[track.part] for k, v in self.cond.items()}
        if self.guided:
            assert self.uncond is not None
            x = torch.cat([x, x])
            unc = {k: v[track.part] for k, v in self.uncond.items()}
            cond = {k: torch.cat([cond[k], unc[k]]) for k in cond}
        sigma = ev.sigma.to(x.dtype) * x.new_ones([x.shape[0]])
        return x, sigma, cond

    def feed(self, track: Track, out: Tensor) -> Tensor:
        """Hand a track its model output rows; returns the denoised prediction it was sent."""
        ev = track.pending
        assert ev is not None
        uncond_out = None
        if self.guided:
            cond_out, uncond_out = out.chunk(2)
            out = cfg_combine(cond_out, uncond_out, self.scale)
        check_finite(out, ev)
        if self.mask is not None and self.init is not None:
            out = self._blend(track, out)
            uncond_out = None if uncond_out is None else self._blend(track, uncond_out)
        self.evals += 1
        if self.needs_uncond:
            self._advance(track, Guided(out, out if uncond_out is None else uncond_out))
        else:
            self._advance(track, out)
        return out

    def _blend(self, track: Track, denoised: Tensor) -> Tensor:
        """Inpainting: the kept region's prediction is the init image itself."""
        assert self.mask is not None and self.init is not None
        m = self.mask[track.part] if self.mask.shape[0] > 1 else self.mask
        return denoised * m + self.init[track.part] * (1 - m)

    def _advance(self, track: Track, denoised: Tensor | Guided | None) -> None:
        try:
            # a Guided goes only to needs_uncond steppers, which accept it
            track.pending = next(track.stepper) if denoised is None else track.stepper.send(denoised)  # type: ignore[arg-type]
        except StopIteration as stop:
            track.pending, track.out = None, stop.value

    def result(self) -> Tensor:
        return torch.cat([t.out for t in self.tracks if t.out is not None])
