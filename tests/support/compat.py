"""Small helpers for the compatibility-route tests."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
from PIL import Image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def info(response_json: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(response_json["info"]))


def jobs_total(metrics_text: str) -> float:
    """Finished jobs counted by /metrics (all models and outcomes)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("kdiff_jobs_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
