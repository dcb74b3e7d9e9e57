"""Quantized weights that stay quantized in memory: :class:`QTensor` and :class:`QLinear`.

A :class:`QTensor` is a weight's raw ggml bytes (uint8 ``[rows, row bytes]``), its type and its
logical shape. Key maps written for plain tensors (ours for Flux, diffusers' for SD3) split fused
projections by output rows (``chunk`` / ``split`` on dim 0) and join them with ``torch.cat``:
those work on the bytes, since each row's blocks are independent, so nothing is dequantized to
rename. A ``torch.nn.Linear`` whose weight is one becomes a :class:`QLinear`, which dequantizes
the weight to the input's dtype on each call and lets it go (memory: the quantized size plus one
layer's weight at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.models.quant.ggml import QType, dequantize


class QTensor:
    """A quantized tensor of 2 or more dims; dim 0 maps to whole groups of byte rows."""

    def __init__(self, raw: Tensor, qtype: QType, shape: Sequence[int]) -> None:
        self.raw, self.qtype, self.shape = raw, qtype, torch.Size(shape)
        if len(self.shape) < 2 or raw.shape[0] % self.shape[0]:
            raise ValueError(f"a {qtype.name} tensor of shape {tuple(self.shape)} cannot be split by rows")

    def __repr__(self) -> str:
        return f"QTensor({self.qtype.name}, {tuple(self.shape)})"

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.raw, self.qtype, dtype).reshape(self.shape)

    def _rows(self, n: int) -> int:
        return self.raw.shape[0] // self.shape[0] * n

    def split(self, sizes: int | Sequence[int], dim: int = 0) -> tuple[QTensor, ...]:
        if dim != 0:
            raise ValueError("a quantized tensor splits on dim 0 only")
        if isinstance(sizes, int):
            sizes = [min(sizes, self.shape[0] - i) for i in range(0, self.shape[0], sizes)]
        parts = self.raw.split([self._rows(s) for s in sizes], dim=0)
        return tuple(QTensor(p, self.qtype, (s, *self.shape[1:])) for p, s in zip(parts, sizes, strict=True))

    def chunk(self, n: int, dim: int = 0) -> tuple[QTensor, ...]:
        return self.split(-(-self.shape[0] // n), dim)

    @classmethod
    def cat(cls, parts: Sequence[Any], dim: int = 0) -> Any:
        """Rows joined: quantized when all parts are of one type and width, else dequantized."""
        q = [p for p in parts if isinstance(p, QTensor)]
        if dim == 0 and len(q) == len(parts) and len({(p.qtype, p.shape[1:]) for p in q}) == 1:
            shape = (sum(p.shape[0] for p in q), *q[0].shape[1:])
            return QTensor(torch.cat([p.raw for p in q]), q[0].qtype, shape)
        return torch.cat([p.dequantize() if isinstance(p, QTensor) else p for p in parts], dim=dim)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """torch.cat / torch.chunk / torch.split as key maps call them; anything else is refused."""
        kwargs = kwargs or {}
        if func is torch.cat:
            return cls.cat(args[0], *args[1:], **kwargs)
        if func in (torch.chunk, Tensor.chunk):
            return args[0].chunk(*args[1:], **kwargs)
        if func in (torch.split, Tensor.split):
            return args[0].split(*args[1:], **kwargs)
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on a quantized tensor")


class QLinear(nn.Linear):
    """``nn.Linear`` with a quantized weight (a subclass, so LoRA hooks and isinstance checks apply)."""

    qweight: Tensor  # uint8 [rows, row bytes], a buffer: moves with .to(device), never cast

    def __init__(self, base: nn.Linear, weight: QTensor) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the float weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qtype = weight.qtype
        self.register_buffer("qweight", weight.raw)
        self.bias = base.bias

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The dequantized weight (a new tensor each time; the forward never keeps one)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return dequantize(self.qweight, self.qtype, dtype).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        w = dequantize(self.qweight, self.qtype, x.dtype).reshape(self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype.name}"


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def load_quantized(model: nn.Module, sd: dict[str, Any], where: str) -> nn.Module:
    """Load ``sd`` (the model's own keys; QTensor or float values) into ``model`` built on the meta
    device: QTensor weights of ``nn.Linear`` layers become :class:`QLinear`, other QTensors are
    dequantized; every key must match (``where`` names the file in errors)."""
    modules = dict(model.named_modules())
    floats: dict[str, Tensor] = {}
    quantized: set[str] = set()
    for key, value in sd.items():
        name, _, leaf = key.rpartition(".")
        if isinstance(value, QTensor):
            m = modules.get(name)
            if leaf == "weight" and type(m) is nn.Linear and value.shape == (m.out_features, m.in_features):
                _set_module(model, name, QLinear(m, value))
                quantized.add(f"{name}.qweight")
                continue
            value = value.dequantize()
        floats[key] = value
    bad = model.load_state_dict(floats, strict=False, assign=True)
    missing = sorted(set(bad.missing_keys) - quantized)
    if missing or bad.unexpected_keys:
        raise KeyError(f"{where}: missing {missing[:8]}, unexpected {sorted(bad.unexpected_keys)[:8]}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise KeyError(f"{where}: no weights for {meta[:8]}")
    return model


def quantization(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{"quantization": {ggml type: linear layers}}`` for a model with quantized layers (GET
    /models' info), else ``{}``."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QLinear):
            out[m.qtype.name] = out.get(m.qtype.name, 0) + 1
    return {"quantization": out} if out else {}
