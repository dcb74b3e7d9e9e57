"""Prompt encoding for flow-matching models, with an LRU cache per prompt (T5 included).

- SD3 / SD3.5: CLIP-L and CLIP-G penultimate hidden states side by side (77 tokens, zero-padded
  to T5's width), then T5's ``max_sequence_length`` tokens (zeros when the T5 encoder is left
  out); pooled = both CLIPs' projected embeddings side by side.
- Flux: CLIP-L's pooled output; T5's hidden states (``max_sequence_length`` tokens).

Prompts are tokenized as the diffusers pipelines do (padded to the maximum, truncated beyond it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class FlowPromptEncoder:
    def __init__(
        self,
        family: str,
        tokenizers: dict[str, Any],
        encoders: dict[str, Any],
        *,
        max_sequence_length: int,
        joint_dim: int,
        device: torch.device,
        cache_size: int = 128,
    ) -> None:
        self.family, self.tok, self.enc = family, tokenizers, encoders
        self.max_len, self.joint_dim, self.device = int(max_sequence_length), int(joint_dim), device
        self.cache: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor]] = OrderedDict()
        self.variant = threading.local()  # this thread's text-encoder LoRAs (lora.text_loras sets .key)
        self.cache_size = int(cache_size)

    def _ids(self, name: str, prompt: str, length: int | None = None) -> Tensor:
        tok = self.tok[name]
        length = length or int(tok.model_max_length)
        out = tok(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return out.input_ids.to(self.device)

    def _clip(self, i: str, prompt: str, clip_skip: int | None) -> tuple[Tensor, Tensor]:
        out = self.enc[f"text_encoder{i}"](self._ids(f"tokenizer{i}", prompt), output_hidden_states=True)
        layer = -2 if clip_skip is None else -(int(clip_skip) + 1)
        return out.hidden_states[layer], out[0]

    def _t5(self, name: str, prompt: str) -> Tensor:
        enc = self.enc.get(f"text_encoder{name}")
        if enc is None:
            return torch.zeros(1, self.max_len, self.joint_dim, device=self.device)
        return enc(self._ids(f"tokenizer{name}", prompt, self.max_len))[0]

    @torch.inference_mode()
    def encode(self, prompt: str, clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
        """(context [1, L, D], pooled [1, P]) for one prompt."""
        key = (prompt, clip_skip, getattr(self.variant, "key", None))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        if self.family == "sd3":
            h1, p1 = self._clip("", prompt, clip_skip)
            h2, p2 = self._clip("_2", prompt, clip_skip)
            t5 = self._t5("_3", prompt)
            clip = torch.cat([h1, h2], dim=-1)
            context = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], dim=-2)
            pooled = torch.cat([p1, p2], dim=-1)
        else:
            pooled = self.enc["text_encoder"](
                self._ids("tokenizer", prompt), output_hidden_states=False
            ).pooler_output
            context = self._t5("_2", prompt)
        value = (context, pooled)
        self.cache[key] = value
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return value
