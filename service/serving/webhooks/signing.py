"""Webhook signatures as Stripe signs its webhooks: ``Kdiff-Signature: t=<unix time>,v1=<hex
HMAC-SHA256 of "<t>.<raw body>">``. The timestamp is inside the signed text, so a receiver that
checks it against its clock (Stripe's default tolerance: 5 minutes) rejects a replayed request."""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Kdiff-Signature"


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"
