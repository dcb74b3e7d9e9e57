"""Where a webhook may go: the ``KDIFF_WEBHOOK_ALLOW`` host patterns, and the SSRF rule that private,
loopback, link-local and other non-global addresses are refused unless a pattern names the host
explicitly (no ``*`` in its host part: ``127.0.0.1:*``, ``hooks.internal:8080``).

A URL is checked twice: at submit (scheme, host pattern, an IP literal's address: a 422 naming
``callback_url``) and before every attempt, after DNS resolution (:func:`resolve`), whose checked
address is the one connected to, so a name cannot resolve to a public address for the check and a
private one for the connection (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# Non-global ranges some Python versions' is_global misses (IANA special-purpose registries): IETF
# protocol assignments (192.0.0.0/24; 2001::/23 with Teredo) and benchmarking (198.18.0.0/15).
NOT_GLOBAL = [ipaddress.ip_network(n) for n in ("192.0.0.0/24", "198.18.0.0/15", "2001::/23")]


class TargetRefused(Exception):
    """A callback URL or address the policy refuses (never retried)."""


@dataclass(frozen=True)
class Pattern:
    host: str  # lower-case fnmatch pattern, IPv6 without brackets
    port: int | None  # None = any port ("*"); a pattern without a port allows the default ports only
    any_port: bool

    @property
    def explicit(self) -> bool:
        """A pattern naming its host outright may reach private addresses; a wildcard never does."""
        return not any(c in self.host for c in "*?[")

    def matches(self, host: str, port: int, default_port: int) -> bool:
        if not fnmatch.fnmatchcase(host, self.host):
            return False
        return self.any_port or port == (self.port if self.port is not None else default_port)


def parse_patterns(entries: list[str]) -> list[Pattern]:
    """``host[:port]`` entries (``*`` wildcards; ``[v6]:port``; ``:*`` any port). ValueError naming
    a malformed entry."""
    patterns = []
    for entry in entries:
        text = entry.strip().lower()
        host, port_text = text, ""
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else rest
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        if not host or (port_text and port_text != "*" and not port_text.isdigit()):
            raise ValueError(f"KDIFF_WEBHOOK_ALLOW entry {entry!r} is not host[:port] (port a number or *)")
        port = int(port_text) if port_text.isdigit() else None
        patterns.append(Pattern(host, port, port_text == "*"))
    return patterns


@dataclass(frozen=True)
class Target:
    """A callback URL that passed the submit-time checks."""

    url: str
    scheme: str
    host: str  # lower-case, IPv6 without brackets
    port: int
    pattern: Pattern

    @property
    def path(self) -> str:
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _split(url: str) -> SplitResult:
    if len(url) > MAX_URL_CHARS:
        raise TargetRefused(f"longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError as exc:
        raise TargetRefused(f"not a URL ({exc})") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise TargetRefused("the scheme must be http or https")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("credentials in the URL are not allowed (use the signature to authenticate)")
    if not parts.hostname:
        raise TargetRefused("the URL has no host")
    return parts


def check_url(url: str, patterns: list[Pattern]) -> Target:
    """The submit-time check of a callback URL (TargetRefused saying why)."""
    parts = _split(url)
    host, scheme = parts.hostname or "", parts.scheme
    host = host.rstrip(".")  # "example.com." is example.com: one name, one pattern check
    port = parts.port or DEFAULT_PORTS[scheme]
    pattern = next((p for p in patterns if p.matches(host, port, DEFAULT_PORTS[scheme])), None)
    if pattern is None:
        allowed = ", ".join(f"{p.host}:{'*' if p.any_port else p.port or 'default'}" for p in patterns)
        raise TargetRefused(
            f"host {host}:{port} is not allowed by KDIFF_WEBHOOK_ALLOW ({allowed or 'empty: no host'})"
        )
    target = Target(url, scheme, host, port, pattern)
    literal = _literal(host)
    if literal is not None:
        check_address(literal, target)
    return target


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def refusal(address: Address) -> str | None:
    """Why ``address`` is not a public one (None when it is). IPv4-mapped and 6to4/NAT64-embedded
    IPv4 addresses are judged by the IPv4 address inside them."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in ipaddress.ip_network("64:ff9b::/96"):
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return refusal(inner)
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}"):
            return f"{address} is a {name.replace('_', '-')} address"
    if not address.is_global or any(
        address in net for net in NOT_GLOBAL
    ):  # 100.64/10 (shared), 192.0.0/24 and the rest IANA marks non-global
        return f"{address} is not a globally routable address"
    return None


def check_address(address: Address, target: Target) -> None:
    """Refuse a non-public address unless the target's pattern names its host explicitly."""
    why = refusal(address)
    if why is not None and not target.pattern.explicit:
        raise TargetRefused(
            f"{why}; refused unless KDIFF_WEBHOOK_ALLOW names the host explicitly (e.g. {target.host}:*)"
        )


async def resolve(target: Target) -> Address:
    """The address to connect to: the host's DNS answers, every one checked (one refused address
    refuses the host: a name must not mix public and private answers), the first one returned. The
    caller connects to exactly this address."""
    literal = _literal(target.host)
    if literal is not None:
        check_address(literal, target)
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"DNS lookup of {target.host} failed: {exc}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise OSError(f"DNS lookup of {target.host} returned no address")
    for address in addresses:
        check_address(address, target)
    return addresses[0]
