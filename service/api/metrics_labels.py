"""Labels of the HTTP request counter, from fixed sets only: a label value is a new time series kept
for the life of the process, so nothing a client makes up (a method, a path) may become one."""

from __future__ import annotations

from starlette.types import Scope

# RFC 9110's methods and PATCH (RFC 5789); anything else counts as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
UNMATCHED = "unmatched"  # a path no route serves (never the raw path)


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def route_label(scope: Scope) -> str:
    """The matched route's template (``/jobs/{job_id}``), else ``unmatched``."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED
