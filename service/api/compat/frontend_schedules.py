"""A1111's scheduler names on any model: moved to :mod:`service.frontend_schedules` (the ComfyUI
workflows in ``service/comfy`` use it too, and import nothing from ``service.api``)."""

from service.frontend_schedules import for_model

__all__ = ["for_model"]
