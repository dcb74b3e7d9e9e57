"""DeepCache on diffusers' UNet2DConditionModel (tiny random SD 1.x, SDXL and SDXL-layout UNets):
rows that run the whole network are diffusers' forward bit for bit; a cached evaluation is DeepCache
built by hand on diffusers' own forward (the features entering the last up block's second-to-last
layer swapped for the last full evaluation's); rows decide alone inside a shared call."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("diffusers", reason="the [sd] extra (diffusers, transformers) is not installed")

from service.models.sd_unet import SDUNet  # noqa: E402
from service.models.stepcache import STORE, CacheSpec, cache_rows  # noqa: E402
from tests.support.deepcache_oracle import (  # noqa: E402
    Full,
    assert_rows_as_alone,
    random_step,
    restore_fixed_shape,
    wrapped,
)
from tests.support.sd_tiny import make_sd_components  # noqa: E402


def _sdxl_layout() -> Any:
    """SDXL's block layout in miniature: a first level without attention, two layers per level,
    a deeper level with two transformer layers, text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(3)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4,
        transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module", params=["sd1", "sdxl", "sdxl_layout"])
def net(request: pytest.FixtureRequest) -> tuple[SDUNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    if request.param == "sdxl_layout":
        unet = _sdxl_layout()
    else:
        unet = make_sd_components(sdxl=request.param == "sdxl")["unet"]
    return wrapped(unet)  # type: ignore[no-any-return]


fixed_shape = pytest.fixture(autouse=True)(restore_fixed_shape)


def _inputs(seed: int, h: int = 16, w: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return random_step(seed, h, w)


class Residuals:
    """A ControlSet's answer for the call (fixed random residuals, one per skip, and the mid one)."""

    def __init__(self, unet: Any, x: torch.Tensor) -> None:
        shapes: list[torch.Size] = []
        hooks = [unet.conv_in.register_forward_hook(lambda m, a, o: shapes.append(o.shape))]
        for block in unet.down_blocks:
            hooks.append(block.register_forward_hook(lambda m, a, o: shapes.extend(r.shape for r in o[1])))
        mid: list[torch.Size] = []
        hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: mid.append(o.shape)))
        self.x = x
        self.unet = unet
        self._hooks = hooks
        self._shapes, self._mid = shapes, mid
        self.value: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def measure(self, call: Any) -> None:
        call()
        for h in self._hooks:
            h.remove()
        g = torch.Generator().manual_seed(9)
        down = [torch.randn(s, generator=g) * 0.3 for s in self._shapes]
        self.value = (down, torch.randn(self._mid[0], generator=g) * 0.3)

    def staged(self, *args: Any) -> Full | None:
        """As ControlSet.staged: the call's inputs, then the split level (1 when not given)."""
        level = args[6] if len(args) > 6 else 1
        return None if self.value is None else Full(self.value, level)


@torch.inference_mode()
def test_interval_1_threshold_0_and_no_cache_are_diffusers_forward(net: tuple[SDUNet, dict]) -> None:
    model, cond = net
    assert model.cache_methods() == ("deepcache",)
    for h, w in ((16, 24), (10, 14)):  # 10 x 14: not a multiple of the up factor (upsample sizes given)
        x, t = _inputs(1, h, w)
        want = model(x, t, **cond)
        for rows in (
            cache_rows(CacheSpec("deepcache", interval=1), 3),
            cache_rows(CacheSpec("deepcache", threshold=0.0), 3),
            cache_rows(None, 3),
        ):
            for _ in range(2):
                assert torch.equal(model(x, t, **cond, cache=rows), want)


def _last_inputs(unet: Any) -> Any:
    """The resnet of the last up block where a cached evaluation re-enters (its input: the deep
    features, then the first down layer's skip)."""
    last = unet.up_blocks[-1]
    return last.resnets[len(last.resnets) - 2]


@torch.inference_mode()
@pytest.mark.parametrize("control", [False, True])
def test_a_cached_evaluation_is_deepcache_by_hand(net: tuple[SDUNet, dict], control: bool) -> None:
    """Full at (x1, t1), cached at (x2, t2) (interval 2): equal to diffusers' forward at (x2, t2) with
    the features entering the last up block's second-to-last layer replaced by those of (x1, t1); with
    ControlNet residuals, the shallow skips' residuals still added. The deep part does not run."""
    model, cond = net
    unet = model.unet
    (x1, t1), (x2, t2) = _inputs(2), _inputs(3)
    skip_channels = unet.config.block_out_channels[0]
    controls = None
    if control:
        controls = Residuals(unet, x1)
        controls.measure(lambda: model(x1, t1, **cond))
        model.controls = controls
        cond = {**cond, "control_hint": torch.zeros(3, 1), "control_unit": torch.zeros(3, 1)}
    try:
        rows = cache_rows(CacheSpec("deepcache", interval=2), 3)
        first = model(x1, t1, **cond, cache=rows)
        mids: list[int] = []
        hook = unet.mid_block.register_forward_hook(lambda m, a, o: mids.append(1))
        got = model(x2, t2, **cond, cache=rows)
        hook.remove()
        assert mids == []  # the deep part did not run

        seen: list[torch.Tensor] = []
        entry = _last_inputs(unet)
        hook = entry.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :-skip_channels].clone()))
        assert torch.equal(model(x1, t1, **cond), first)
        hook.remove()

        def swap(m: Any, a: tuple[Any, ...]) -> tuple[Any, ...]:
            return (torch.cat([seen[0], a[0][:, -skip_channels:]], dim=1), *a[1:])

        hook = entry.register_forward_pre_hook(swap)
        want = model(x2, t2, **cond)
        hook.remove()
        assert (got - want).abs().max() <= 1e-6
        assert (got - model(x2, t2, **cond)).abs().max() > 1e-4  # the cache changed the output
    finally:
        model.controls = None


@torch.inference_mode()
@pytest.mark.parametrize("fixed", [True, False])
def test_rows_decide_alone_in_a_shared_call(net: tuple[SDUNet, dict], fixed: bool) -> None:
    """Rows: interval 2, none, interval 3, over four evaluations in one call each; every row equals
    its own run (a call of copies of that row, as the engine pads); the uncached row bit for bit
    with fixed shapes (without them its deep part runs alone: rounding only)."""
    model, cond = net
    STORE.fixed_shape = fixed
    specs = [CacheSpec("deepcache", interval=2), None, CacheSpec("deepcache", interval=3)]
    steps = [_inputs(10 + i) for i in range(4)]
    held = [cache_rows(s, 1) for s in specs]  # the ids live as long as these tensors
    STORE.reset_counts()
    mixed = [model(x, t, **cond, cache=torch.cat(held)) for x, t in steps]
    assert STORE.reused == 4  # row 0 at evaluations 2 and 4, row 2 at 2 and 3
    # an uncached row in batch-invariant mode has the same shapes as alone: bit for bit
    assert_rows_as_alone(model, specs, cond, steps, mixed, exact=lambda spec: spec is None and fixed)


def test_a_unet_outside_the_split_refuses_naming_the_field() -> None:
    """FreeU rescales the skips the split reuses: such a UNet runs no step cache, and a request asking
    for one is refused naming cache.method (as fbcache on any UNet)."""
    from service.sampling.errors import InputError

    unet = make_sd_components()["unet"]
    model = SDUNet(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert model.cache_methods() == ()
    with pytest.raises(InputError) as err:
        CacheSpec("deepcache").resolved(model.cache_methods())
    assert err.value.field == "cache.method"
    unet.disable_freeu()
    assert model.cache_methods() == ("deepcache",)
    with pytest.raises(InputError) as err:
        CacheSpec("fbcache").resolved(model.cache_methods())
    assert err.value.field == "cache.method" and "it runs deepcache" in str(err.value)
