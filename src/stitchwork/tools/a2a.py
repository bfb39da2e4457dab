"""Remote A2A agents declared in config (``[a2a.remotes.NAME]``) as tool manifests named ``a2a_<name>``.

Each becomes a host-side tool (``host = "a2a"``) whose execute stage is :class:`stitchwork.gateway.a2a.A2ACaller`:
the call takes the whole gateway path like any external tool (identity, Cedar with the remote URL as the resource,
taint, approval, audit), and the remote's answer is untrusted content labelled ``a2a:a2a_<name>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stitchwork.errors import ConfigError
from stitchwork.security.policy import SideEffect
from stitchwork.tools._remote import A2A_ARGS, a2a_endpoint, secret_name
from stitchwork.tools.manifest import ToolManifest

REMOTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,59}$")
REMOTE_KEYS = frozenset({"url", "key", "description", "side_effect", "timeout_s"})
HOST = "a2a"
"""The host-side handler name of every remote-agent tool."""


def tool_name(remote: str) -> str:
    """The tool name of the remote agent ``remote``."""
    return f"a2a_{remote}"


def remote_manifests(remotes: Mapping[str, Mapping[str, Any]]) -> list[ToolManifest]:
    """One manifest per ``[a2a.remotes.NAME]`` table.

    Raises:
        ConfigError: a bad name, an unknown key, a URL that is not ``a2a+https://`` (or loopback ``a2a+http://``),
            a literal key instead of a vault reference, an unknown side effect or a bad timeout.
    """
    manifests: list[ToolManifest] = []
    for name, table in sorted(remotes.items()):
        where = f"[a2a.remotes.{name}]"
        if not REMOTE_NAME.match(str(name)):
            raise ConfigError(f"{where}: the name must match {REMOTE_NAME.pattern} (the tool is a2a_<name>)")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        if unknown := sorted(set(table) - REMOTE_KEYS):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(REMOTE_KEYS))}")
        url = a2a_endpoint(table.get("url", ""), where=where)
        try:
            side_effect = SideEffect(table.get("side_effect", "external"))
        except ValueError as exc:
            raise ConfigError(f"{where}: side_effect must be one of {', '.join(s.value for s in SideEffect)}") from exc
        timeout = table.get("timeout_s", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
            raise ConfigError(f"{where}: timeout_s must be a number of seconds in (0, 3600]")
        manifests.append(ToolManifest(
            name=tool_name(name),
            description=str(table.get("description") or f"Ask the remote agent {name!r} (A2A) and get its answer."),
            side_effect=side_effect,
            entry_file=Path(),
            entry_function="",
            args_schema=A2A_ARGS,
            target="",
            limits={"timeout_s": float(timeout)},
            host=HOST,
            remote=url,
            remote_key=secret_name(table.get("key"), where=f"{where} key"),
        ))
    return manifests


__all__ = ["HOST", "remote_manifests", "tool_name"]
