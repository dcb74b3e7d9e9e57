"""The one input-error type of the project, from the sampling core up to the HTTP API."""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """An input that does not fit: ``field`` names it (a sampler or schedule option, ``steps``,
    ``sigmas``, or a request field), ``allowed`` lists what would (when it is a list). The API
    renders it as a 422 naming the field, so code that raises it never has its message searched."""

    def __init__(self, field: str, message: str, allowed: list[Any] | None = None) -> None:
        super().__init__(message)
        self.field, self.message, self.allowed = field, message, allowed
