"""Webhooks: signed POSTs of a job's terminal event to its ``callback_url`` (hooks.py), checked
against the allow list and the SSRF rules (targets.py), retried from a persisted outbox
(outbox.py) by a delivery thread off the event loop (sender.py)."""

from .hooks import Webhooks, WebhookSettings, event_body
from .signing import HEADER, signature_header
from .targets import TargetRefused, check_url, parse_patterns
