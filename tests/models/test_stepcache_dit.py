"""First-Block-Cache on tiny SD3 and Flux transformers (diffusers' classes, random weights, two or
more blocks): rows that run the blocks equal diffusers' own forward; a cached row adds the residual
its other blocks made at its last full evaluation; rows decide alone inside a shared call."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.models.flow_nets import FluxVelocity, SD3Velocity
from service.models.stepcache import STORE, CacheSpec, cache_rows

SPEC = CacheSpec("fbcache", threshold=10.0)  # the cache always holds after the first evaluation


def _sd3() -> tuple[Any, dict[str, torch.Tensor]]:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    return SD3Velocity(tr), {"context": torch.randn(4, 5, 16), "pooled": torch.randn(4, 8)}


def _flux() -> tuple[Any, dict[str, torch.Tensor]]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    cond = {"context": torch.randn(4, 5, 16), "pooled": torch.randn(4, 8), "guidance": torch.full([4], 3.5)}
    return FluxVelocity(tr), cond


@pytest.fixture(scope="module", params=["sd3", "flux"])
def net(request: pytest.FixtureRequest) -> tuple[Any, dict[str, torch.Tensor]]:
    return _sd3() if request.param == "sd3" else _flux()


@torch.inference_mode()
def test_rows_that_run_the_blocks_equal_diffusers_forward(net: tuple[Any, dict[str, torch.Tensor]]) -> None:
    model, cond = net
    assert model.cache_methods() == ("fbcache",)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
    want = model(x, t, **cond)
    exact = cache_rows(CacheSpec("fbcache", threshold=0.0), 4)
    for _ in range(2):  # threshold 0: never cached
        assert torch.equal(model(x, t, **cond, cache=exact), want)


@torch.inference_mode()
def test_cached_rows_add_the_residual_of_their_last_full_evaluation(
    net: tuple[Any, dict[str, torch.Tensor]],
) -> None:
    """By hand, from hooks on diffusers' own forward: the image tokens after the first block of the
    second evaluation plus (last block's - first block's) of the first evaluation reach the output
    layers of the cached second evaluation."""
    model, cond = net
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, 4, 4, 8, 8, generator=g)
    t1, t2 = torch.full([4], 0.8), torch.full([4], 0.6)
    tr = model.transformer
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, out: Any) -> None:
            seen[name] = out[1]  # blocks return (text tokens, image tokens)

        return hook

    blocks = [*tr.transformer_blocks, *getattr(tr, "single_transformer_blocks", [])]
    hooks = [
        blocks[0].register_forward_hook(keep("first"), with_kwargs=True),
        blocks[-1].register_forward_hook(keep("last"), with_kwargs=True),
        tr.norm_out.register_forward_pre_hook(lambda m, args: seen.__setitem__("out", args[0])),
    ]
    model(x1, t1, **cond)
    rest_1 = seen["last"] - seen["first"]
    model(x2, t2, **cond)
    want = seen["first"] + rest_1
    rows = cache_rows(SPEC, 4)
    model(x1, t1, **cond, cache=rows)
    seen.clear()
    model(x2, t2, **cond, cache=rows)
    for hook in hooks:
        hook.remove()
    assert "last" not in seen  # the other blocks did not run
    assert (seen["out"] - want).abs().max() < 1e-5


@torch.inference_mode()
def test_mixed_rows_decide_alone(net: tuple[Any, dict[str, torch.Tensor]]) -> None:
    """Rows 0-1 cached, rows 2-3 not: each half equals the same half run on its own (the uncached
    half bit for bit in fixed-shape mode, the cached half within rounding)."""
    model, cond = net
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(2, 4, 4, 8, 8, generator=g)
    ts = [torch.full([4], v) for v in (0.9, 0.7)]
    mixed_rows = torch.cat([cache_rows(SPEC, 2), cache_rows(None, 2)])
    alone_rows = torch.cat([cache_rows(SPEC, 2), cache_rows(SPEC, 2)])
    STORE.fixed_shape = True
    for x, t in zip(xs, ts, strict=True):
        mixed = model(x, t, **cond, cache=mixed_rows)
        cached_alone = model(x, t, **cond, cache=alone_rows)
        plain = model(x, t, **cond)
        assert (mixed[:2] - cached_alone[:2]).abs().max() < 1e-5
        assert torch.equal(mixed[2:], plain[2:])
