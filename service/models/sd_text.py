"""CLIP prompt encoding for Stable Diffusion: 75-token chunks, SDXL's two encoders, an LRU cache.

A prompt is tokenized without special tokens and cut into chunks of 75 tokens; each chunk is
wrapped as ``[BOS] chunk [EOS] pad...`` (77 tokens), encoded on its own, and the chunks'
hidden states are concatenated along the sequence (AUTOMATIC1111's behaviour for long prompts).
A prompt of at most 75 tokens therefore encodes exactly as diffusers' pipelines encode it.

- SD 1.x / 2.x: the last hidden state after the final layer norm (``clip_skip`` = 2 takes the
  penultimate layer, then the final layer norm, as A1111 does).
- SDXL: both encoders' penultimate hidden states concatenated on the feature dim; the pooled
  embedding (``text_embeds``) of the second encoder, from the first chunk.

A1111's attention syntax (``(word:1.3)``, ``[word]``, ``BREAK``; parsed by
``service.sampling.prompt_weights``) is applied as A1111 applies it: each fragment is tokenized
on its own, ``BREAK`` closes the current chunk, and each chunk's hidden states are multiplied by
their tokens' weights, then rescaled so the chunk keeps its original mean. A prompt without the
syntax encodes exactly as before. ``clip_skip`` may be given per call (SD 1.x / 2.x).

Textual-inversion embeddings (``service.models.embeddings``, attached when the model is served):
their names in a prompt (A1111's token-sequence matching) or ComfyUI's ``embedding:name`` become
placeholder tokens whose token embeddings are replaced by the embedding's vectors (SDXL: ``clip_l`` in
the first encoder, ``clip_g`` in the second), with the fragment's weight; the prompt cache key
includes the embedding files' state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from service.models.embeddings import EmbeddingInfo, EmbeddingSet, ModelEmbeddings, split_references
from service.sampling import prompt_weights

CHUNK = 75
PLACEHOLDER = 0  # the token id under an embedding's vectors (A1111's); its embedding is replaced


@dataclass
class TokenChunks:
    """A prompt's 77-token chunks for one tokenizer: ids, per-token weights and, per chunk, the
    embedding vectors to put at token positions (position, [n, D])."""

    ids: list[list[int]]
    weights: list[list[float]]
    fixes: list[list[tuple[int, Tensor]]]


@dataclass(frozen=True)
class Encoded:
    """One prompt: context [1, 77 * chunks, D] and (SDXL) pooled [1, P]."""

    context: Tensor
    pooled: Tensor | None

    @property
    def chunks(self) -> int:
        return int(self.context.shape[1]) // (CHUNK + 2)


class PromptEncoder:
    def __init__(
        self,
        tokenizers: list,
        encoders: list[nn.Module],
        *,
        sdxl: bool,
        clip_skip: int = 1,
        cache_size: int = 128,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(tokenizers) != len(encoders) or not encoders:
            raise ValueError("need one tokenizer per text encoder")
        if clip_skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        self.tokenizers, self.encoders = tokenizers, encoders
        self.sdxl, self.clip_skip = sdxl, clip_skip
        self.device = torch.device(device)
        self.cache_size = cache_size
        # keyed by the prompt, or (prompt, clip_skip) for a clip_skip other than the encoder's own
        self._cache: OrderedDict[Any, Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        # what else changes this thread's encodings (text-encoder LoRAs): part of the cache key
        self.variant = threading.local()
        self.embeddings: ModelEmbeddings | None = None  # set when served (embeddings.attach_embeddings)

    # --- tokens ---
    def chunk_ids(self, prompt: str, tokenizer_index: int = 0) -> list[list[int]]:
        """Token ids of each 77-token chunk (BOS, up to 75 tokens, EOS, padding)."""
        tok = self.tokenizers[tokenizer_index]
        ids: list[int] = tok(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        pieces = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return [[tok.bos_token_id, *p, tok.eos_token_id] + [pad] * (CHUNK - len(p)) for p in pieces]

    def token_chunks(
        self,
        fragments: list[tuple[str, float]],
        tokenizer_index: int = 0,
        embeddings: EmbeddingSet | None = None,
    ) -> TokenChunks:
        """A1111's chunks (``sd_hijack_clip.tokenize_line``): each fragment tokenized on its own, 75
        tokens a chunk, ``BREAK`` closes one; an embedding's name (or ComfyUI's ``embedding:name``)
        becomes as many placeholder tokens as it has vectors, never split over two chunks, and the
        vectors replace the placeholders' token embeddings (:attr:`TokenChunks.fixes`)."""
        tok = self.tokenizers[tokenizer_index]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = TokenChunks([], [], [])
        ids: list[int] = []
        ws: list[float] = []
        fixes: list[tuple[int, Tensor]] = []

        def close() -> None:
            out.ids.append([tok.bos_token_id, *ids, tok.eos_token_id] + [pad] * (CHUNK - len(ids)))
            out.weights.append([1.0, *ws, 1.0] + [1.0] * (CHUNK - len(ws)))
            out.fixes.append(list(fixes))
            ids.clear()
            ws.clear()
            fixes.clear()

        def embed(info: EmbeddingInfo, weight: float) -> None:
            vec = EmbeddingSet.vectors(info, tokenizer_index)
            if len(ids) + vec.shape[0] > CHUNK:
                close()
            fixes.append((len(ids) + 1, vec))  # + 1: after the chunk's BOS
            ids.extend([PLACEHOLDER] * vec.shape[0])
            ws.extend([weight] * vec.shape[0])

        for text, weight in fragments:
            if (text, weight) == prompt_weights.BREAK_FRAGMENT:
                close()
                continue
            for piece in [text] if embeddings is None else split_references(text, embeddings):
                if not isinstance(piece, str):
                    embed(piece, weight)
                    continue
                tokens = tok(piece, add_special_tokens=False, truncation=False)["input_ids"]
                position = 0
                while position < len(tokens):
                    hit = None if not embeddings else embeddings.match(tokens, position, tokenizer_index)
                    if hit is not None:
                        embed(hit[0], weight)
                        position += hit[1]
                        continue
                    if len(ids) == CHUNK:
                        close()
                    ids.append(tokens[position])
                    ws.append(weight)
                    position += 1
        if ids or not out.ids:
            close()
        return out

    # --- encoding ---
    def _hidden(
        self,
        encoder: nn.Module,
        ids: Tensor,
        clip_skip: int,
        fixes: list[list[tuple[int, Tensor]]] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if fixes and any(fixes):
            self._hook(encoder)
            _FIXES.value = fixes
        try:
            out = encoder(ids, output_hidden_states=True)
        finally:
            _FIXES.value = None
        pooled = getattr(out, "text_embeds", None)
        if self.sdxl:
            return out.hidden_states[-2], pooled
        if clip_skip == 1:
            return out.last_hidden_state, pooled
        text_model: Any = getattr(encoder, "text_model", encoder)
        return text_model.final_layer_norm(out.hidden_states[-clip_skip]), pooled

    @torch.inference_mode()
    def _encode(self, prompt: str, clip_skip: int, embeddings: EmbeddingSet | None = None) -> Encoded:
        fragments = prompt_weights.parse(prompt)
        plain = fragments == [(prompt, 1.0)]
        per_encoder: list[Tensor] = []
        per_weights: list[list[float]] = []
        pooled: Tensor | None = None
        for i, encoder in enumerate(self.encoders):
            chunks = self.token_chunks(fragments, i, embeddings)
            per_weights.append([w for chunk in chunks.weights for w in chunk])
            ids = torch.tensor(chunks.ids, dtype=torch.long, device=self.device)
            hidden, pool = self._hidden(encoder, ids, clip_skip, chunks.fixes)
            per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if pool is not None:
                pooled = pool[:1]
        if len({h.shape[1] for h in per_encoder}) > 1:  # tokenizers split differently: pad to the longest
            n = max(h.shape[1] for h in per_encoder)
            per_encoder = [self._pad_with_empty(h, n, i, clip_skip) for i, h in enumerate(per_encoder)]
        context = torch.cat(per_encoder, dim=-1)
        if not plain:
            context = apply_weights(context, per_weights[0])
        return Encoded(context, pooled if self.sdxl else None)

    # --- embeddings ---
    def _hook(self, encoder: nn.Module) -> None:
        """Once per encoder: a hook on its token embedding that puts this thread's embedding vectors
        in place of their placeholders (A1111's ``EmbeddingsWithFixes``); other calls pass through."""
        get: Any = encoder.get_input_embeddings
        module = get()
        with self._lock:
            if getattr(module, "_kdiff_embedding_hook", False):
                return
            module._kdiff_embedding_hook = True
            module.register_forward_hook(_replace_placeholders)

    def embedding_set(self) -> EmbeddingSet | None:
        """The model's embeddings as they are now (files rescanned), None when it has none attached."""
        return None if self.embeddings is None else self.embeddings.current()

    def _pad_with_empty(self, hidden: Tensor, length: int, index: int, clip_skip: int) -> Tensor:
        empty_ids = torch.tensor(self.chunk_ids("", index), dtype=torch.long, device=self.device)
        empty, _ = self._hidden(self.encoders[index], empty_ids, clip_skip)
        reps = (length - hidden.shape[1]) // empty.shape[1]
        return torch.cat([hidden, *([empty] * reps)], dim=1)

    def encode(self, prompt: str, clip_skip: int | None = None) -> Encoded:
        """Encode one prompt (cached, least recently used dropped first); ``clip_skip`` None = the
        encoder's own."""
        skip = self.clip_skip if clip_skip is None else int(clip_skip)
        if skip < 1:
            raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
        key: Any = prompt if skip == self.clip_skip else (prompt, skip)
        if getattr(self.variant, "key", None) is not None:
            key = (key, self.variant.key)
        embeddings = self.embedding_set()
        if embeddings is not None:
            key = (key, embeddings.key)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        enc = self._encode(prompt, skip, embeddings)
        with self._lock:
            self.misses += 1
            if self.cache_size > 0:
                self._cache[key] = enc
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return enc

    def zeros_like(self, enc: Encoded) -> Encoded:
        """The all-zero uncond SDXL uses for an empty negative prompt (force_zeros_for_empty_prompt)."""
        return Encoded(
            torch.zeros_like(enc.context), None if enc.pooled is None else torch.zeros_like(enc.pooled)
        )

    def pad_to(self, enc: Encoded, chunks: int, clip_skip: int | None = None) -> Encoded:
        """Extend with encodings of the empty prompt to ``chunks`` chunks (cond/uncond must align)."""
        if enc.chunks >= chunks:
            return enc
        tail = self.encode("", clip_skip).context.repeat(1, chunks - enc.chunks, 1)
        if torch.count_nonzero(enc.context) == 0:  # a zero uncond stays zero
            tail = torch.zeros_like(tail)
        return Encoded(torch.cat([enc.context, tail], dim=1), enc.pooled)


# This thread's embedding vectors for the encoder it is calling (module level: the hook stays a plain
# function, so encoders deep-copy and pickle as before).
_FIXES = threading.local()


def _replace_placeholders(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
    fixes = getattr(_FIXES, "value", None)
    if not fixes:
        return None
    out = output.clone()
    for row, row_fixes in enumerate(fixes):
        for position, vec in row_fixes:
            out[row, position : position + vec.shape[0]] = vec.to(out.device, out.dtype)
    return out


def apply_weights(context: Tensor, weights: list[float]) -> Tensor:
    """Per-token weights on [1, 77 * chunks, D] hidden states, each chunk's mean restored (A1111)."""
    w = torch.tensor(weights, dtype=context.dtype, device=context.device)
    if w.numel() != context.shape[1]:  # tokenizers split differently: weight what they share
        w = torch.cat([w, w.new_ones(max(0, context.shape[1] - w.numel()))])[: context.shape[1]]
    out = []
    for z, wc in zip(context.split(CHUNK + 2, dim=1), w.split(CHUNK + 2), strict=True):
        before = z.mean()
        z = z * wc.reshape(1, -1, 1)
        after = z.mean()
        # A hidden state whose mean is ~0 (a layer norm without bias: tiny test encoders) has no
        # mean to restore, and dividing by it would blow up; real CLIP means are far from 0.
        if float(after.abs()) > 1e-4 * float(z.abs().mean()) and bool(torch.isfinite(before / after)):
            z = z * (before / after)
        out.append(z)
    return torch.cat(out, dim=1)
