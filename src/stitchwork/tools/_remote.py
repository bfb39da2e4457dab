"""Remote agents as tools: the ``a2a+https://`` URLs of A2A agents and the arguments such a tool takes.

Kept apart from :mod:`stitchwork.tools.manifest` (which declares such tools from a manifest's ``a2a = "…"``) and
:mod:`stitchwork.tools.a2a` (which declares them from ``[a2a.remotes]``) so both share one rule.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import ConfigError

A2A_ARGS: dict[str, Any] = {
    "type": "object",
    "required": ["message"],
    "additionalProperties": False,
    "properties": {
        "message": {"type": "string", "minLength": 1, "maxLength": 20_000,
                    "description": "What to ask the remote agent (plain text)."},
        "task_id": {"type": "string", "maxLength": 200,
                    "description": "Continue this task of the remote agent (from an earlier answer)."},
    },
}
"""The arguments of every remote-agent tool: the message, and optionally the remote task it continues."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def a2a_endpoint(url: str, *, where: str) -> str:
    """The HTTP(S) URL of a remote agent named ``a2a+https://host/path`` (``a2a+http://`` only to loopback).

    Raises:
        ConfigError: not an ``a2a+`` URL, no host, credentials in it, or cleartext HTTP to another machine.
    """
    if not isinstance(url, str) or not url.startswith(("a2a+https://", "a2a+http://")):
        raise ConfigError(f"{where}: a remote agent's URL must start with a2a+https:// (got {url!r})")
    http = url[len("a2a+"):]
    parts = urlsplit(http)
    if not parts.hostname:
        raise ConfigError(f"{where}: {url!r} names no host")
    if parts.username or parts.password:
        raise ConfigError(f"{where}: {url!r} carries credentials; give the key as key = \"secret://name\"")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ConfigError(f"{where}: {url!r}: a2a+http:// (cleartext) is only allowed to a loopback address")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: {url!r}: a remote agent's URL has no query or fragment")
    return http.rstrip("/")


def secret_name(ref: Any, *, where: str) -> str:
    """The vault name of a ``secret://name`` reference ("" for none)."""
    if ref in (None, ""):
        return ""
    if not isinstance(ref, str) or not ref.startswith("secret://") or len(ref) <= len("secret://"):
        raise ConfigError(f"{where}: a key must be a vault reference like secret://name (got a literal value)")
    return ref[len("secret://"):]


__all__ = ["A2A_ARGS", "a2a_endpoint", "secret_name"]
