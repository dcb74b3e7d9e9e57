"""What DeepCache-by-hand tests read off diffusers' UNet2DConditionModel: each skip connection's
channels (from diffusers' own forward) and the up layer that takes a skip."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.models.stepcache.sd_unet import Control


def skip_channels(unet: Any) -> list[int]:
    """Each skip's channels in the down path's order, read off diffusers' own forward."""
    out: list[int] = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, o: out.append(o.shape[1]))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, o: out.extend(r.shape[1] for r in o[1])))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    unet(x, t, encoder_hidden_states=torch.zeros(1, 5, unet.config.cross_attention_dim),
         added_cond_kwargs=added_zeros(unet, 1), return_dict=False)  # fmt: skip
    for h in hooks:
        h.remove()
    return out


def added_zeros(unet: Any, n: int) -> dict[str, torch.Tensor] | None:
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        return None
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return {"text_embeds": torch.zeros(n, pooled), "time_ids": torch.zeros(n, 6)}


def entry_of(unet: Any, level: int) -> Any:
    """The resnet of the up layer that takes skip ``level`` (the up path takes them in reverse)."""
    layers = [b.resnets[j] for b in unet.up_blocks for j in range(len(b.resnets))]
    return layers[len(layers) - 1 - level]


def swapped(
    entry: Any, width: int, full: Callable[[], Any], cached: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """DeepCache by hand: run ``full()`` recording the features entering ``entry`` (less the skip's
    ``width`` channels), then ``cached()`` with those features in place of its own."""
    seen: list[torch.Tensor] = []
    hook = entry.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :-width].clone()))
    full()
    hook.remove()
    hook = entry.register_forward_pre_hook(lambda m, a: (torch.cat([seen[0], a[0][:, -width:]], 1), *a[1:]))
    try:
        return cached()
    finally:
        hook.remove()


def wrapped(unet: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``unet`` behind our SDUNet and three rows of random conditioning (SDXL's added ones where it
    takes them)."""
    from service.models.sd_unet import SDUNet

    cfg, cond = unet.config, {"context": torch.randn(3, 5, unet.config.cross_attention_dim)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond |= {"y": torch.randn(3, pooled), "time_ids": torch.rand(3, 6) * 64}
    return SDUNet(unet), cond


def restore_fixed_shape() -> Iterator[None]:
    """An autouse fixture's body: the store's batch-invariant mode back on after each test."""
    from service.models.stepcache import STORE

    yield
    STORE.fixed_shape = True


def random_step(seed: int, h: int, w: int, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [rows, 4, h, w] and timesteps in [0, 999) from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, h, w, generator=g), torch.rand(rows, generator=g) * 999


def assert_rows_as_alone(
    net: Callable[..., torch.Tensor],
    specs: list[Any],
    cond: dict[str, torch.Tensor],
    steps: list[tuple[torch.Tensor, torch.Tensor]],
    mixed: list[torch.Tensor],
    exact: Callable[[Any], bool] = lambda spec: False,
) -> None:
    """Row ``i`` of every mixed evaluation equals the same row run alone with its own cache (the call
    filled with copies of it, so it has the mixed call's shape): bit for bit where ``exact(spec)``,
    else within 1e-5 (float rounding)."""
    from service.models.stepcache import cache_rows

    rows = steps[0][0].shape[0]
    for i, spec in enumerate(specs):
        ids = cache_rows(spec, 1)  # kept: its ids are forgotten when it is freed
        pick = torch.tensor([i] * rows)
        row_cond = {k: v.index_select(0, pick) for k, v in cond.items()}
        for k, (x, t) in enumerate(steps):
            alone = net(
                x.index_select(0, pick), t.index_select(0, pick), **row_cond, cache=ids.expand(rows, -1)
            )[0]
            if exact(spec):
                assert torch.equal(alone, mixed[k][i]), (i, k)
            else:
                assert (alone - mixed[k][i]).abs().max() <= 1e-5, (i, k)


@dataclass
class Full:
    """ControlNet residuals computed in full for every row, handed to the split forward as a
    ``StagedControl`` staged at ``split``: what the code before the staged ControlNets did."""

    control: Control
    split: int = 1

    @property
    def shallow(self) -> list[Tensor]:
        return self.control[0][: self.split + 1]

    def full(self) -> Control:
        return self.control

    def deep(self, index: Tensor | None) -> Control:
        down, mid = self.control[0][self.split + 1 :], self.control[1]
        if index is None:
            return down, mid
        return [r.index_select(0, index) for r in down], mid.index_select(0, index)
