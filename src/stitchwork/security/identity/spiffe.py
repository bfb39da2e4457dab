"""SPIFFE ids of agents: ``spiffe://<trust_domain>/agent/<name>``, and the rules for both parts."""

from __future__ import annotations

import re

from stitchwork.errors import ConfigError, UnknownAgent

__all__ = ["agent_spiffe_id"]

_AGENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")


def _check_trust_domain(trust_domain: str) -> None:
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ConfigError(
            f"trust domain {trust_domain!r} is not valid: use lower-case letters, digits, '.', '-' and '_' "
            "(for example 'stitchwork.local')"
        )


def agent_spiffe_id(trust_domain: str, name: str) -> str:
    """The SPIFFE id of agent ``name``: ``spiffe://<trust_domain>/agent/<name>``.

    Args:
        trust_domain: the SPIFFE trust domain, e.g. ``stitchwork.local``.
        name: the agent name: 1-63 characters of ``a-z 0-9 . _ -``, starting with a letter or digit.

    Returns:
        The SPIFFE id as a string.

    Raises:
        ConfigError: the trust domain is not a valid SPIFFE trust domain name.
        UnknownAgent: the agent name is not valid.
    """
    _check_trust_domain(trust_domain)
    if not isinstance(name, str) or not _AGENT_NAME.fullmatch(name):
        raise UnknownAgent(
            f"agent name {name!r} is not valid: use 1 to 63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return f"spiffe://{trust_domain}/agent/{name}"

