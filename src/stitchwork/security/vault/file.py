"""``vault+file:///path/vault.enc``: the embedded vault, an AES-256-GCM encrypted file (the default adapter).

File format of :class:`FileVault` (all integers unsigned bytes)::

    header   magic      8   b"SWVAULT1"
             kdf        1   0 = raw 32-byte key, 1 = scrypt(passphrase)
             [kdf == 1] log2_n 1, r 1, p 1, salt 16
             key check  16  HMAC-SHA256(key, b"stitchwork-vault-key-check")[:16]
             crc32      4   big-endian CRC-32 of the header bytes before it
    nonce             12   fresh random nonce on every write
    ciphertext        >=16 AES-256-GCM of the JSON document {name: value}; associated data = the whole header

The key check tells a wrong key (check mismatch → :class:`VaultKeyError`) from a damaged file (header CRC or
GCM tag failure with a matching check → :class:`VaultCorrupt`). Neither error ever modifies the file.

Key, first match wins:

1. the ``key=`` argument (exactly 32 bytes);
2. ``STITCHWORK_VAULT_KEY``: 64 hex digits or base64 (standard or URL-safe, padding optional) of 32 bytes
   is used as the raw key; any other non-empty string is a passphrase, stretched with scrypt using the salt
   in the file header (surrounding whitespace is ignored in both cases);
3. a key file holding exactly 32 random bytes, default ``<vault dir>/vault.key``. It is created (mode 0600,
   directory 0700) on the first write to a vault that does not exist yet; a key file readable or writable by
   group or other is refused.

Writes go to a temporary file in the same directory (mode 0600), are fsynced and renamed over the vault, so a
crash leaves either the old or the new vault. The previous vault is kept as ``<path>.bak`` (a hard link, or a
copy where links are not supported); note that a deleted or replaced value therefore stays on disk, encrypted,
in ``.bak`` until the next write. Read-modify-write transactions also take an ``flock`` on
``<path>.lock`` so that several processes (the server and the CLI) do not lose each other's updates.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from stitchwork._files import fsync_dir
from stitchwork.errors import ConfigError, SecretError, SecretNotFound, VaultCorrupt, VaultKeyError
from stitchwork.security.vault._base import Vault, validate_secret_name, validate_secret_value

__all__ = ["KEY_ENV", "MAGIC", "FileVault"]

log = logging.getLogger(__name__)

KEY_ENV = "STITCHWORK_VAULT_KEY"
"""Environment variable holding the vault key (base64 or hex of 32 bytes) or a passphrase."""

MAGIC = b"SWVAULT1"
KEY_CHECK_LABEL = b"stitchwork-vault-key-check"
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
CHECK_LEN = 16
SALT_LEN = 16
KDF_RAW = 0
KDF_SCRYPT = 1
SCRYPT_LOG2_N = 15
"""Default scrypt cost: n = 2**15, r = 8, p = 1 (32 MiB, roughly 0.1 s)."""
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAX_MEM = 256 * 1024 * 1024
"""Largest scrypt memory (128 * r * n) accepted from a file header, so a damaged header cannot exhaust RAM."""


@dataclass(frozen=True)
class _Header:
    """The authenticated, unencrypted part of a vault file."""

    kdf: int
    check: bytes
    log2_n: int = 0
    r: int = 0
    p: int = 0
    salt: bytes = b""

    def encode(self) -> bytes:
        body = MAGIC + bytes([self.kdf])
        if self.kdf == KDF_SCRYPT:
            body += bytes([self.log2_n, self.r, self.p]) + self.salt
        body += self.check
        return body + struct.pack(">I", zlib.crc32(body))

    @staticmethod
    def decode(blob: bytes) -> tuple[_Header, int]:
        """Parses the header at the start of ``blob``; returns it and its length.

        Raises:
            ValueError: with a reason when the header is not a valid version-1 vault header.
        """
        if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
            raise ValueError("not a Stitchwork vault file (bad magic header)")
        pos = len(MAGIC)
        if len(blob) < pos + 1:
            raise ValueError("truncated header")
        kdf = blob[pos]
        pos += 1
        log2_n = r = p = 0
        salt = b""
        if kdf == KDF_SCRYPT:
            if len(blob) < pos + 3 + SALT_LEN:
                raise ValueError("truncated header")
            log2_n, r, p = blob[pos], blob[pos + 1], blob[pos + 2]
            salt = blob[pos + 3 : pos + 3 + SALT_LEN]
            pos += 3 + SALT_LEN
        elif kdf != KDF_RAW:
            raise ValueError(f"unknown key derivation {kdf} in header")
        if len(blob) < pos + CHECK_LEN + 4:
            raise ValueError("truncated header")
        check = blob[pos : pos + CHECK_LEN]
        pos += CHECK_LEN
        (crc,) = struct.unpack(">I", blob[pos : pos + 4])
        if crc != zlib.crc32(blob[:pos]):
            raise ValueError("header checksum mismatch")
        pos += 4
        if kdf == KDF_SCRYPT and not (
            1 <= log2_n <= 24 and r >= 1 and 1 <= p <= 16 and 128 * r * (1 << log2_n) <= _SCRYPT_MAX_MEM
        ):
            raise ValueError("scrypt parameters in header out of range")
        return _Header(kdf=kdf, check=check, log2_n=log2_n, r=r, p=p, salt=salt), pos


@dataclass(frozen=True)
class _KeyMaterial:
    """Where the key came from and the key itself (never shown in ``repr``)."""

    source: str
    raw: bytes | None = field(default=None, repr=False)
    passphrase: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Loaded:
    """A decrypted vault as read from (or written to) disk, with the file identity it came from."""

    signature: tuple[int, int, int, int]
    header: _Header
    secrets: Mapping[str, str] = field(repr=False)
    key: bytes = field(repr=False)


def _key_check(key: bytes) -> bytes:
    return hmac.new(key, KEY_CHECK_LABEL, hashlib.sha256).digest()[:CHECK_LEN]


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _parse_key_text(text: str) -> _KeyMaterial:
    """Interprets ``STITCHWORK_VAULT_KEY``: raw 32 bytes in hex or base64, else a passphrase."""
    value = text.strip()
    if not value:
        raise VaultKeyError(f"{KEY_ENV} is set but empty; unset it to use the key file, or set a key")
    source = f"${KEY_ENV}"
    if len(value) == 2 * KEY_LEN and re.fullmatch(r"[0-9A-Fa-f]+", value):
        return _KeyMaterial(source=source, raw=bytes.fromhex(value))
    if len(value) in (43, 44) and re.fullmatch(r"[A-Za-z0-9+/_-]+=?", value):
        standard = value.replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) == KEY_LEN:
            return _KeyMaterial(source=source, raw=raw)
    return _KeyMaterial(source=source, passphrase=value.encode("utf-8"))


def _derive(passphrase: bytes, header: _Header) -> bytes:
    kdf = Scrypt(salt=header.salt, length=KEY_LEN, n=1 << header.log2_n, r=header.r, p=header.p)
    return kdf.derive(passphrase)


def _path_from_uri(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme != "vault+file":
        raise ConfigError(f"FileVault needs a vault+file:// URI, got {uri!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"vault URI {uri!r}: query and fragment are not supported")
    path = parts.netloc + parts.path
    if not path:
        raise ConfigError(f"vault URI {uri!r} has no path; expected vault+file:///path/vault.enc")
    return Path(path).expanduser()


class FileVault(Vault):
    """An AES-256-GCM encrypted JSON file; see the module docstring for the format and key sources.

    The decrypted document is cached in memory and re-read when the file's identity (inode, size, mtime)
    changes, so writes by other processes are seen.

    Args:
        uri: ``vault+file:///path/vault.enc``.
        key: The raw 32-byte key; overrides the environment and the key file.
        key_file: Key file to use when neither ``key`` nor ``STITCHWORK_VAULT_KEY`` is given;
            default ``<vault dir>/vault.key``.
        environ: Environment to read ``STITCHWORK_VAULT_KEY`` from; default ``os.environ``.

    Raises:
        ConfigError: the URI is not a ``vault+file://`` URI.
        VaultKeyError: ``key`` is not 32 bytes, or ``STITCHWORK_VAULT_KEY`` is set but empty.
    """

    def __init__(
        self,
        uri: str,
        *,
        key: bytes | None = None,
        key_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.uri = uri
        self.path = _path_from_uri(uri)
        default_key_file = self.path.parent / "vault.key"
        self.key_file = Path(key_file).expanduser() if key_file is not None else default_key_file
        self.backup_path = self.path.with_name(self.path.name + ".bak")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        env = os.environ if environ is None else environ
        self._material: _KeyMaterial | None
        if key is not None:
            if not isinstance(key, bytes) or len(key) != KEY_LEN:
                raise VaultKeyError(f"the vault key= argument must be exactly {KEY_LEN} bytes")
            self._material = _KeyMaterial(source="the key= argument", raw=bytes(key))
        elif (text := env.get(KEY_ENV)) is not None:
            self._material = _parse_key_text(text)
        else:
            self._material = None  # the key file, loaded on first use
        self._derived: tuple[_Header, bytes] | None = None
        self._cache: _Loaded | None = None
        self._closed = False
        self._lock = threading.RLock()

    # -- port ---------------------------------------------------------------------------------------------

    def get(self, name: str) -> str:
        validate_secret_name(name)
        with self._lock:
            loaded = self._load()
            if loaded is None or name not in loaded.secrets:
                raise SecretNotFound(f"secret {name!r} not found in vault {self.path}")
            return loaded.secrets[name]

    def set(self, name: str, value: str) -> None:
        validate_secret_name(name)
        validate_secret_value(name, value)
        with self._lock, self._transaction():
            loaded = self._load()
            secrets = dict(loaded.secrets) if loaded is not None else {}
            secrets[name] = value
            self._store(secrets, loaded)

    def delete(self, name: str) -> None:
        validate_secret_name(name)
        with self._lock:
            loaded = self._load()  # fail before creating the lock file when there is nothing to delete
            if loaded is None or name not in loaded.secrets:
                raise SecretNotFound(f"secret {name!r} not found in vault {self.path}")
        with self._lock, self._transaction():
            loaded = self._load()
            if loaded is None or name not in loaded.secrets:
                raise SecretNotFound(f"secret {name!r} not found in vault {self.path}")
            secrets = dict(loaded.secrets)
            del secrets[name]
            self._store(secrets, loaded)

    def names(self) -> list[str]:
        with self._lock:
            loaded = self._load()
            return sorted(loaded.secrets) if loaded is not None else []

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cache = None
            self._derived = None
            self._material = None

    # -- reading ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SecretError(f"vault {self.path} is closed")

    def _load(self) -> _Loaded | None:
        """Returns the decrypted vault, or ``None`` when the file does not exist. Caller holds the lock."""
        self._check_open()
        try:
            current = _signature(os.stat(self.path))
        except FileNotFoundError:
            self._cache = None
            return None
        except OSError as exc:
            raise SecretError(f"cannot read vault {self.path}: {exc.strerror}") from exc
        if self._cache is not None and self._cache.signature == current:
            return self._cache
        try:
            with open(self.path, "rb") as handle:
                signature = _signature(os.fstat(handle.fileno()))
                blob = handle.read()
        except FileNotFoundError:
            self._cache = None
            return None
        except OSError as exc:
            raise SecretError(f"cannot read vault {self.path}: {exc.strerror}") from exc
        self._cache = self._decrypt(blob, signature)
        return self._cache

    def _corrupt(self, reason: str) -> VaultCorrupt:
        if self.backup_path.exists():
            backup = (
                f"; the previous version is kept at {self.backup_path} "
                f"(check it, then copy it over {self.path} to restore)"
            )
        else:
            backup = f"; no backup ({self.backup_path}) exists"
        return VaultCorrupt(f"vault {self.path} is corrupt: {reason}; the file was left untouched{backup}")

    def _wrong_key(self, detail: str = "") -> VaultKeyError:
        source = self._material.source if self._material is not None else f"key file {self.key_file}"
        extra = f"; {detail}" if detail else ""
        return VaultKeyError(
            f"cannot decrypt {self.path}: wrong vault key ({KEY_ENV} or {self.key_file}); "
            f"the key in use came from {source}{extra}"
        )

    def _decrypt(self, blob: bytes, signature: tuple[int, int, int, int]) -> _Loaded:
        try:
            header, start = _Header.decode(blob)
        except ValueError as exc:
            raise self._corrupt(str(exc)) from None
        body = blob[start:]
        if len(body) < NONCE_LEN + TAG_LEN:
            raise self._corrupt("truncated ciphertext")
        key = self._key_for(header)
        if not hmac.compare_digest(_key_check(key), header.check):
            raise self._wrong_key()
        try:
            plaintext = AESGCM(key).decrypt(body[:NONCE_LEN], body[NONCE_LEN:], blob[:start])
        except InvalidTag:
            raise self._corrupt("authentication failed (the key is right, the data is damaged)") from None
        # ``from None`` everywhere below: decode errors carry the plaintext, which holds the values.
        try:
            document = json.loads(plaintext.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self._corrupt("the decrypted document is not JSON") from None
        if not isinstance(document, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in document.items()
        ):
            raise self._corrupt("the decrypted document is not an object of strings") from None
        return _Loaded(signature=signature, header=header, secrets=document, key=key)

    def _key_for(self, header: _Header) -> bytes:
        """The key that should open a file with ``header``, from the configured source."""
        material = self._material
        if header.kdf == KDF_SCRYPT:
            if material is None:
                raise self._wrong_key(f"this vault is encrypted with a passphrase; set {KEY_ENV} to it")
            if material.passphrase is None:
                raise self._wrong_key(
                    "this vault is encrypted with a passphrase, but the key in use is a raw 32-byte key"
                )
            if self._derived is not None and self._derived[0] == header:
                return self._derived[1]
            key = _derive(material.passphrase, header)
            self._derived = (header, key)
            return key
        if material is None:
            material = self._material = self._read_key_file(create=False)
        if material.raw is None:
            raise self._wrong_key(
                f"this vault is encrypted with a raw 32-byte key (key file, or base64/hex in {KEY_ENV}), "
                "but the key in use is a passphrase"
            )
        return material.raw

    # -- key file -----------------------------------------------------------------------------------------

    def _read_key_file(self, *, create: bool) -> _KeyMaterial:
        path = self.key_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                return self._create_key_file()
            raise VaultKeyError(
                f"cannot decrypt {self.path}: key file {path} does not exist; restore it or set {KEY_ENV}"
            ) from None
        except OSError as exc:
            raise VaultKeyError(f"cannot read vault key file {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise VaultKeyError(f"vault key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise VaultKeyError(
                    f"vault key file {path} is accessible by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):03o}); run: chmod 600 {path}"
                )
            data = handle.read(KEY_LEN + 1)
        if len(data) != KEY_LEN:
            raise VaultKeyError(
                f"vault key file {path} has {st.st_size} bytes; it must hold exactly {KEY_LEN} random bytes"
            )
        return _KeyMaterial(source=f"key file {path}", raw=data)

    def _create_key_file(self) -> _KeyMaterial:
        path = self.key_file
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(os.urandom(KEY_LEN))
                    handle.flush()
                    os.fsync(handle.fileno())
                # A hard link publishes the complete file and fails if another process got there first.
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:
            raise VaultKeyError(f"cannot create vault key file {path}: {exc.strerror}") from exc
        fsync_dir(path.parent, best_effort=True)
        log.info("created vault key file %s", path)
        return self._read_key_file(create=False)

    # -- writing ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Serialises read-modify-write cycles across processes with an ``flock`` on ``<path>.lock``."""
        self._check_open()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SecretError(f"cannot lock vault {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _new_header_and_key(self) -> tuple[_Header, bytes]:
        material = self._material
        if material is None:
            material = self._material = self._read_key_file(create=True)
        if material.raw is not None:
            return _Header(kdf=KDF_RAW, check=_key_check(material.raw)), material.raw
        assert material.passphrase is not None
        draft = _Header(
            kdf=KDF_SCRYPT, check=b"", log2_n=SCRYPT_LOG2_N, r=SCRYPT_R, p=SCRYPT_P, salt=os.urandom(SALT_LEN)
        )
        key = _derive(material.passphrase, draft)
        header = _Header(
            kdf=KDF_SCRYPT, check=_key_check(key), log2_n=draft.log2_n, r=draft.r, p=draft.p, salt=draft.salt
        )
        self._derived = (header, key)
        return header, key

    def _store(self, secrets: dict[str, str], previous: _Loaded | None) -> None:
        """Encrypts ``secrets`` and atomically replaces the vault file. Caller holds both locks."""
        header, key = (previous.header, previous.key) if previous is not None else self._new_header_and_key()
        header_bytes = header.encode()
        nonce = os.urandom(NONCE_LEN)
        plaintext = json.dumps(secrets, sort_keys=True).encode("ascii")
        blob = header_bytes + nonce + AESGCM(key).encrypt(nonce, plaintext, header_bytes)
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise SecretError(f"cannot write vault {self.path}: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
                signature = _signature(os.fstat(handle.fileno()))
            if previous is not None:
                self._backup()
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise SecretError(f"cannot write vault {self.path}: {exc.strerror}") from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(directory, best_effort=True)
        self._cache = _Loaded(signature=signature, header=header, secrets=secrets, key=key)

    def _backup(self) -> None:
        """Makes ``<path>.bak`` the current vault file, atomically."""
        tmp = self.path.parent / f".{self.backup_path.name}.{os.getpid()}.{token_hex(8)}.tmp"
        try:
            try:
                os.link(self.path, tmp)
            except OSError:  # no hard links on this file system: copy instead
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as dst, open(self.path, "rb") as src:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(tmp, self.backup_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
