"""URI scheme → adapter class, imported lazily; a missing optional dependency names its extra."""

from __future__ import annotations

import difflib
import importlib
from typing import Any
from urllib.parse import urlsplit

from stitchwork.errors import ConfigError


class Registry:
    """Maps URI schemes of one port to ``"module:Class"`` strings.

    Args:
        port: Name of the port, used in error messages ("sandbox", "store", "model").
        adapters: scheme → (``"module:Class"``, extra name or ``None``).
    """

    def __init__(self, port: str, adapters: dict[str, tuple[str, str | None]]) -> None:
        self.port = port
        self.adapters = adapters

    def scheme(self, uri: str) -> str:
        scheme = urlsplit(uri).scheme if "://" in uri else ""
        if not scheme:
            raise ConfigError(f"{self.port} URI {uri!r} has no scheme; expected one of {self.known()}")
        return scheme

    def known(self) -> str:
        return ", ".join(f"{s}://" for s in sorted(self.adapters))

    def load(self, uri: str) -> Any:
        """Returns the adapter class for ``uri``."""
        scheme = self.scheme(uri)
        if scheme not in self.adapters:
            hint = difflib.get_close_matches(scheme, list(self.adapters), n=1)
            did_you_mean = f" (did you mean {hint[0]}://?)" if hint else ""
            raise ConfigError(
                f"unknown {self.port} URI scheme {scheme!r} in {uri!r}{did_you_mean}; known: {self.known()}"
            )
        target, extra = self.adapters[scheme]
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            install = f"pip install 'stitchwork[{extra}]'" if extra else "reinstall stitchwork"
            raise ConfigError(
                f"{self.port} adapter {scheme}:// needs a package that is not installed "
                f"({exc.name or exc}); run: {install}"
            ) from exc
        return getattr(module, class_name)
