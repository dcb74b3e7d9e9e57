"""IP-Adapter (plain and plus, SD 1.x / SDXL): image prompts from the store's ``ipadapter/`` folder,
per row in shared UNet calls (image tokens in each row's conditioning, decoupled cross-attention)."""

from .adapters import MAX_ADAPTERS, TOKENS, UNIT, ImageAdapters
from .files import IPAdapterError, scan

__all__ = ["MAX_ADAPTERS", "TOKENS", "UNIT", "IPAdapterError", "ImageAdapters", "scan"]
