"""``vault+memory://``: secrets in this process's memory only. A real adapter: nothing is ever written to disk.

``vault+memory://`` is a fresh, empty vault; ``vault+memory://name`` is shared by every :func:`open_vault` call with
that name in this process, until the last one is closed (then its secrets are dropped). The values are held in
clear in this process's memory and vanish with it: use it for tests, and for platforms that keep nothing on disk
and set their secrets when they start.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import ConfigError, SecretError, SecretNotFound
from stitchwork.security.vault._base import Vault, validate_secret_name, validate_secret_value

__all__ = ["MemoryVault"]


class _Secrets:
    """The secrets of one vault, and how many open :class:`MemoryVault` instances use them."""

    __slots__ = ("lock", "users", "values")

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.lock = threading.Lock()
        self.users = 0

    def __repr__(self) -> str:
        return f"_Secrets({len(self.values)} secrets, {self.users} users)"


_SHARED: dict[str, _Secrets] = {}
_SHARED_LOCK = threading.Lock()  # guards _SHARED and every _Secrets.users


class MemoryVault(Vault):
    """Secrets in a dict of this process, behind the same interface and errors as every vault.

    Args:
        uri: ``vault+memory://`` (a fresh vault) or ``vault+memory://name`` (shared by name in this process).

    Raises:
        ConfigError: the URI is not ``vault+memory://[name]``, or options were given (it takes none).
    """

    def __init__(self, uri: str = "vault+memory://", **options: Any) -> None:
        if options:
            raise ConfigError(f"vault+memory:// takes no options, got {', '.join(sorted(options))}")
        parts = urlsplit(uri)
        if parts.scheme != "vault+memory":
            raise ConfigError(f"MemoryVault needs a vault+memory:// URI, got {uri!r}")
        if parts.path or parts.query or parts.fragment:
            raise ConfigError(f"vault URI {uri!r}: expected vault+memory:// or vault+memory://name, nothing after")
        self.uri = uri
        self.name = parts.netloc
        with _SHARED_LOCK:
            secrets = _SHARED.setdefault(self.name, _Secrets()) if self.name else _Secrets()
            secrets.users += 1
        self._secrets: _Secrets | None = secrets

    def _open(self) -> _Secrets:
        secrets = self._secrets
        if secrets is None:
            raise SecretError(f"vault {self.uri} is closed")
        return secrets

    def get(self, name: str) -> str:
        validate_secret_name(name)
        secrets = self._open()
        with secrets.lock:
            value = secrets.values.get(name)
        if value is None:
            raise SecretNotFound(f"secret {name!r} not found in vault {self.uri}")
        return value

    def set(self, name: str, value: str) -> None:
        validate_secret_name(name)
        validate_secret_value(name, value)
        secrets = self._open()
        with secrets.lock:
            secrets.values[name] = value

    def delete(self, name: str) -> None:
        validate_secret_name(name)
        secrets = self._open()
        with secrets.lock:
            if secrets.values.pop(name, None) is None:
                raise SecretNotFound(f"secret {name!r} not found in vault {self.uri}")

    def names(self) -> list[str]:
        secrets = self._open()
        with secrets.lock:
            return sorted(secrets.values)

    def close(self) -> None:
        with _SHARED_LOCK:
            secrets, self._secrets = self._secrets, None
            if secrets is None:
                return
            secrets.users -= 1
            if secrets.users:
                return
            if self.name and _SHARED.get(self.name) is secrets:
                del _SHARED[self.name]
        with secrets.lock:
            secrets.values.clear()
