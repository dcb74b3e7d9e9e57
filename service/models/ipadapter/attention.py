"""Per-row image prompts in the UNet's cross-attention.

Each cross-attention (``attn2``) module of the UNet gets a :class:`RowImageAttention` processor. With
no image rows set for the calling thread it runs the module's own processor unchanged. With rows set
(:func:`image_rows`, around one UNet call) it computes the text attention as diffusers'
``AttnProcessor2_0`` does and adds, per row, IP-Adapter's decoupled image attention

    h_row += weight * softmax(q_row k_ip^T / sqrt(d)) v_ip,   k_ip = tokens W_k,ip,  v_ip = tokens W_v,ip

before the output projection, for each of the row's adapters (one attention call per adapter for all
the rows that use it). Rows without an adapter add nothing. The query, key, value and output
projections run over the whole call (so per-row LoRA hooks on them see every row, as without images).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

_local = threading.local()


@dataclass
class Group:
    """The rows of one call that use one adapter: their (row, slot) pairs and weights, its tokens."""

    rows: Tensor  # [m] row index (a row may appear twice: the same adapter in two slots)
    tokens: Tensor  # [m, T, cross_dim]
    weight: Tensor  # [m]
    layers: Sequence[tuple[Tensor, Tensor]]  # per cross-attention layer: (W_k,ip, W_v,ip)


@contextmanager
def image_rows(groups: list[Group]) -> Iterator[None]:
    """Set the calling thread's image rows for the UNet call inside the block."""
    before = getattr(_local, "groups", None)
    _local.groups = groups or None
    try:
        yield
    finally:
        _local.groups = before


def _heads(t: Tensor, b: int, heads: int) -> Tensor:
    return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)


class RowImageAttention:
    """The processor of cross-attention layer ``index`` (its adapters' ``to_k_ip`` / ``to_v_ip``)."""

    def __init__(self, index: int, base: Callable[..., Tensor]) -> None:
        self.index, self.base = index, base

    def __call__(self, attn: Any, hidden_states: Tensor, **kw: Any) -> Tensor:
        """diffusers' Attention calls its processor with ``encoder_hidden_states`` and
        ``attention_mask`` by keyword."""
        groups: list[Group] | None = getattr(_local, "groups", None)
        context = kw.get("encoder_hidden_states")
        if not groups or context is None or kw.get("attention_mask") is not None or hidden_states.ndim != 3:
            return self.base(attn, hidden_states, **kw)
        residual, b = hidden_states, hidden_states.shape[0]
        q = _heads(attn.to_q(hidden_states), b, attn.heads)
        k = _heads(attn.to_k(context), b, attn.heads)
        v = _heads(attn.to_v(context), b, attn.heads)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        h = h.to(q.dtype)
        for g in groups:
            wk, wv = g.layers[self.index]
            tokens = g.tokens.to(h.dtype)
            m = g.rows.shape[0]
            kk, vv = _heads(F.linear(tokens, wk), m, attn.heads), _heads(F.linear(tokens, wv), m, attn.heads)
            ip = F.scaled_dot_product_attention(q[g.rows], kk, vv).transpose(1, 2).reshape(m, -1, h.shape[-1])
            h = h.index_add(0, g.rows, ip.to(h.dtype) * g.weight.to(h.dtype).view(-1, 1, 1))
        h = attn.to_out[1](attn.to_out[0](h))
        if attn.residual_connection:
            h = h + residual
        return h / attn.rescale_output_factor  # type: ignore[no-any-return]


def cross_attentions(unet: Any) -> list[Any]:
    """The UNet's cross-attention modules in the order of its attention processors (the order of
    an IP-Adapter file's layer numbers)."""
    out = []
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor") and not name.endswith("attn1"):
            if getattr(module, "is_cross_attention", False):
                out.append(module)
    return out


def install(unet: Any) -> int:
    """Give every cross-attention module of ``unet`` its row processor (once); the layer count."""
    layers = cross_attentions(unet)
    for i, attn in enumerate(layers):
        if isinstance(attn.processor, RowImageAttention):
            continue
        unsupported = [
            n
            for n in ("spatial_norm", "group_norm", "norm_q", "norm_k")
            if getattr(attn, n, None) is not None
        ]
        if unsupported or getattr(attn, "norm_cross", False):
            raise ValueError(
                f"cross-attention {i} has {unsupported or 'norm_cross'}: IP-Adapter not supported"
            )
        attn.set_processor(RowImageAttention(i, attn.processor))
    return len(layers)


def hidden_sizes(unet: Any) -> list[int]:
    """Each cross-attention layer's width (an adapter's to_k_ip rows must match)."""
    return [int(a.to_q.out_features) for a in cross_attentions(unet)]


__all__ = ["Group", "RowImageAttention", "cross_attentions", "hidden_sizes", "image_rows", "install"]
