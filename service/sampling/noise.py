"""Seeded noise: per-image generators, so image b depends only on seed b in any batch.

- :class:`NoiseSource` holds one CPU ``torch.Generator`` per image; start noise and the
  per-step noise of ancestral samplers are drawn from it in a fixed order.
- :class:`GaussianNoiseSampler` is k-diffusion's ``noise_sampler(sigma, sigma_next)`` drawing
  fresh unit normals per image.
- :class:`BrownianNoiseSampler` returns Brownian increments ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``
  for SDE samplers. It builds W lazily at the queried times only, sampling each new point
  exactly from the Brownian bridge between its known neighbours (or a free increment past
  the ends), so it is exact in distribution at a cost of one normal draw per image per new
  time, instead of the ~20 draws per query of a Brownian tree.
- :class:`BrownianTreeNoiseSampler` is the torchsde Brownian tree, one tree per image seed
  (k-diffusion semantics), for callers who want the tree itself.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NoiseSampler = Callable[[Tensor, Tensor], Tensor]

# Step noise and Brownian paths use streams derived from the image seed, so that they are
# independent of the start noise and of each other.
_BROWNIAN_STREAM = 0x5DEECE66D


Sigma = float | Tensor  # a noise level given as a number or a 0-d tensor


def _as_seeds(seeds: int | Sequence[int], batch: int) -> list[int]:
    if isinstance(seeds, int):
        return [seeds + i for i in range(batch)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch} images; give one seed per image")
    return seeds


class NoiseSource:
    """One CPU generator per image; ``randn(shape)`` returns ``[B, *shape]``."""

    def __init__(self, seeds: Sequence[int], stream: int = 0) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [
            torch.Generator("cpu").manual_seed((s ^ stream) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, index: slice) -> NoiseSource:
        """A source over some of the images, sharing their generators."""
        sub = NoiseSource.__new__(NoiseSource)
        sub.seeds = self.seeds[index]
        sub.generators = self.generators[index]
        return sub

    def randn(
        self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Tensor:
        # Drawn in float32 on the CPU so a seed gives the same image on any device and dtype.
        out = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype)


def make_noise(
    shape: Sequence[int],
    seeds: int | Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit-variance start noise of ``shape`` = (B, ...), image b drawn from seed b."""
    return NoiseSource(_as_seeds(seeds, shape[0])).randn(shape[1:], device, dtype)


class GaussianNoiseSampler:
    """Fresh unit normals per call, per image from its own generator."""

    def __init__(self, x: Tensor, source: NoiseSource) -> None:
        if len(source) != x.shape[0]:
            raise ValueError(f"noise source has {len(source)} generators for a batch of {x.shape[0]}")
        self.shape, self.device, self.dtype = x.shape[1:], x.device, x.dtype
        self.source = source

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self.source.randn(self.shape, self.device, self.dtype)


class _BrownianPaths:
    """Brownian motion in t = transform(sigma) on [sigma_min, sigma_max], one path per image seed."""

    def __init__(
        self,
        x: Tensor,
        sigma_min: float | Tensor,
        sigma_max: float | Tensor,
        seeds: int | Sequence[int] | None = None,
        transform: Callable[[Tensor], Tensor] = lambda t: t,
    ) -> None:
        if seeds is None:  # one random seed for the batch, as k-diffusion's
            seeds = int(torch.randint(0, 2**63 - 1, []).item())
        self.transform = transform
        self.start(x, _as_seeds(seeds, x.shape[0]), sigma_min, sigma_max)

    def start(self, x: Tensor, seeds: list[int], sigma_min: Sigma, sigma_max: Sigma) -> None:
        raise NotImplementedError

    def times(self, sigma: Sigma, sigma_next: Sigma) -> tuple[Tensor, Tensor]:
        return self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))


class BrownianNoiseSampler(_BrownianPaths):
    """Exact Brownian increments at the queried times, one path per image seed (see module doc)."""

    def start(self, x: Tensor, seeds: list[int], sigma_min: Sigma, sigma_max: Sigma) -> None:
        self.source = NoiseSource(seeds, stream=_BROWNIAN_STREAM)
        self.shape, self.device, self.dtype = x.shape[1:], x.device, x.dtype
        # Known points of W (float64 times, float32 values on the CPU): W(t_min) = 0.
        t0 = float(self.transform(torch.as_tensor(sigma_min)))
        self.ts: list[float] = [t0]
        self.ws: list[Tensor] = [torch.zeros(len(self.source), *self.shape)]

    def _w(self, t: float) -> Tensor:
        i = bisect.bisect_left(self.ts, t)
        if i < len(self.ts) and self.ts[i] == t:
            return self.ws[i]
        z = self.source.randn(self.shape)
        if i == 0:  # left of every known point: run the motion backwards
            w = self.ws[0] + (self.ts[0] - t) ** 0.5 * z
        elif i == len(self.ts):  # right of every known point: a free increment
            w = self.ws[-1] + (t - self.ts[-1]) ** 0.5 * z
        else:  # Brownian bridge between the neighbours
            (ta, wa), (tb, wb) = (self.ts[i - 1], self.ws[i - 1]), (self.ts[i], self.ws[i])
            frac = (t - ta) / (tb - ta)
            w = wa + frac * (wb - wa) + ((t - ta) * (tb - t) / (tb - ta)) ** 0.5 * z
        self.ts.insert(i, t)
        self.ws.insert(i, w)
        return w

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = map(float, self.times(sigma, sigma_next))
        w0, w1 = self._w(t0), self._w(t1)
        out = (w1 - w0) / abs(t1 - t0) ** 0.5
        return out.to(device=self.device, dtype=self.dtype)


class BrownianTreeNoiseSampler(_BrownianPaths):
    """torchsde Brownian tree noise, one tree per image seed (k-diffusion's semantics)."""

    def start(self, x: Tensor, seeds: list[int], sigma_min: Sigma, sigma_max: Sigma) -> None:
        import torchsde  # imported here: only callers of the tree pay for it

        t0, t1 = self.times(sigma_min, sigma_max)
        self.lo, self.hi, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x[0])
        self.trees = [torchsde.BrownianTree(self.lo, w0, self.hi, entropy=s) for s in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        t0, t1 = self.times(sigma, sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def default_noise_sampler(x: Tensor) -> NoiseSampler:
    """k-diffusion's default: unseeded normals from the global RNG (reproducible via torch.manual_seed)."""
    return lambda sigma, sigma_next: torch.randn_like(x)
