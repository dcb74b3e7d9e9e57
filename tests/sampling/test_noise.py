"""Seeded noise: per-image determinism, and the Brownian sampler's exact statistics."""

from __future__ import annotations

import math

import pytest
import torch

from service.sampling import BrownianNoiseSampler, BrownianTreeNoiseSampler, NoiseSource, make_noise
from service.sampling.schedules import get_sigmas_karras

B = 20_000
TOL = 5 / math.sqrt(B)  # ~5 standard errors of a correlation estimate


def test_make_noise_per_image_seed() -> None:
    batch = make_noise((3, 2, 4), [5, 6, 7])
    assert torch.equal(batch[1], make_noise((1, 2, 4), [6])[0])
    assert torch.equal(make_noise((2, 3), 10), make_noise((2, 3), [10, 11]))
    with pytest.raises(ValueError, match="one seed per image"):
        make_noise((2, 3), [1, 2, 3])


def test_noise_source_subset_shares_generators() -> None:
    src = NoiseSource([1, 2, 3])
    first = src.subset(slice(1, 2)).randn((4,))
    assert torch.equal(first[0], NoiseSource([2]).randn((4,))[0])


def _dpmpp_sde_queries(
    sampler: BrownianNoiseSampler | BrownianTreeNoiseSampler, sigmas: torch.Tensor
) -> list:
    """The (sigma, s) and (sigma, sigma_next) queries dpmpp_sde makes, in its order."""
    out = []
    for i in range(len(sigmas) - 2):
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        s = (t + (t_next - t) / 2).neg().exp()
        out.append((sigmas[i], s, sigmas[i + 1], sampler(sigmas[i], s), sampler(sigmas[i], sigmas[i + 1])))
    return out


def test_brownian_increments_and_bridges_have_exact_statistics() -> None:
    x = torch.zeros(B, 1)
    sigmas = get_sigmas_karras(6, 0.1, 10.0)
    sampler = BrownianNoiseSampler(x, sigmas[-2], sigmas[0], seeds=list(range(B)))
    queries = _dpmpp_sde_queries(sampler, sigmas)
    fulls = []
    for sigma, s, sigma_next, n_half, n_full in queries:
        for n in (n_half, n_full):
            assert abs(n.mean().item()) < TOL and abs(n.var().item() - 1) < 4 * TOL
        # Nested intervals: corr = sqrt(|s - sigma| / |sigma_next - sigma|) for the bridge point s.
        expected = math.sqrt(float((sigma - s) / (sigma - sigma_next)))
        corr = torch.corrcoef(torch.stack([n_half[:, 0], n_full[:, 0]]))[0, 1].item()
        assert abs(corr - expected) < TOL
        fulls.append(n_full[:, 0])
    # Disjoint intervals are independent.
    c = torch.corrcoef(torch.stack(fulls))
    off_diagonal = c - torch.diag(torch.diag(c))
    assert off_diagonal.abs().max().item() < TOL


def test_brownian_is_per_image_and_repeatable() -> None:
    sigmas = get_sigmas_karras(5, 0.1, 10.0)
    a = BrownianNoiseSampler(torch.zeros(3, 2), 0.1, 10.0, seeds=[4, 5, 6])
    b = BrownianNoiseSampler(torch.zeros(1, 2), 0.1, 10.0, seeds=[5])
    for i in range(len(sigmas) - 2):
        na, nb = a(sigmas[i], sigmas[i + 1]), b(sigmas[i], sigmas[i + 1])
        assert torch.equal(na[1], nb[0])
    # Querying a known interval again returns the same increment (it is a path, not fresh noise).
    assert torch.equal(a(sigmas[0], sigmas[1]), a(sigmas[0], sigmas[1]))


def test_tree_sampler_gives_k_diffusion_tree_noise(kd) -> None:  # type: ignore[no-untyped-def]
    """Our torchsde tree wrapper returns exactly k-diffusion's tree noise for the same per-image seeds."""
    x = torch.zeros(3, 2)
    sigmas = get_sigmas_karras(4, 0.1, 10.0)
    ours = BrownianTreeNoiseSampler(x, 0.1, 10.0, seeds=[1, 2, 3])
    theirs = kd.sampling.BrownianTreeNoiseSampler(x, 0.1, 10.0, seed=[1, 2, 3])
    for i in range(len(sigmas) - 2):
        assert torch.allclose(ours(sigmas[i], sigmas[i + 1]), theirs(sigmas[i], sigmas[i + 1]), atol=1e-6)
