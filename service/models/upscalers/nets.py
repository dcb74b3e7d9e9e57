"""What every upscaler network is to the rest of the package: weights by role, a forward pass.

Each architecture module reads a state dict (its own key layouts) into a :class:`Net` subclass whose
``forward`` is plain ``torch.nn.functional`` calls over those tensors: no ``nn.Module`` tree whose
attribute names would have to mirror one particular file layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

StateDict = Mapping[str, Tensor]


class ArchError(ValueError):
    """A state dict that does not fit the architecture its keys suggest (missing or odd-shaped keys)."""


class Net:
    """An upscaler: ``forward(x)`` maps [B, 3, h, w] in 0..1 to [B, 3, h*scale, w*scale] (unclamped)."""

    arch = ""  # spandrel's architecture id ("ESRGAN", "Compact", ...)
    family = ""  # A1111's upscaler family for /sdapi/v1/upscalers' model_name
    scale = 1
    align = 1  # windows of a tiled run start on multiples of this (a pixel-unshuffling net's factor)
    supports_half = True  # False: run in float32 where the models' dtype is float16 (spandrel's flag)

    def __init__(self, weights: dict[str, Tensor], **hyper: int | bool) -> None:
        """``hyper``: the architecture's settings read from the keys (declared on each subclass)."""
        self.w = weights
        for name, value in hyper.items():
            setattr(self, name, value)

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Net:
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in self.w.items()}
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.w.values())).dtype

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.w.values())

    def conv(self, x: Tensor, name: str) -> Tensor:
        """A 3x3 (or 1x1) convolution with 'same' zero padding, by the role name of its weights."""
        weight = self.w[f"{name}.weight"]
        return F.conv2d(x, weight, self.w.get(f"{name}.bias"), padding=weight.shape[-1] // 2)


def take(state: StateDict, key: str, ndim: int | None = None) -> Tensor:
    """``state[key]`` as a float tensor, or an :class:`ArchError` naming the key."""
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ArchError(f"missing weight {key!r}")
    if ndim is not None and value.ndim != ndim:
        raise ArchError(f"weight {key!r} has shape {tuple(value.shape)}; expected {ndim} dimensions")
    return value.float()


def seq_len(state: StateDict, prefix: str) -> int:
    """1 + the highest index i of keys ``{prefix}.{i}.…`` (0 when there is none)."""
    head = prefix + "."
    found = [k[len(head) :].split(".", 1)[0] for k in state if k.startswith(head)]
    numbers = [int(i) for i in found if i.isdigit()]
    return max(numbers) + 1 if numbers else 0


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom and right so both sides are multiples of ``multiple``. A pad as large as
    the side (a 16-px attention window over a 6-px image or tile), which one reflection cannot give,
    reflects again from the padded edge (replicates a 1-px side): the same result wherever one
    reflection suffices."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    while ph or pw:
        h, w = x.shape[-2:]
        step_h, step_w = min(ph, h - 1), min(pw, w - 1)
        if (ph and not step_h) or (pw and not step_w):
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        ph, pw = ph - step_h, pw - step_w
    return x
