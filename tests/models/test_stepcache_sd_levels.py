"""DeepCache's split level on diffusers' UNet2DConditionModel (the sd-webui extension's
``deepcache_cache_resnet_level``): at every level a cached evaluation is DeepCache built by hand on
diffusers' forward (the features entering the up layer that takes skip L swapped for the last full
evaluation's), a level past the last skip is the last, and rows of different levels share a call,
each equal to its own run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.sd_unet import SDUNet  # noqa: E402
from service.models.stepcache import STORE, CacheSpec, cache_rows  # noqa: E402
from tests.support.deepcache_oracle import (  # noqa: E402
    assert_rows_as_alone,
    entry_of,
    random_step,
    restore_fixed_shape,
    skip_channels,
    swapped,
    wrapped,
)  # noqa: E402
from tests.support.sd_tiny import make_sd_components  # noqa: E402


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def net(request: pytest.FixtureRequest) -> tuple[SDUNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    unet = make_sd_components(sdxl=request.param == "sdxl")["unet"]
    return wrapped(unet)  # type: ignore[no-any-return]


fixed_shape = pytest.fixture(autouse=True)(restore_fixed_shape)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 x 14 latents: not a multiple of the up factor, so every upsampler is told its size."""
    return random_step(seed, 10, 14)


@torch.inference_mode()
def test_every_level_is_deepcache_by_hand(net: tuple[SDUNet, dict]) -> None:
    """Full at (x1, t1), cached at (x2, t2), interval 2, at every level: diffusers' forward at (x2, t2)
    with the features entering the up layer that takes skip L replaced by those of (x1, t1); the mid
    block does not run; a level past the last skip (the extension's slider reaches 10) is the last."""
    model, cond = net
    unet = model.unet
    channels = skip_channels(unet)
    (x1, t1), (x2, t2) = _inputs(2), _inputs(3)
    mids: list[int] = []
    hook = unet.mid_block.register_forward_hook(lambda m, a, o: mids.append(1))
    got = {}
    for level in [*range(len(channels)), 10]:
        rows = cache_rows(CacheSpec("deepcache", interval=2, level=level), 3)
        model(x1, t1, **cond, cache=rows)
        mids.clear()
        got[level] = model(x2, t2, **cond, cache=rows)
        assert mids == []
    hook.remove()
    assert torch.equal(got[10], got[len(channels) - 1])
    for level, width in enumerate(channels):
        entry = entry_of(unet, level)
        want = swapped(entry, width, lambda: model(x1, t1, **cond), lambda: model(x2, t2, **cond))
        assert (got[level] - want).abs().max() <= 1e-6, level
    plain = model(x2, t2, **cond)
    assert all((g - plain).abs().max() > 1e-4 for g in got.values())  # the cache changed the output
    assert len({float(g.abs().sum()) for g in got.values()}) == len(channels)  # levels differ


@torch.inference_mode()
@pytest.mark.parametrize("fixed", [True, False])
def test_rows_of_different_levels_share_a_call(net: tuple[SDUNet, dict], fixed: bool) -> None:
    """Rows at levels 0, 2 and 1 (interval 2, 3, 2) and a row without a cache, four evaluations in
    one call each: every row equals a call of four copies of it (the uncached one bit for bit with
    fixed shapes; otherwise the deep parts run on fewer rows: rounding only)."""
    model, cond = net
    STORE.fixed_shape = fixed
    specs = [
        CacheSpec("deepcache", interval=2, level=0),
        CacheSpec("deepcache", interval=3, level=2),
        None,
        CacheSpec("deepcache", interval=2, level=1),
    ]
    pick4 = torch.tensor([0, 1, 2, 0])
    cond4 = {k: v.index_select(0, pick4) for k, v in cond.items()}
    steps = [random_step(20 + i, 8, 8, rows=4) for i in range(4)]
    held = [cache_rows(s, 1) for s in specs]  # the ids live as long as these tensors
    STORE.reset_counts()
    mixed = [model(x, t, **cond4, cache=torch.cat(held)) for x, t in steps]
    assert STORE.reused == 6  # rows 0 and 3 at evaluations 2 and 4, row 1 at 2 and 3
    assert_rows_as_alone(model, specs, cond4, steps, mixed, exact=lambda spec: spec is None and fixed)


def test_level_is_a_deepcache_setting_in_range() -> None:
    """``level`` on fbcache, or outside 0-12 (ComfyUI-DeepCache's cache_depth range), is refused
    naming cache.level; recorded when given, so the record reproduces it."""
    from service.sampling.errors import InputError

    for spec, methods in (
        (CacheSpec("fbcache", level=1), ("fbcache",)),
        (CacheSpec("deepcache", level=13), ("deepcache",)),
    ):
        with pytest.raises(InputError) as err:
            spec.resolved(methods)
        assert err.value.field == "cache.level"
    assert CacheSpec("deepcache", level=0).resolved(("deepcache",)).record() == {
        "method": "deepcache",
        "interval": 3,
        "level": 0,
    }
