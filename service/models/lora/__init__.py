"""LoRA adapters: files in kohya/A1111 and diffusers/PEFT formats, applied per row in shared calls."""

from .adapters import (
    KEY,
    MAX_PER_REQUEST,
    LoraError,
    LoraIndex,
    LoraInfo,
    ModelAdapters,
    attach,
    live,
    text_loras,
)
from .formats import LoraFormatError, LoraWeight, parse_state_dict, read_lora
from .layers import Prepared, RowLora

__all__ = [
    "KEY",
    "MAX_PER_REQUEST",
    "LoraError",
    "LoraFormatError",
    "LoraIndex",
    "LoraInfo",
    "LoraWeight",
    "ModelAdapters",
    "Prepared",
    "RowLora",
    "parse_state_dict",
    "attach",
    "live",
    "read_lora",
    "text_loras",
]
