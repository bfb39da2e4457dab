"""What is particular to ``vault+memory://``: fresh or shared by name, secrets dropped with the last user, URIs."""

from __future__ import annotations

import uuid

import pytest

from stitchwork.errors import ConfigError, SecretNotFound
from stitchwork.security.vault import open_vault
from stitchwork.security.vault.memory import MemoryVault


def test_unnamed_vaults_are_independent() -> None:
    first, second = open_vault("vault+memory://"), open_vault("vault+memory://")
    first.set("a", "one")
    assert second.names() == []
    with pytest.raises(SecretNotFound):
        second.get("a")


def test_named_vault_is_shared_until_the_last_user_closes() -> None:
    uri = f"vault+memory://{uuid.uuid4().hex}"
    first, second = open_vault(uri), open_vault(uri)
    first.set("a", "one")
    assert second.get("a") == "one"
    first.close()
    assert second.get("a") == "one"
    second.close()
    with open_vault(uri) as again:
        assert again.names() == []  # the last user closed it: the secrets are gone


@pytest.mark.parametrize("uri", ["vault+memory:///path", "vault+memory://name?x=1", "vault+memory://name#f",
                                 "vault+file:///tmp/vault.enc"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigError):
        MemoryVault(uri)


def test_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="takes no options"):
        open_vault("vault+memory://", key_file="/tmp/vault.key")
