"""The image projections of IP-Adapter, with the published files' own parameter names (so a file's
``image_proj.*`` tensors load with ``load_state_dict(strict=True)``).

- plain (``ip-adapter_sd15``, ``ip-adapter_sdxl``): ``proj`` (embedding -> tokens x cross_dim) and a
  LayerNorm ``norm`` over each token;
- plus (``ip-adapter-plus_*``): the perceiver Resampler: learned ``latents`` queries attend to the
  encoder's penultimate hidden states (``proj_in``) and themselves, ``layers.i.0`` the attention
  (``norm1`` on the image features, ``norm2`` on the latents, ``to_q``, ``to_kv``, ``to_out``; 64-wide
  heads), ``layers.i.1`` a LayerNorm + GELU MLP, then ``proj_out`` and ``norm_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_DIM = 64  # the Resampler's head width in every published plus adapter


class PlainProjection(nn.Module):
    def __init__(self, embed_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        """[B, E] image embeddings -> [B, tokens, cross_dim]."""
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))  # type: ignore[no-any-return]


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.heads = inner // HEAD_DIM
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        # keys and values come from the image features and the latents together
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))  # type: ignore[no-any-return]


class Resampler(nn.Module):
    def __init__(
        self, embed_dim: int, dim: int, inner: int, out_dim: int, queries: int, depth: int, ff: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, inner),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, ff, bias=False),
                        nn.GELU(),
                        nn.Linear(ff, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, features: Tensor) -> Tensor:
        """[B, L, E] hidden states -> [B, queries, out_dim]."""
        latents = self.latents.expand(features.shape[0], -1, -1)
        x = self.proj_in(features)
        for block in self.layers:
            attn, mlp = block[0], block[1]  # type: ignore[index]
            latents = attn(x, latents) + latents
            latents = mlp(latents) + latents
        return self.norm_out(self.proj_out(latents))  # type: ignore[no-any-return]


def build(kind: str, sd: dict[str, Tensor]) -> nn.Module:
    """The projection for a file's ``image_proj`` tensors, sizes read from the tensors."""
    if kind == "plain":
        cross = int(sd["norm.weight"].shape[0])
        out, embed = sd["proj.weight"].shape
        net: nn.Module = PlainProjection(int(embed), cross, int(out) // cross)
    else:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        _, queries, dim = sd["latents"].shape
        net = Resampler(
            embed_dim=int(sd["proj_in.weight"].shape[1]),
            dim=int(dim),
            inner=int(sd["layers.0.0.to_q.weight"].shape[0]),
            out_dim=int(sd["proj_out.weight"].shape[0]),
            queries=int(queries),
            depth=depth,
            ff=int(sd["layers.0.1.1.weight"].shape[0]),
        )
    net.load_state_dict(sd, strict=True)
    return net.eval()
