"""ggml's tensor types and their dequantization in torch (GGUF files: llama.cpp, city96's ComfyUI-GGUF).

A quantized tensor is a row-major sequence of blocks, each ``block`` values in ``nbytes`` bytes,
laid out as ggml's ``block_*`` structs (ggml-common.h). :func:`dequantize` turns ``[rows, row
bytes]`` of raw uint8 into ``[rows, cols]`` floats, computed in float32 in the same order of
operations as ggml's reference ``dequantize_row_*`` so the values are bit-identical to it (and to
gguf-py's numpy ``gguf.quants.dequantize``, the tests' oracle). One float32 buffer per call, updated
in place (float multiplication commutes, so the order of factors does not change a bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QType:
    name: str
    id: int  # ggml_type in the GGUF tensor info
    block: int  # values per block
    nbytes: int  # bytes per block


# name, ggml_type id (ggml.h), values per block, bytes per block: the types this module dequantizes
_TABLE = """F32 0 1 4 | F16 1 1 2 | Q4_0 2 32 18 | Q4_1 3 32 20 | Q5_0 6 32 22 | Q5_1 7 32 24 | Q8_0 8 32 34 |
Q2_K 10 256 84 | Q3_K 11 256 110 | Q4_K 12 256 144 | Q5_K 13 256 176 | Q6_K 14 256 210 | BF16 30 1 2"""
TYPES = {int(f[1]): QType(f[0], int(f[1]), int(f[2]), int(f[3])) for f in map(str.split, _TABLE.split("|"))}
# Names of the ggml types this module does not dequantize, for the refusal's message.
OTHER_NAMES = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


def type_name(type_id: int) -> str:
    q = TYPES.get(type_id)
    return q.name if q else OTHER_NAMES.get(type_id, f"ggml type {type_id}")


def supported_names() -> str:
    return ", ".join(q.name for q in TYPES.values())


def _f16(b: Tensor) -> Tensor:
    """Little-endian half floats in the last dim (2 bytes each) -> float32 [..., n]."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: Tensor, n: int) -> Tensor:
    """Bytes [..., k] -> their bits [..., 8k] as uint8 0/1, least significant first (bit i of a
    little-endian integer is element i)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b[..., :, None] >> shifts) & 1).flatten(-2)[..., :n]


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [..., n] -> [..., 2n]: the low nibbles, then the high ones (ggml's 32-value blocks)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b: Tensor) -> Tensor:
    return _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:
    return _nibbles(b[:, 4:]).float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _high_bits(qh: Tensor) -> Tensor:
    """Q5's 32-bit ``qh``: bit i is value i's fifth bit -> [..., 32] of 0 / 16 (uint8)."""
    return _bits(qh, 32) << 4


def _q5_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])
    return q.float().sub_(16).mul_(_f16(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8])
    return q.float().mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = s.long()
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _k_subblocks(q: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, mn: Tensor) -> Tensor:
    """[blocks, 8, 32] 4/5-bit values with per-sub-block scale and min -> [blocks, 256]."""
    return q.float().mul_((d * sc)[:, :, None]).sub_((dmin * mn)[:, :, None]).flatten(1)


def _q4_k(b: Tensor) -> Tensor:
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: low nibbles, then high, 64 values
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    return _k_subblocks(q, _f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, mn)


def _q5_k(b: Tensor) -> Tensor:
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = _bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2)  # bit j of byte l: sub-block j, value l
    qs = b[:, 48:].reshape(-1, 4, 32)
    low = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    q = low | (qh << 4)
    return _k_subblocks(q, _f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, mn)


def _q6_k(b: Tensor) -> Tensor:
    ql = b[:, :128].reshape(-1, 2, 64)  # two halves of 128 values
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 16, 1)
    d = _f16(b[:, 208:210])[:, :, None]
    low = torch.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2)
    q = low | (((qh >> _SHIFTS2.to(b.device)) & 3) << 4)  # [blocks, 2, 4, 32], 0..63
    return q.reshape(-1, 16, 16).float().sub_(32).mul_(d * sc).flatten(1)


_SHIFTS2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[None, None, :, None]  # 2-bit fields of a byte


def _q3_k_scales(s: Tensor) -> Tensor:
    """Q3_K: 12 bytes -> 16 six-bit scales (low 4 bits from bytes 0-7, high 2 from bytes 8-11), -32."""
    s = s.long()
    low = torch.cat([s[:, :8] & 0x0F, s[:, :8] >> 4], dim=-1)
    shifts = torch.tensor([0, 2, 4, 6], device=s.device).repeat_interleave(4)
    high = (s[:, 8:12].repeat(1, 4) >> shifts) & 3
    return (low | (high << 4)) - 32


def _q3_k(b: Tensor) -> Tensor:
    high = _bits(b[:, :32], 256).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, 2, 4, 32)
    qs = b[:, 32:96].reshape(-1, 2, 1, 32)
    sc = _q3_k_scales(b[:, 96:108]).float()
    d = _f16(b[:, 108:110])
    low = (qs >> _SHIFTS2.to(b.device)) & 3  # [blocks, 2, 4, 32]: half n, shift j -> hmask bit 4n + j
    q = (low | (high << 2)).reshape(-1, 16, 16).float().sub_(4)  # low - 4 where the hmask bit is 0
    return q.mul_((d * sc)[:, :, None]).flatten(1)


def _q2_k(b: Tensor) -> Tensor:
    sc = b[:, :16]
    qs = b[:, 16:80].reshape(-1, 2, 1, 32)
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    q = ((qs >> _SHIFTS2.to(b.device)) & 3).reshape(-1, 16, 16).float()
    return (
        q.mul_((d * (sc & 0x0F).float())[:, :, None]).sub_((dmin * (sc >> 4).float())[:, :, None]).flatten(1)
    )


BLOCKS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip


def dequantize(raw: Tensor, qtype: QType, dtype: torch.dtype = torch.float32) -> Tensor:
    """``raw`` uint8 [rows, row bytes] of ``qtype`` -> [rows, cols] in ``dtype``."""
    rows = raw.shape[0]
    if qtype.name == "F32":
        out = raw.contiguous().view(torch.float32)
    elif qtype.name == "F16":
        out = raw.contiguous().view(torch.float16)
    elif qtype.name == "BF16":
        out = raw.contiguous().view(torch.bfloat16)
    else:
        out = BLOCKS[qtype.name](raw.reshape(-1, qtype.nbytes))
    return out.reshape(rows, -1).to(dtype)
