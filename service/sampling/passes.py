"""A job of two sampling passes (A1111's hires fix: a first pass, then img2img at a larger size) as
one driver any loop can run.

:class:`Passes` is a :class:`Driver` that, when its last track finishes, continues as the driver
``next_pass(latents)`` builds from its result (the upscale and the fresh noise happen there, in
whatever thread fed that evaluation: the engine's worker). So the engine needs nothing new: a
second pass's evaluations are planned like any other request's and batch with whatever else runs
at that size; progress counts both passes (``step`` / ``total_steps``; ``pass_no`` / ``pass_step``
/ ``pass_steps`` for A1111's per-pass ``sampling_step``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .driver import Driver, Track

NextPass = Callable[[Tensor], Driver]


class Passes(Driver):
    """``first``'s sampling, then the driver ``next_pass`` builds from its result. ``next_steps``
    and ``next_evals``: the second pass's steps and expected model evaluations (progress before it
    starts)."""

    def __init__(self, first: Driver, next_pass: NextPass, next_steps: int, next_evals: int) -> None:
        # no Driver.__init__: the first pass is built already; this driver takes over its state
        vars(self).update(vars(first))
        self._next: NextPass | None = next_pass
        self.passes, self.pass_no = 2, 0
        self.pass_sizes = [first.spec.steps, next_steps]
        self.expected_evals = first.expected_evals + next_evals
        self._before, self._pass_evals = 0, first.expected_evals  # evaluations before this pass, in it

    def feed(self, track: Track, out: Tensor, bound: float | None = None) -> Tensor:
        denoised = super().feed(track, out, bound)
        if self._next is not None and all(t.pending is None for t in self.tracks):
            next_pass, self._next = self._next, None
            evals = self.evals
            following = next_pass(self.result())
            vars(self).update(vars(following))  # the next pass's spec, sigmas, rows, tracks
            self.evals, self.pass_no, self.latest = evals, 1, denoised  # the preview until the next feed
            self.expected_evals = evals + following.expected_evals
            self._before, self._pass_evals = evals, following.expected_evals
        return denoised

    @property
    def step(self) -> int:
        """Steps done over both passes (the first counted whole once the second runs)."""
        return sum(self.pass_sizes[: self.pass_no]) + self.pass_step

    @property
    def sigma_fraction(self) -> float | None:
        """An adaptive pass's sigma fraction as its share of the job: the pass weighs the evaluations
        expected of it (None: a pass that counts its evaluations)."""
        fraction = self._pass_fraction()
        if fraction is None:
            return None
        return (self._before + fraction * self._pass_evals) / max(1, self.expected_evals)

    @property
    def total_steps(self) -> int:
        return sum(self.pass_sizes)

    @property
    def pass_step(self) -> int:
        return Driver.step.fget(self)  # type: ignore[attr-defined,no-any-return]

    @property
    def pass_steps(self) -> int:
        return self.pass_sizes[self.pass_no]
