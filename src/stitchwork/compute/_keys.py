"""Provider keys: adapters hold ``secret://name`` references; the model gateway resolves them during a call.

A model opened with ``key=secret://name`` can only reach its provider while the gateway has a resolver in scope
(:func:`provider_keys`), so a model call that goes around the gateway fails instead of carrying the key.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Iterator

from stitchwork.errors import ConfigError, ModelError, SecretError

_SECRET_REF = re.compile(r"^secret://([A-Za-z0-9_.-]{1,128})$")
_RESOLVER: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("provider_keys", default=None)


def parse_key_ref(value: str) -> str:
    """The secret name of a ``secret://name`` reference; a raw key is refused.

    Raises:
        ConfigError: ``value`` is not a ``secret://`` reference.
    """
    match = _SECRET_REF.match(value)
    if not match:
        raise ConfigError("a model's provider key must be a vault reference secret://NAME, never the key itself")
    return match.group(1)


@contextlib.contextmanager
def provider_keys(resolve: Callable[[str], str]) -> Iterator[None]:
    """Lets adapters resolve their key references with ``resolve`` (a vault's ``get``) inside the block."""
    token = _RESOLVER.set(resolve)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def resolve_key(name: str) -> str:
    """The provider key called ``name``, from the resolver in scope.

    Raises:
        ModelError: no gateway call is in scope, or the vault has no such secret.
    """
    resolve = _RESOLVER.get()
    if resolve is None:
        raise ModelError(f"the provider key secret://{name} is only injected by the model gateway; call the model "
                         "through it")
    try:
        return resolve(name)
    except SecretError as exc:
        raise ModelError(f"provider key secret://{name}: {exc}") from exc
