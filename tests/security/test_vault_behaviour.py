"""One behaviour suite for the Vault port, run on every adapter in ``VAULTS``.

What is particular to an adapter stays beside it: encryption at rest, key files and crash safety of ``vault+file://``
in ``test_vault.py``; sharing by name of ``vault+memory://`` in ``test_vault_memory.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stitchwork.errors import SecretError, SecretNotFound
from stitchwork.security.vault import VAULTS, Vault, open_vault, validate_secret_name

VALUE = "sk-live-7f3a9c2e41b8d6f05a1e"
INVALID_NAMES = ["", "a" * 129, "a/b", "a b", "naïve", "a\n", "../x", "semi;colon", "tab\t"]

Opener = Callable[[], Vault]


def _file_uri(tmp_path: Path) -> str:
    return f"vault+file://{tmp_path / 'state' / 'vault.enc'}"


def _memory_uri(tmp_path: Path) -> str:
    return f"vault+memory://{uuid.uuid4().hex}"  # a name: every instance opened on it shares the secrets


#: scheme → URI of one vault for a test; every opener call returns another instance on the same secrets.
URIS: dict[str, Callable[[Path], str]] = {"vault+file": _file_uri, "vault+memory": _memory_uri}
#: options for open_vault (the file adapter must not pick up a key from the environment).
OPTIONS: dict[str, dict[str, object]] = {"vault+file": {"environ": {}}, "vault+memory": {}}


def test_every_registered_adapter_is_in_the_suite() -> None:
    assert set(URIS) == set(VAULTS.adapters) == set(OPTIONS)


@pytest.fixture(params=sorted(URIS))
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens instances of one fresh vault of the adapter under test; closes them all afterwards."""
    uri = URIS[request.param](tmp_path)
    opened: list[Vault] = []

    def open_one() -> Vault:
        vault = open_vault(uri, **OPTIONS[request.param])
        opened.append(vault)
        return vault

    yield open_one
    for vault in opened:
        vault.close()


@pytest.fixture
def vault(opener: Opener) -> Vault:
    return opener()


def test_opened_by_uri_is_a_vault(vault: Vault) -> None:
    assert isinstance(vault, Vault)
    assert vault.uri.startswith(f"{VAULTS.scheme(vault.uri)}://")


def test_new_vault_is_empty(vault: Vault) -> None:
    assert vault.names() == []
    with pytest.raises(SecretNotFound, match="'nope'"):
        vault.get("nope")
    with pytest.raises(SecretNotFound, match="'nope'"):
        vault.delete("nope")


def test_round_trip(vault: Vault) -> None:
    assert vault.names() == []
    vault.set("openai", VALUE)
    vault.set("github.token", "ghp_abcdef")
    assert vault.get("openai") == VALUE
    assert vault.names() == ["github.token", "openai"]
    vault.set("openai", "rotated-value")
    assert vault.get("openai") == "rotated-value"
    vault.delete("openai")
    assert vault.names() == ["github.token"]
    with pytest.raises(SecretNotFound, match="openai"):
        vault.get("openai")
    with pytest.raises(SecretNotFound):
        vault.delete("openai")


def test_names_are_sorted_and_never_values(vault: Vault) -> None:
    for name in ("zeta", "alpha", "Mid.1", "mid-2", "_x"):
        vault.set(name, f"{VALUE}-{name}")
    assert vault.names() == sorted(["zeta", "alpha", "Mid.1", "mid-2", "_x"])
    assert not any(VALUE in name for name in vault.names())


def test_unknown_secret_is_a_secret_error_naming_it(vault: Vault) -> None:
    vault.set("known", VALUE)
    with pytest.raises(SecretNotFound) as info:
        vault.get("unknown")
    assert isinstance(info.value, SecretError)
    assert "'unknown'" in str(info.value) and VALUE not in str(info.value)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused_by_every_method(vault: Vault, name: str) -> None:
    with pytest.raises(SecretError, match="invalid secret name"):
        validate_secret_name(name)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.set(name, VALUE)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.get(name)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.delete(name)
    assert vault.names() == []


def test_valid_names(vault: Vault) -> None:
    for name in ("A.b-c_9", "a" * 128, "x", "..."):
        assert validate_secret_name(name) == name
        vault.set(name, VALUE)
    assert len(vault.names()) == 4
    with pytest.raises(SecretError):
        validate_secret_name(42)  # type: ignore[arg-type]


def test_value_must_be_string(vault: Vault) -> None:
    with pytest.raises(SecretError, match="must be a string"):
        vault.set("a", b"bytes")  # type: ignore[arg-type]
    with pytest.raises(SecretError, match="must be a string"):
        vault.set("a", None)  # type: ignore[arg-type]
    assert vault.names() == []


def test_unicode_and_odd_values(opener: Opener) -> None:
    vault = opener()
    values = {"u": "pässwörd-秘密-🔑", "empty": "", "quote": 'a"b\\c\n', "long": "x" * 100_000}
    for name, value in values.items():
        vault.set(name, value)
    reopened = opener()
    for name, value in values.items():
        assert reopened.get(name) == value


def test_other_instance_sees_writes(opener: Opener) -> None:
    first, second = opener(), opener()
    first.set("a", "value-one")
    assert second.get("a") == "value-one"
    second.set("a", "value-two")
    assert first.get("a") == "value-two"
    second.delete("a")
    assert first.names() == []


def test_values_never_in_repr_str_or_errors(vault: Vault) -> None:
    vault.set("api", VALUE)
    assert VALUE not in repr(vault) and VALUE not in str(vault)
    messages = []
    for call in (
        lambda: vault.get("other"),
        lambda: vault.delete("other"),
        lambda: vault.set("bad name", VALUE),
        lambda: vault.set("api", VALUE.encode()),  # type: ignore[arg-type]
    ):
        with pytest.raises(SecretError) as info:
            call()
        messages.append(str(info.value))
    assert all(VALUE not in message for message in messages), messages
    assert vault.get("api") == VALUE


def test_close(opener: Opener) -> None:
    vault, other = opener(), opener()
    vault.set("a", VALUE)
    vault.close()
    for call in (lambda: vault.get("a"), lambda: vault.set("a", "x"), lambda: vault.delete("a"), vault.names):
        with pytest.raises(SecretError, match="closed"):
            call()
    vault.close()  # closing twice is harmless
    assert other.get("a") == VALUE  # closing one instance leaves the others working


def test_context_manager_closes(opener: Opener) -> None:
    with opener() as vault:
        vault.set("a", VALUE)
        assert vault.get("a") == VALUE
    with pytest.raises(SecretError, match="closed"):
        vault.get("a")


def test_concurrent_sets_on_one_instance(vault: Vault) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(5):
                vault.set(f"w{worker}.k{i}", f"value-{worker}-{i}")
                assert vault.get(f"w{worker}.k{i}") == f"value-{worker}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(vault.names()) == 30
    assert vault.get("w4.k3") == "value-4-3"
