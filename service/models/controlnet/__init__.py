"""ControlNet: the network (diffusers' key layout), its files in the store, preprocessors, and the
per-row units that let requests with different ControlNets share UNet calls."""

from .files import ControlNetError, ControlNetFile, scan
from .net import ControlNet, ControlNetConfig, ControlNetConfigError
from .units import HINT, MAX_UNITS, UNIT, ControlSet

__all__ = [
    "HINT",
    "MAX_UNITS",
    "UNIT",
    "ControlNet",
    "ControlNetConfig",
    "ControlNetConfigError",
    "ControlNetError",
    "ControlNetFile",
    "ControlSet",
    "scan",
]
