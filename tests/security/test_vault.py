"""FileVault (the encrypted file adapter: at rest, key sources, crash safety) and Redactor.

The contract every vault shares (names, errors, close) is pinned in ``test_vault_behaviour.py``.
"""

from __future__ import annotations

import base64
import json
import os
import random
import stat
import threading
import time
from collections import namedtuple
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stitchwork.errors import ConfigError, SecretError, SecretNotFound, VaultCorrupt, VaultKeyError
from stitchwork.security.redact import Redactor
from stitchwork.security.vault import Vault, open_vault, validate_secret_name
from stitchwork.security.vault.file import MAGIC, FileVault, _Header, _key_check

VALUE = "sk-live-7f3a9c2e41b8d6f05a1e"
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def uri(path: Path) -> str:
    return f"vault+file://{path}"


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


@pytest.fixture
def vault_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "vault.enc"


def make(path: Path, **options: object) -> FileVault:
    options.setdefault("environ", {})
    return FileVault(uri(path), **options)  # type: ignore[arg-type]


# -- basic behaviour -------------------------------------------------------------------------------------


def test_missing_vault_is_empty_and_creates_nothing(vault_path: Path) -> None:
    vault = make(vault_path)
    assert vault.names() == []
    with pytest.raises(SecretNotFound):
        vault.get("nope")
    with pytest.raises(SecretNotFound):
        vault.delete("nope")
    assert not vault_path.parent.exists()


def test_persistence_across_instances_and_open_vault(vault_path: Path) -> None:
    make(vault_path).set("db", VALUE)
    reopened = open_vault(uri(vault_path), environ={})
    assert isinstance(reopened, Vault)
    assert reopened.get("db") == VALUE
    assert reopened.names() == ["db"]


def test_other_instance_sees_writes(vault_path: Path) -> None:
    first, second = make(vault_path), make(vault_path)
    first.set("a", "value-one")
    assert second.get("a") == "value-one"
    second.set("a", "value-two")
    assert first.get("a") == "value-two"  # cache invalidated by the file change
    second.delete("a")
    assert first.names() == []


def test_values_not_in_file_repr_or_errors(vault_path: Path) -> None:
    vault = make(vault_path)
    vault.set("api", VALUE)
    data = vault_path.read_bytes()
    assert data.startswith(MAGIC)
    raw = VALUE.encode()
    for form in (raw, base64.b64encode(raw), raw.hex().encode(), json.dumps(VALUE).encode()):
        assert form not in data
    assert VALUE not in repr(vault)
    with pytest.raises(SecretNotFound) as info:
        vault.get("other")
    assert VALUE not in str(info.value)


def test_fresh_nonce_every_write(vault_path: Path) -> None:
    vault = make(vault_path)
    vault.set("a", VALUE)
    before = vault_path.read_bytes()
    vault.set("a", VALUE)
    after = vault_path.read_bytes()
    assert before != after
    assert len(before) == len(after)


def test_vault_file_mode(vault_path: Path) -> None:
    make(vault_path).set("a", VALUE)
    assert stat.S_IMODE(vault_path.stat().st_mode) == 0o600


def test_close(vault_path: Path) -> None:
    vault = make(vault_path)
    vault.set("a", VALUE)
    vault.close()
    with pytest.raises(SecretError, match="closed"):
        vault.get("a")
    with pytest.raises(SecretError, match="closed"):
        vault.set("a", "x")
    with make(vault_path) as again:
        assert again.get("a") == VALUE


@pytest.mark.parametrize("name", ["", "a" * 129, "a/b", "a b", "naïve", "a\n", "../x", "semi;colon", "tab\t"])
def test_invalid_names(vault_path: Path, name: str) -> None:
    vault = make(vault_path)
    with pytest.raises(SecretError, match="invalid secret name"):
        validate_secret_name(name)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.set(name, VALUE)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.get(name)
    with pytest.raises(SecretError, match="invalid secret name"):
        vault.delete(name)
    assert not vault_path.exists()


def test_bad_uris() -> None:
    with pytest.raises(ConfigError, match="no path"):
        FileVault("vault+file://", environ={})
    with pytest.raises(ConfigError):
        FileVault("file:///tmp/vault.enc", environ={})
    with pytest.raises(ConfigError, match="unknown vault URI scheme"):
        open_vault("vault+s3://bucket/vault")


# -- key file --------------------------------------------------------------------------------------------


def test_key_file_created_0600_on_first_write(vault_path: Path) -> None:
    vault = make(vault_path)
    key_file = vault_path.parent / "vault.key"
    assert vault.key_file == key_file
    vault.set("a", VALUE)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault_path.parent.stat().st_mode) == 0o700
    key = key_file.read_bytes()
    assert len(key) == 32
    # The key file's key is the raw key: the same bytes given as key= open the vault.
    assert make(vault_path, key=key).get("a") == VALUE
    # And no stray temporary files are left behind.
    assert sorted(p.name for p in vault_path.parent.iterdir()) == ["vault.enc", "vault.enc.lock", "vault.key"]


def test_explicit_key_file(tmp_path: Path, vault_path: Path) -> None:
    key_file = tmp_path / "keys" / "my.key"
    make(vault_path, key_file=key_file).set("a", VALUE)
    assert key_file.exists()
    assert not (vault_path.parent / "vault.key").exists()
    assert make(vault_path, key_file=key_file).get("a") == VALUE


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_permissive_key_file_refused(vault_path: Path, mode: int) -> None:
    make(vault_path).set("a", VALUE)
    key_file = vault_path.parent / "vault.key"
    key_file.chmod(mode)
    before = snapshot(vault_path)
    with pytest.raises(VaultKeyError, match="chmod 600"):
        make(vault_path).get("a")
    with pytest.raises(VaultKeyError, match="chmod 600"):
        make(vault_path).set("a", "other")
    assert snapshot(vault_path) == before
    key_file.chmod(0o400)  # read-only for the owner is fine
    assert make(vault_path).get("a") == VALUE


def test_permissive_key_file_refused_for_new_vault(vault_path: Path) -> None:
    vault_path.parent.mkdir(parents=True)
    key_file = vault_path.parent / "vault.key"
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o644)
    with pytest.raises(VaultKeyError, match="chmod 600"):
        make(vault_path).set("a", VALUE)
    assert not vault_path.exists()


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_wrong_length(vault_path: Path, size: int) -> None:
    vault_path.parent.mkdir(parents=True)
    key_file = vault_path.parent / "vault.key"
    key_file.write_bytes(b"k" * size)
    key_file.chmod(0o600)
    with pytest.raises(VaultKeyError, match="exactly 32"):
        make(vault_path).set("a", VALUE)
    assert not vault_path.exists()
    assert key_file.read_bytes() == b"k" * size


def test_missing_key_file_for_existing_vault(vault_path: Path) -> None:
    make(vault_path).set("a", VALUE)
    key_file = vault_path.parent / "vault.key"
    key_file.unlink()
    before = snapshot(vault_path)
    with pytest.raises(VaultKeyError, match="does not exist"):
        make(vault_path).set("b", VALUE)
    assert not key_file.exists()  # a new random key would never open the existing vault
    assert snapshot(vault_path) == before


# -- environment key -------------------------------------------------------------------------------------

RAW = bytes(range(100, 132))


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(RAW).decode(),
        base64.b64encode(RAW).decode().rstrip("="),
        base64.urlsafe_b64encode(RAW).decode(),
        RAW.hex(),
        RAW.hex().upper(),
        f"  {RAW.hex()}\n",
    ],
)
def test_env_raw_key(vault_path: Path, text: str) -> None:
    FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": text}).set("a", VALUE)
    assert not (vault_path.parent / "vault.key").exists()
    assert vault_path.read_bytes()[len(MAGIC)] == 0  # raw-key flag
    # Every spelling of the same 32 bytes opens it.
    assert make(vault_path, key=RAW).get("a") == VALUE
    assert FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": RAW.hex()}).get("a") == VALUE


def test_env_passphrase(vault_path: Path) -> None:
    env = {"STITCHWORK_VAULT_KEY": "correct horse battery staple"}
    FileVault(uri(vault_path), environ=env).set("a", VALUE)
    assert not (vault_path.parent / "vault.key").exists()
    data = vault_path.read_bytes()
    assert data[len(MAGIC)] == 1  # scrypt flag, salt in the header
    vault = FileVault(uri(vault_path), environ=env)
    assert vault.get("a") == VALUE
    vault.set("b", "second")
    assert FileVault(uri(vault_path), environ=env).names() == ["a", "b"]
    before = snapshot(vault_path)
    with pytest.raises(VaultKeyError, match="wrong vault key"):
        FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": "correct horse battery stapler"}).get("a")
    with pytest.raises(VaultKeyError, match="passphrase"):
        FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": RAW.hex()}).get("a")
    with pytest.raises(VaultKeyError, match="passphrase"):
        make(vault_path).get("a")  # no env: the key file cannot open a passphrase vault
    assert snapshot(vault_path) == before
    assert not (vault_path.parent / "vault.key").exists()


def test_passphrase_salts_differ(tmp_path: Path) -> None:
    env = {"STITCHWORK_VAULT_KEY": "same passphrase"}
    one, two = tmp_path / "one.enc", tmp_path / "two.enc"
    FileVault(uri(one), environ=env).set("a", VALUE)
    FileVault(uri(two), environ=env).set("a", VALUE)
    salt = slice(len(MAGIC) + 4, len(MAGIC) + 20)
    assert one.read_bytes()[salt] != two.read_bytes()[salt]


def test_raw_vault_refuses_passphrase(vault_path: Path) -> None:
    make(vault_path, key=KEY_A).set("a", VALUE)
    with pytest.raises(VaultKeyError, match="raw 32-byte key"):
        FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": "a passphrase"}).get("a")


def test_env_beats_key_file_and_key_beats_env(vault_path: Path) -> None:
    env = {"STITCHWORK_VAULT_KEY": KEY_B.hex()}
    FileVault(uri(vault_path), environ=env).set("a", VALUE)
    assert (
        FileVault(uri(vault_path), key=KEY_B, environ={"STITCHWORK_VAULT_KEY": KEY_A.hex()}).get("a") == VALUE
    )
    with pytest.raises(VaultKeyError):
        FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": KEY_A.hex()}).get("a")


def test_bad_key_arguments(vault_path: Path) -> None:
    with pytest.raises(VaultKeyError, match="empty"):
        FileVault(uri(vault_path), environ={"STITCHWORK_VAULT_KEY": "  "})
    with pytest.raises(VaultKeyError, match="32 bytes"):
        make(vault_path, key=b"short")


# -- wrong key and corruption ----------------------------------------------------------------------------


def test_wrong_key_leaves_file_alone(vault_path: Path) -> None:
    make(vault_path, key=KEY_A).set("a", VALUE)
    before = snapshot(vault_path)
    wrong = make(vault_path, key=KEY_B)
    for action in (
        lambda: wrong.get("a"),
        wrong.names,
        lambda: wrong.set("a", "x"),
        lambda: wrong.delete("a"),
    ):
        with pytest.raises(VaultKeyError) as info:
            action()
        message = str(info.value)
        assert f"cannot decrypt {vault_path}: wrong vault key" in message
        assert "STITCHWORK_VAULT_KEY" in message and "vault.key" in message
        assert VALUE not in message
    assert snapshot(vault_path) == before
    assert not vault_path.with_name("vault.enc.bak").exists()
    assert make(vault_path, key=KEY_A).get("a") == VALUE


def _corrupt_cases(data: bytes) -> dict[str, bytes]:
    def flip(offset: int) -> bytes:
        out = bytearray(data)
        out[offset] ^= 0x01
        return bytes(out)

    header_len = len(MAGIC) + 1 + 16 + 4
    return {
        "flip last byte (tag)": flip(len(data) - 1),
        "flip middle of ciphertext": flip(header_len + 12 + 3),
        "flip nonce": flip(header_len + 2),
        "flip key check": flip(len(MAGIC) + 3),
        "flip kdf flag": flip(len(MAGIC)),
        "truncate to half": data[: len(data) // 2],
        "truncate one byte": data[:-1],
        "truncate into header": data[:20],
        "truncate to magic": data[: len(MAGIC)],
        "empty": b"",
        "bad magic": b"SWVAULT2" + data[len(MAGIC) :],
        "not a vault": b'{"a": "plain json"}',
    }


@pytest.mark.parametrize("case", list(_corrupt_cases(b"x" * 100)))
def test_corrupt_file(vault_path: Path, case: str) -> None:
    vault = make(vault_path, key=KEY_A)
    vault.set("a", VALUE)
    vault.set("b", VALUE)  # second write: the .bak now exists
    damaged = _corrupt_cases(vault_path.read_bytes())[case]
    vault_path.write_bytes(damaged)
    before = snapshot(vault_path)
    fresh = make(vault_path, key=KEY_A)
    for action in (
        lambda: fresh.get("a"),
        fresh.names,
        lambda: fresh.set("c", "x"),
        lambda: fresh.delete("a"),
    ):
        with pytest.raises(VaultCorrupt) as info:
            action()
        message = str(info.value)
        assert str(vault_path) in message
        assert "vault.enc.bak" in message and "previous version" in message
        assert VALUE not in message
    assert snapshot(vault_path) == before
    # The cached instance notices the change too.
    with pytest.raises(VaultCorrupt):
        vault.get("a")


def test_corrupt_without_backup_says_so(vault_path: Path) -> None:
    make(vault_path, key=KEY_A).set("a", VALUE)
    vault_path.write_bytes(vault_path.read_bytes()[:-3])
    with pytest.raises(VaultCorrupt, match="no backup"):
        make(vault_path, key=KEY_A).get("a")


def _forge(path: Path, key: bytes, plaintext: bytes) -> None:
    header = _Header(kdf=0, check=_key_check(key)).encode()
    nonce = os.urandom(12)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + nonce + AESGCM(key).encrypt(nonce, plaintext, header))


@pytest.mark.parametrize(
    "plaintext", [b"not json " + VALUE.encode(), b'["' + VALUE.encode() + b'"]', b'{"a": 1}', b"\xff\xfe"]
)
def test_bad_document_is_corrupt_and_does_not_leak(vault_path: Path, plaintext: bytes) -> None:
    _forge(vault_path, KEY_A, plaintext)
    with pytest.raises(VaultCorrupt) as info:
        make(vault_path, key=KEY_A).names()
    assert VALUE not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_forged_valid_document_reads(vault_path: Path) -> None:
    _forge(vault_path, KEY_A, json.dumps({"a": VALUE}).encode())
    assert make(vault_path, key=KEY_A).get("a") == VALUE


def test_backup_kept(vault_path: Path) -> None:
    vault = make(vault_path, key=KEY_A)
    backup = vault_path.with_name("vault.enc.bak")
    vault.set("a", "first")
    assert not backup.exists()
    vault.set("a", "second")
    assert make(backup, key=KEY_A).get("a") == "first"
    vault.delete("a")
    assert make(backup, key=KEY_A).get("a") == "second"
    assert make(vault_path, key=KEY_A).names() == []
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


def test_failed_write_keeps_old_vault(vault_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = make(vault_path, key=KEY_A)
    vault.set("a", VALUE)
    before = snapshot(vault_path)

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("stitchwork.security.vault.file.os.replace", crash)
    with pytest.raises(SecretError, match="cannot write vault"):
        vault.set("a", "new value")
    monkeypatch.undo()
    assert snapshot(vault_path) == before
    assert not [p for p in vault_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert make(vault_path, key=KEY_A).get("a") == VALUE


def test_backup_by_copy_without_hard_links(vault_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = make(vault_path, key=KEY_A)
    vault.set("a", "first")

    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("stitchwork.security.vault.file.os.link", no_links)
    vault.set("a", "second")
    backup = vault_path.with_name("vault.enc.bak")
    assert backup.stat().st_ino != vault_path.stat().st_ino
    assert make(backup, key=KEY_A).get("a") == "first"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600


# -- concurrency -----------------------------------------------------------------------------------------


def test_concurrent_set_one_instance(vault_path: Path) -> None:
    vault = make(vault_path, key=KEY_A)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(5):
                vault.set(f"w{worker}.k{i}", f"value-{worker}-{i}")
                assert vault.get(f"w{worker}.k{i}") == f"value-{worker}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    reopened = make(vault_path, key=KEY_A)
    assert len(reopened.names()) == 60
    assert reopened.get("w7.k3") == "value-7-3"


def test_concurrent_set_separate_instances(vault_path: Path) -> None:
    """Separate instances stand in for separate processes: the file lock prevents lost updates."""
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            vault = make(vault_path)  # all share the key file, created by whoever comes first
            for i in range(5):
                vault.set(f"w{worker}.k{i}", "v")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(make(vault_path).names()) == 40


# -- Redactor --------------------------------------------------------------------------------------------


def test_redact_plain() -> None:
    redactor = Redactor({"api": VALUE})
    assert redactor.redact_text(f"key={VALUE}; again {VALUE}.") == "key=[secret:api]; again [secret:api]."
    assert redactor.contains_secret(f"xx{VALUE}xx") == "api"
    assert redactor.contains_secret("nothing to see") is None
    assert redactor.redact_text("nothing to see") == "nothing to see"
    assert VALUE not in repr(redactor)


def test_redact_inside_json() -> None:
    tricky = 'p"ss\\wörd/2024'
    redactor = Redactor({"api": VALUE, "db": tricky})
    for ensure_ascii in (True, False):
        text = json.dumps(
            {"out": f"token {VALUE}", "db": tricky, "nested": [tricky]}, ensure_ascii=ensure_ascii
        )
        redacted = redactor.redact_text(text)
        assert json.loads(redacted) == {
            "out": "token [secret:api]",
            "db": "[secret:db]",
            "nested": ["[secret:db]"],
        }


def test_redact_nested_structures() -> None:
    Pair = namedtuple("Pair", "left right")
    redactor = Redactor({"api": VALUE})
    original = {
        f"header-{VALUE}": [VALUE, ("x", VALUE), {"deep": {VALUE: 1}}],
        "pair": Pair(VALUE, 2),
        "set": {VALUE, "plain"},
        "bytes": f"b{VALUE}".encode(),
        "other": 3.5,
        "none": None,
    }
    copy = json.dumps(original["header-" + VALUE])
    redacted = redactor.redact(original)
    assert redacted == {
        "header-[secret:api]": ["[secret:api]", ("x", "[secret:api]"), {"deep": {"[secret:api]": 1}}],
        "pair": Pair("[secret:api]", 2),
        "set": {"[secret:api]", "plain"},
        "bytes": b"b[secret:api]",
        "other": 3.5,
        "none": None,
    }
    assert type(redacted["pair"]) is Pair
    assert json.dumps(original["header-" + VALUE]) == copy  # the input is not modified
    assert VALUE not in repr(redacted)


def _encodings(value: str) -> dict[str, str]:
    raw = value.encode()
    return {
        "base64": base64.b64encode(raw).decode(),
        "base64 unpadded": base64.b64encode(raw).decode().rstrip("="),
        "base64 urlsafe": base64.urlsafe_b64encode(raw).decode(),
        "base64 urlsafe unpadded": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex": raw.hex(),
        "HEX": raw.hex().upper(),
        "quote": quote(value, safe=""),
        "quote path": quote(value),
        "quote_plus": quote_plus(value),
        "percent lower": quote(value, safe="").lower(),
        "every byte": "".join(f"%{b:02x}" for b in raw),
        "reversed": value[::-1],
    }


@pytest.mark.parametrize("value", ["s3cr3t/+ value?&=", "tok_ab12+/cd==", "pässwörd-秘密"])
def test_redact_encodings(value: str) -> None:
    redactor = Redactor({"api": value})
    for form_name, form in _encodings(value).items():
        text = f"prefix {form} suffix"
        assert redactor.contains_secret(text) == "api", form_name
        assert redactor.redact_text(text) == "prefix [secret:api] suffix", form_name


def test_redact_base64_embedded_at_every_alignment() -> None:
    value = "hunter2-is-my-password"
    redactor = Redactor({"pw": value})
    rng = random.Random(7)
    for before in range(6):
        for after in range(4):
            raw = rng.randbytes(before) + value.encode() + rng.randbytes(after)
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                blob = encode(raw).decode()
                redacted = redactor.redact_text(blob)
                assert "[secret:pw]" in redacted, (before, after)
                assert len(redacted) < len(blob)  # most of the value's characters are gone


def test_short_values_untouched() -> None:
    redactor = Redactor({"pin": "123", "empty": "", "ok": "abcd"})
    text = "pin 123, base64 MTIz, hex 313233"
    assert redactor.redact_text(text) == text
    assert redactor.contains_secret(text) is None
    assert redactor.redact_text("x abcd y") == "x [secret:ok] y"
    assert repr(redactor) == "Redactor(1 secrets)"


def test_no_secrets() -> None:
    redactor = Redactor({})
    assert redactor.redact_text("anything") == "anything"
    assert redactor.redact({"a": ["b"]}) == {"a": ["b"]}
    assert redactor.contains_secret("anything") is None


def test_overlapping_secrets() -> None:
    redactor = Redactor({"short": "password", "long": "password123", "tail": "word123456"})
    assert redactor.redact_text("pw: password123!") == "pw: [secret:long]!"
    assert redactor.redact_text("pw: password!") == "pw: [secret:short]!"
    # "password123" and "word123456" overlap without either containing the other: nothing of either survives.
    assert redactor.redact_text("<password123456>") == "<[secret:long]>"
    partial = Redactor({"a": "abcdefgh", "b": "efghijkl"})
    assert partial.redact_text("-abcdefghijkl-") == "-[secret:a]-"
    assert partial.redact_text("abcdefgh efghijkl") == "[secret:a] [secret:b]"
    same = Redactor({"x": "duplicate-value", "y": "duplicate-value"})
    assert same.redact_text("duplicate-value") == "[secret:x]"


def test_non_ascii_values() -> None:
    redactor = Redactor({"jp": "秘密の鍵です", "emoji": "🔑🔑key"})
    assert redactor.redact_text("鍵: 秘密の鍵です。") == "鍵: [secret:jp]。"
    assert redactor.redact_text("a🔑🔑keyb") == "a[secret:emoji]b"
    assert redactor.redact_text(base64.b64encode("秘密の鍵です".encode()).decode()) == "[secret:jp]"
    assert redactor.redact_text(quote("🔑🔑key")) == "[secret:emoji]"


def test_regex_metacharacters_in_values() -> None:
    redactor = Redactor({"re": "a.b*c(d)[e]"})
    assert redactor.redact_text("aXbbbcde a.b*c(d)[e]") == "aXbbbcde [secret:re]"


def test_one_megabyte_is_fast() -> None:
    rng = random.Random(3)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    secrets = {f"s{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(12, 48))) for i in range(40)}
    redactor = Redactor(secrets)
    words = ["alpha", "beta", "gamma", '{"k": 1}', "x9", "base64/AB+c=="]
    chunks = [rng.choice(words) for _ in range(180_000)]
    for i in range(0, len(chunks), 10_000):
        chunks[i] = secrets[f"s{i % 40}"]
    text = " ".join(chunks)[:1_000_000]
    expected = text.count(secrets["s0"])
    start = time.perf_counter()
    redacted = redactor.redact_text(text)
    elapsed = time.perf_counter() - start
    assert redacted.count("[secret:") >= 10
    assert all(value not in redacted for value in secrets.values())
    assert redacted.count("[secret:s0]") == expected
    assert elapsed < 5.0, elapsed
