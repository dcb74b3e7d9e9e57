"""DeepCache on Stable Diffusion with ControlNets (tiny random SD 1.x / SDXL models and ControlNets
saved in diffusers' layout, loaded through the model store): on a cached evaluation the ControlNets
run only up to the two shallow skips' residuals (models/stepcache/sd_unet.py), and

- the result is what the previous code computed (every ControlNet in full, its shallow residuals
  used) bit for bit, and DeepCache built by hand on diffusers' UNet2DConditionModel + ControlNetModel
  forward (the features entering the last up block's second-to-last layer swapped for the last full
  evaluation's; the ControlNet's shallow residuals at this step);
- in a call mixing cached and uncached rows, with and without ControlNets, every row equals its own
  run, the ControlNets' deeper layers running for the rows that run the UNet's deep part only;
- the same for ControlNet-Union (SDXL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.controlnet import HINT, UNIT  # noqa: E402
from service.models.stepcache import STORE, CacheSpec, cache_rows  # noqa: E402
from service.models.stepcache import sd_unet as deepcache  # noqa: E402
from service.models.store import ModelStore  # noqa: E402
from service.serving.request import ControlNetRef, GenerationRequest  # noqa: E402
from tests.models.test_controlnet_diffusers import control_png  # noqa: E402
from tests.support.controlnet_tiny import sd_models_with_controlnets  # noqa: E402
from tests.support.deepcache_oracle import Full, assert_rows_as_alone, entry_of, skip_channels, swapped  # noqa: E402
from tests.support.union_tiny import union_store  # noqa: E402

NETS = {"sd1": "cn_a", "sdxl": "cn_xl"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("cn-cache-store")
    return root, sd_models_with_controlnets(root)


@pytest.fixture(autouse=True)
def fixed_shape() -> Iterator[None]:
    yield
    STORE.fixed_shape = True


def _cond(sd: Any, units: list[ControlNetRef]) -> dict[str, torch.Tensor]:
    """One request's cond row (64x64: 8x8 latents), as the service builds it."""
    fields = GenerationRequest(controlnets=units)
    job = sd.job_inputs("a red cat", "", n=1, cfg_scale=1.0, width=64, height=64, fields=fields)
    return {k: v for k, v in job.cond.items() if isinstance(v, torch.Tensor)}


def _step(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g) * 999


def _old_forward(net: Any, cache: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The previous code's cached forward: every ControlNet in full for every row, the summed
    residuals handed to the split (its shallow ones used on cached rows)."""
    y, ids = cond.get("y"), cond.get("time_ids")
    staged = net.controls.staged(x, t, cond["context"], cond[HINT], cond[UNIT], {"y": y, "time_ids": ids})
    added = None if y is None else {"text_embeds": y, "time_ids": ids}
    split = deepcache.levels(net.unet, cache)
    control = None if staged is None else Full(staged.full(), split[0])
    return deepcache.forward(net.unet, cache, x, t, cond["context"], added, control, split)  # type: ignore[no-any-return]


def _count_calls(module: Any, into: list[int]) -> Any:
    return module.register_forward_hook(lambda m, a, o: into.append(a[0].shape[0]))


@torch.inference_mode()
@pytest.mark.parametrize("level", [1, 0, 2])
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_a_cached_evaluation_with_a_controlnet(
    store: tuple[Path, dict[str, Any]], model: str, level: int
) -> None:
    """Full at (x1, t1), cached at (x2, t2) (interval 2; levels 1, the default, 0 and 2), one row with
    a ControlNet unit: equal to the previous code (the ControlNet in full, its residuals up to the
    level used) bit for bit, and to DeepCache by hand on diffusers' UNet + ControlNetModel; on the
    cached evaluation neither the UNet's nor the ControlNet's deeper layers run."""
    root, refs = store
    sd = ModelStore(root).load(model).text_model  # type: ignore[attr-defined]
    net = sd.denoiser.inner_model
    cond = _cond(sd, [ControlNetRef(NETS[model], control_png(5, 64))])
    (x1, t1), (x2, t2) = _step(1, 1), _step(2, 1)
    spec = CacheSpec("deepcache", interval=2, level=level)
    new_rows, old_rows = cache_rows(spec, 1), cache_rows(spec, 1)
    ours = net.controls.nets[0]
    mids: list[int] = []
    hooks = [_count_calls(ours.mid_block, mids), _count_calls(net.unet.mid_block, mids)]
    got = []
    for k, (x, t) in enumerate(((x1, t1), (x2, t2))):
        mids.clear()
        got.append(net(x, t, **cond, cache=new_rows))
        assert mids == ([1, 1] if k == 0 else [])  # cached: no deep layer of either network runs
        assert torch.equal(got[-1], _old_forward(net, old_rows, x, t, cond))
    for h in hooks:
        h.remove()

    # by hand on diffusers' forward: its ControlNetModel's residuals at each step (weight 1, Balanced,
    # no mask: the residuals as they come), the deep features swapped for the full evaluation's
    unet, ref = net.unet, refs[NETS[model]]
    hint = cond[HINT][:, 0, :3].float() / 255
    added = None if "y" not in cond else {"text_embeds": cond["y"], "time_ids": cond["time_ids"]}
    entry, width = entry_of(unet, level), skip_channels(unet)[level]

    def plain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        down, mid = ref(x, t, cond["context"], hint, added_cond_kwargs=added, return_dict=False)
        return unet(  # type: ignore[no-any-return]
            x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added, return_dict=False,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        )[0]  # fmt: skip

    assert (plain(x1, t1) - got[0]).abs().max() <= 1e-5
    want = swapped(entry, width, lambda: plain(x1, t1), lambda: plain(x2, t2))
    assert (got[1] - want).abs().max() <= 1e-5
    assert (got[1] - plain(x2, t2)).abs().max() > 1e-4  # the cache changed the output


@torch.inference_mode()
@pytest.mark.parametrize("levels", ["default", "mixed"])
@pytest.mark.parametrize("fixed", [True, False])
def test_mixed_rows_with_and_without_controlnets_equal_each_alone(
    store: tuple[Path, dict[str, Any]], fixed: bool, levels: str
) -> None:
    """Rows: interval 2 + cn_a; no cache + cn_a; interval 3 without ControlNet; interval 2 + cn_a and
    cn_b (soft injection) with a masked unit; four evaluations, one call each. Every row equals a call
    of four copies of it alone (within rounding: the ControlNets' batches are the (row, unit) pairs
    using them, which differ); with fixed shapes the call is the previous code's bit for bit. The
    ControlNets' deeper layers run for the rows that run the UNet's deep part (every row of the call
    with fixed shapes, as the UNet's; without them those rows only). ``mixed``: the cached rows at
    levels 0, 2 and 1 (the ControlNets then split at level 0, the call's shallowest; rows of the
    other levels run on at that split and decide at their own)."""
    root, _ = store
    sd = ModelStore(root).load("sd1").text_model  # type: ignore[attr-defined]
    net = sd.denoiser.inner_model
    STORE.fixed_shape = fixed
    half = control_png(9, 64)  # a mask image: random, so the effective region is partial
    units = [
        [ControlNetRef("cn_a", control_png(1, 64))],
        [ControlNetRef("cn_a", control_png(2, 64), weight=0.7)],
        [],
        [
            ControlNetRef("cn_a", control_png(3, 64), weight=1.2, mask=half),
            ControlNetRef("cn_b", control_png(4, 64), weight=0.5, control_mode="My prompt is more important"),
        ],
    ]
    lv = [0, 2, 1] if levels == "mixed" else [None] * 3
    specs = [
        CacheSpec("deepcache", interval=2, level=lv[0]),
        None,
        CacheSpec("deepcache", interval=3, level=lv[1]),
        CacheSpec("deepcache", interval=2, level=lv[2]),
    ]
    conds = [_cond(sd, u) for u in units]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    own_rows = [cache_rows(s, 1) for s in specs]  # the ids live as long as these tensors
    held = torch.cat(own_rows)
    steps = [_step(10 + i, 4) for i in range(4)]
    STORE.reset_counts()
    deep: dict[str, list[int]] = {"cn_a": [], "cn_b": []}
    nets = {n: net.controls.nets[net.controls.resolve(n, "t")] for n in deep}
    hooks = [_count_calls(nets[n].mid_block, deep[n]) for n in deep]
    old_own = [cache_rows(s, 1) for s in specs]
    old_rows = torch.cat(old_own)
    mixed = []
    for x, t in steps:
        for v in deep.values():
            v.clear()
        mixed.append(net(x, t, **cond, cache=held))
        if len(mixed) == 2:  # rows 0, 2, 3 reuse their cache: the deep parts run for row 1's pairs only
            want = {"cn_a": [1], "cn_b": []}  # without fixed shapes: row 1's pairs only
            if levels == "mixed":  # rows 2 and 3 run on at the level-0 split
                want = {"cn_a": [2], "cn_b": [1]}
            assert deep == ({"cn_a": [3], "cn_b": [1]} if fixed else want)
        old = _old_forward(net, old_rows, x, t, cond)
        if fixed:  # every deep layer on every row of the call when any row needs it: as before
            assert torch.equal(mixed[-1], old)
        else:  # the ControlNets' deeper layers on fewer pairs: rounding only
            assert (mixed[-1] - old).abs().max() <= 1e-5
    for h in hooks:
        h.remove()
    assert STORE.reused >= 4  # rows 0 and 3 at evaluations 2 and 4, row 2 at 2 and 3 (and the old path's)
    assert_rows_as_alone(net, specs, cond, steps, mixed)


@pytest.fixture(scope="module")
def union_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("union-cache-store")
    union_store(root, sd1=False)
    return root


@torch.inference_mode()
@pytest.mark.parametrize("fixed", [True, False])
def test_a_union_controlnet_is_split_too(union_root: Path, fixed: bool) -> None:
    """ControlNet-Union (SDXL): rows at level 2, intervals 2 and 3, with union units
    (canny; depth at weight 0.6) and an uncached row with one (openpose, "ControlNet is more
    important"), three evaluations: with fixed shapes the previous code (the union in full) bit for
    bit, without them within rounding, and every row its own run; the union's deeper layers run for
    the items of the rows that run the UNet's deep part."""
    sd = ModelStore(union_root).load("sdxl").text_model  # type: ignore[attr-defined]
    net = sd.denoiser.inner_model
    STORE.fixed_shape = fixed
    units = [
        [ControlNetRef("union_promax", control_png(1, 64), control_type="canny")],
        [ControlNetRef("union_promax", control_png(2, 64), weight=0.6, control_type="depth")],
        [ControlNetRef("union_promax", control_png(3, 64), control_type="openpose", control_mode=2)],
    ]
    specs = [CacheSpec("deepcache", interval=2, level=2), CacheSpec("deepcache", interval=3, level=2), None]
    conds = [_cond(sd, u) for u in units]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    own, old_own = [cache_rows(s, 1) for s in specs], [cache_rows(s, 1) for s in specs]
    union = net.controls.nets[net.controls.resolve("union_promax", "t")]
    items: list[int] = []
    hook = _count_calls(union.mid_block, items)
    steps = [_step(40 + i, 3) for i in range(3)]
    mixed = []
    for k, (x, t) in enumerate(steps):
        items.clear()
        mixed.append(net(x, t, **cond, cache=torch.cat(own)))
        if k == 1:  # rows 0 and 1 hold their caches: the union's deep layers for row 2's item only
            assert items == ([3] if fixed else [1])
        old = _old_forward(net, torch.cat(old_own), x, t, cond)
        gap = (mixed[-1] - old).abs().max()
        assert gap == 0 if fixed else gap <= 1e-5
    hook.remove()
    assert_rows_as_alone(net, specs, cond, steps, mixed)
