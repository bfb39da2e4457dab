"""The secret vault port: a small interface, the name rules, and adapters chosen by URI.

A vault maps secret names (``[A-Za-z0-9_.-]{1,128}``) to string values. Values never appear in exceptions,
``repr`` or logs; only names do. Adapters (:func:`open_vault`):

* ``vault+file:///path/vault.enc``: an AES-256-GCM encrypted file (:mod:`stitchwork.security.vault.file`), the
  default;
* ``vault+memory://`` (a fresh vault) or ``vault+memory://name`` (shared in this process): secrets in memory only
  (:mod:`stitchwork.security.vault.memory`), for tests and for platforms that keep nothing on disk.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any

from stitchwork._registry import Registry
from stitchwork.errors import SecretError

__all__ = ["VAULTS", "Vault", "open_vault", "validate_secret_name", "validate_secret_value"]

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def validate_secret_name(name: str) -> str:
    """Checks a secret name and returns it unchanged.

    Args:
        name: 1 to 128 characters from ``A-Z a-z 0-9 _ . -``.

    Returns:
        ``name``.

    Raises:
        SecretError: the name is not a string or has other characters or length.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise SecretError(f"invalid secret name {shown}: use 1-128 characters from A-Z a-z 0-9 _ . -")
    return name


def validate_secret_value(name: str, value: str) -> str:
    """Checks that the value of secret ``name`` is a string and returns it unchanged (the value is never shown).

    Raises:
        SecretError: the value is not a string.
    """
    if not isinstance(value, str):
        raise SecretError(f"secret {name!r}: value must be a string, got {type(value).__name__}")
    return value


class Vault(ABC):
    """A store of named secrets. Implementations are thread-safe.

    Every method that takes a name checks it first (:func:`validate_secret_name`). Values never appear in
    exceptions, ``repr`` or logs; only names do. After :meth:`close`, every method raises :class:`SecretError`.

    Attributes:
        uri: The URI the vault was opened with (it names no value).
    """

    uri: str

    @abstractmethod
    def get(self, name: str) -> str:
        """Returns the value of secret ``name``.

        Raises:
            SecretNotFound: no secret has that name.
            SecretError: the name is invalid, or the vault cannot be read (see subclasses).
        """

    @abstractmethod
    def set(self, name: str, value: str) -> None:
        """Stores ``value`` under ``name``, replacing any previous value.

        Raises:
            SecretError: the name is invalid, the value is not a string, or the vault cannot be written.
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Removes secret ``name``.

        Raises:
            SecretNotFound: no secret has that name.
        """

    @abstractmethod
    def names(self) -> list[str]:
        """Returns the sorted names of all secrets (never their values)."""

    @abstractmethod
    def close(self) -> None:
        """Releases resources; the vault must not be used afterwards. Closing twice is harmless."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


VAULTS = Registry("vault", {
    "vault+file": ("stitchwork.security.vault.file:FileVault", None),
    "vault+memory": ("stitchwork.security.vault.memory:MemoryVault", None),
})


def open_vault(uri: str, **options: Any) -> Vault:
    """Opens the vault named by ``uri`` (``vault+file:///path/vault.enc``, ``vault+memory://[name]``).

    Args:
        uri: Vault URI; the scheme selects the adapter.
        **options: Passed to the adapter (for ``FileVault``: ``key``, ``key_file``, ``environ``).

    Raises:
        ConfigError: unknown scheme, bad URI, or options the adapter does not take.
    """
    vault: Vault = VAULTS.load(uri)(uri, **options)
    return vault
