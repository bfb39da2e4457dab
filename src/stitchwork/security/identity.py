"""Workload identity: a built-in certificate authority and short-lived run tokens (SPIFFE-style).

Every agent has a SPIFFE id ``spiffe://<trust_domain>/agent/<name>``. The platform keeps one Ed25519 root key
for the trust domain (:class:`CertificateAuthority`, stored under ``<state_dir>/ca/``) and uses it for two
things:

* **Run tokens** (:class:`TokenService`): JWT-SVID-shaped tokens (``alg=EdDSA``, ``kid`` = the CA key id) that
  an agent presents on every tool call. They live minutes, name one run, and can be revoked one by one or a
  whole run at a time. Revocations are persisted in the store table ``revoked_tokens``.
* **X.509-SVIDs** (:meth:`CertificateAuthority.issue_agent_svid`): leaf certificates whose only URI SAN is the
  agent's SPIFFE id, signed by the self-signed root certificate.

Verification sits on the hot path of every tool call, so :meth:`TokenService.verify` keeps a bounded LRU
cache of fully verified claims keyed by the SHA-256 of the token; a cache hit skips the signature check but
never the expiry, audience and revocation checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stitchwork.data._base import Store
from stitchwork.errors import (
    ConfigError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    TokenRevoked,
    TokenWrongAudience,
    UnknownAgent,
)

__all__ = [
    "CertificateAuthority",
    "TokenClaims",
    "TokenService",
    "agent_spiffe_id",
]

_AGENT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
_ALGORITHM = "EdDSA"
_MAX_TOKEN_CHARS = 8192
"""Longer strings are refused before any hashing or decoding (our tokens are ~400 characters)."""
_ROOT_VALIDITY_S = 10 * 365 * 86400
_BACKDATE_S = 60
"""Certificates start this long before "now" so a peer whose clock is slightly behind accepts them."""

_REVOKED_TABLE = """
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti VARCHAR,
    run_id VARCHAR,
    reason VARCHAR,
    revoked_at DOUBLE,
    expires_at DOUBLE
)
"""


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


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _iso(ts: float) -> str:
    return _utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes, *, mode: int, exclusive: bool) -> None:
    """Writes ``data`` to a temporary file next to ``path`` and moves it into place in one step.

    With ``exclusive`` the final step is a hard link, which fails with :class:`FileExistsError` if another
    process created ``path`` first; otherwise it is :func:`os.replace`. Readers never see a partial file.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: fall back to an atomic rename
                if path.exists():
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


class CertificateAuthority:
    """Ed25519 root key + self-signed X.509 root cert for the trust domain, kept under ``state_dir/ca/``.

    Files: ``ca/root.key`` (PKCS#8 PEM, mode 0600) and ``ca/root.crt`` (PEM); the ``ca`` directory is created
    with mode 0700. Use :meth:`load_or_create` rather than the constructor.

    Attributes:
        trust_domain: the SPIFFE trust domain this CA signs for.
        key_id: a stable id of the root key (first 16 hex digits of the SHA-256 of the raw public key); used
            as the ``kid`` header of run tokens.
        public_key: the root public key.
        root_cert: the self-signed root certificate.
        root_cert_pem: the root certificate as PEM.
    """

    KEY_FILE = "root.key"
    CERT_FILE = "root.crt"

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        root_cert: x509.Certificate,
        *,
        trust_domain: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Wraps an existing key and root certificate (they must belong together).

        Args:
            private_key: the root private key.
            root_cert: the self-signed root certificate for ``private_key``.
            trust_domain: the SPIFFE trust domain.
            clock: the time source used for certificate validity (seconds since the epoch).

        Raises:
            ConfigError: the trust domain is invalid or the certificate is not for this key.
        """
        _check_trust_domain(trust_domain)
        self._private_key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        if _raw_public(root_cert.public_key()) != _raw_public(self.public_key):
            raise ConfigError("the root certificate does not belong to the root key")
        self.trust_domain = trust_domain
        self.root_cert = root_cert
        self.root_cert_pem: bytes = root_cert.public_bytes(serialization.Encoding.PEM)
        self.key_id: str = hashlib.sha256(_raw_public(self.public_key)).hexdigest()[:16]
        self._clock = clock

    @classmethod
    def load_or_create(
        cls, state_dir: Path, *, trust_domain: str, clock: Callable[[], float] = time.time
    ) -> CertificateAuthority:
        """Loads the CA from ``state_dir/ca/``, creating the key and root certificate on first use.

        A missing or expired ``root.crt`` is re-created from the existing key (the key id stays the same).
        Files are written atomically (temporary file + rename), so a crash never leaves half a key; if two
        processes create the CA at the same time, both end up with the key written first.

        Args:
            state_dir: the platform state directory.
            trust_domain: the SPIFFE trust domain.
            clock: the time source for certificate validity (seconds since the epoch).

        Returns:
            The certificate authority.

        Raises:
            ConfigError: the key file is readable by group or others, cannot be read, is corrupt or not
                Ed25519; the certificate file is corrupt, does not match the key, or was made for another
                trust domain.
        """
        _check_trust_domain(trust_domain)
        ca_dir = Path(state_dir) / "ca"
        key_path = ca_dir / cls.KEY_FILE
        cert_path = ca_dir / cls.CERT_FILE
        try:
            if not ca_dir.exists():
                ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(ca_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the CA directory {ca_dir}: {exc.strerror or exc}") from exc

        key = cls._read_key(key_path)
        if key is None:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:
                _write_atomic(key_path, pem, mode=0o600, exclusive=True)
            except FileExistsError:
                key = cls._read_key(key_path)  # another process won the race: use its key
                if key is None:  # pragma: no cover - the file vanished again between link and read
                    raise ConfigError(f"the CA key file {key_path} vanished while being created") from None
            except OSError as exc:
                raise ConfigError(f"cannot write the CA key file {key_path}: {exc.strerror or exc}") from exc

        now = clock()
        cert = cls._read_cert(cert_path, key, trust_domain)
        if cert is None or cert.not_valid_after_utc.timestamp() <= now:
            cert = _make_root_cert(key, trust_domain, now)
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            try:
                _write_atomic(cert_path, cert_pem, mode=0o644, exclusive=False)
            except OSError as exc:
                raise ConfigError(
                    f"cannot write the CA certificate {cert_path}: {exc.strerror or exc}"
                ) from exc
        return cls(key, cert, trust_domain=trust_domain, clock=clock)

    @staticmethod
    def _read_key(path: Path) -> Ed25519PrivateKey | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the CA key file {path}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the CA key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"the CA key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 600 {path}` so only its owner can read it"
            )
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA key file {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"the CA key file {path} is corrupt or encrypted "
                "(expected an unencrypted PKCS#8 PEM Ed25519 key); "
                "restore it from a backup, or move the ca directory away to create a new CA "
                "(all issued tokens and certificates then stop working)"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the CA key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return key

    @staticmethod
    def _read_cert(path: Path, key: Ed25519PrivateKey, trust_domain: str) -> x509.Certificate | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the CA certificate {path}: {exc.strerror or exc}") from exc
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise ConfigError(
                f"the CA certificate {path} is corrupt; delete it to have it re-created from the CA key"
            ) from exc
        if _raw_public(cert.public_key()) != _raw_public(key.public_key()):
            raise ConfigError(
                f"the CA certificate {path} does not belong to the key in {path.with_name('root.key')}; "
                "delete the certificate to have it re-created from the key"
            )
        uris = _uri_sans(cert)
        expected = f"spiffe://{trust_domain}"
        if uris != [expected]:
            found = ", ".join(uris) or "no SPIFFE id"
            raise ConfigError(
                f"the CA in {path.parent} was created for {found}, but the configured trust domain is "
                f"{trust_domain!r}; use the old trust domain or move the ca directory away to create a new CA"
            )
        return cert

    def sign(self, data: bytes) -> bytes:
        """Signs ``data`` with the root key (a 64-byte Ed25519 signature)."""
        return self._private_key.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is the root key's signature of ``data``; never raises."""
        try:
            self.public_key.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def issue_agent_svid(self, name: str, *, ttl_s: int = 86400) -> tuple[bytes, bytes]:
        """Issues an X.509-SVID for agent ``name``: a leaf certificate whose only URI SAN is its SPIFFE id.

        Args:
            name: the agent name.
            ttl_s: lifetime in seconds (capped at the root certificate's expiry).

        Returns:
            ``(certificate PEM, private key PEM)``; the key is a fresh Ed25519 key in unencrypted PKCS#8.

        Raises:
            UnknownAgent: the agent name is not valid.
            ValueError: ``ttl_s`` is not positive.
        """
        spiffe_id = agent_spiffe_id(self.trust_domain, name)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        now = self._clock()
        leaf_key = Ed25519PrivateKey.generate()
        not_after = min(_utc(now + ttl_s), self.root_cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stitchwork"),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]))
            .issuer_name(self.root_cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - _BACKDATE_S))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.public_key), critical=False
            )
            .sign(self._private_key, algorithm=None)
        )
        key_pem = leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def verify_agent_svid(self, cert_pem: bytes) -> str:
        """Checks an X.509-SVID against the root and returns the agent's SPIFFE id.

        Args:
            cert_pem: the leaf certificate (PEM).

        Returns:
            The SPIFFE id from the certificate's URI SAN.

        Raises:
            TokenInvalid: the certificate does not parse, was not signed by this CA, is not yet valid or has
                expired, is a CA certificate, or does not carry exactly one agent SPIFFE id of this trust
                domain.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as exc:
            raise TokenInvalid("the agent certificate is not a PEM-encoded X.509 certificate") from exc
        try:
            cert.verify_directly_issued_by(self.root_cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise TokenInvalid(
                f"the agent certificate was not issued by the certificate authority of {self.trust_domain}"
            ) from exc
        now = self._clock()
        if now < cert.not_valid_before_utc.timestamp():
            raise TokenInvalid(
                f"the agent certificate is not valid before {_iso(cert.not_valid_before_utc.timestamp())}"
            )
        expires = cert.not_valid_after_utc.timestamp()
        if now > expires:
            raise TokenInvalid(f"the agent certificate expired at {_iso(expires)}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or constraints.ca:
            raise TokenInvalid("the agent certificate is not a leaf certificate (it lacks CA:FALSE)")
        uris = _uri_sans(cert)
        if len(uris) != 1:
            raise TokenInvalid(f"the agent certificate must carry exactly one URI SAN, it has {len(uris)}")
        prefix = f"spiffe://{self.trust_domain}/agent/"
        spiffe_id = uris[0]
        name = spiffe_id[len(prefix):] if spiffe_id.startswith(prefix) else ""
        if not _AGENT_NAME.fullmatch(name):
            raise TokenInvalid(
                f"the agent certificate's SPIFFE id {spiffe_id!r} is not an agent of {self.trust_domain}"
            )
        return spiffe_id


def _raw_public(key: object) -> bytes:
    if not isinstance(key, Ed25519PublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _make_root_cert(key: Ed25519PrivateKey, trust_domain: str, now: float) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stitchwork"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Stitchwork root CA for {trust_domain}"),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - _BACKDATE_S))
        .not_valid_after(_utc(now + _ROOT_VALIDITY_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, algorithm=None)
    )


@dataclass(frozen=True)
class TokenClaims:
    """The verified contents of a run token.

    Attributes:
        sub: the SPIFFE id of the agent.
        agent: the agent name.
        aud: the audiences the token is valid for.
        exp: expiry, seconds since the epoch (the token is refused from this instant on).
        iat: issue time, seconds since the epoch.
        jti: the unique token id (revocation handle).
        run_id: the run the token was issued for.
    """

    sub: str
    agent: str
    aud: tuple[str, ...]
    exp: float
    iat: float
    jti: str
    run_id: str


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise TokenInvalid(f"the run token's {name!r} claim is missing or not a non-empty string")
    return value


class TokenService:
    """Issues and verifies JWT-SVID-shaped run tokens (EdDSA via PyJWT), with revocations kept in the store.

    Revocations live in the table ``revoked_tokens`` and in memory (loaded when the service starts, updated by
    :meth:`revoke` and :meth:`revoke_run`); a token is refused as soon as it is revoked in this process.
    Thread safe.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        store: Store,
        *,
        trust_domain: str,
        audience: str,
        ttl_s: int = 300,
        clock: Callable[[], float] = time.time,
        leeway_s: float = 0.0,
        max_ttl_s: int = 86400,
        cache_size: int = 4096,
    ) -> None:
        """Creates the service and loads earlier revocations from ``store``.

        Args:
            ca: the certificate authority whose root key signs tokens.
            store: where revocations are persisted.
            trust_domain: the SPIFFE trust domain (must be the CA's).
            audience: the default audience of issued tokens and the one :meth:`verify` expects.
            ttl_s: default token lifetime in seconds.
            clock: time source (seconds since the epoch); tests inject a fake one.
            leeway_s: tolerance for clock differences when checking expiry and issue time.
            max_ttl_s: the longest lifetime a token may have; longer tokens are refused. This bounds how long
                a revocation must be kept (see :meth:`prune`).
            cache_size: number of verified tokens remembered (LRU); 0 disables the cache.

        Raises:
            ConfigError: the trust domain differs from the CA's or a number is out of range.
            StoreError: the revocation table cannot be created or read.
        """
        _check_trust_domain(trust_domain)
        if trust_domain != ca.trust_domain:
            raise ConfigError(
                f"the token service is configured for trust domain {trust_domain!r}, "
                f"but the certificate authority is for {ca.trust_domain!r}"
            )
        if not audience:
            raise ConfigError("the token audience must not be empty")
        if ttl_s <= 0 or max_ttl_s <= 0 or ttl_s > max_ttl_s:
            raise ConfigError(f"token lifetime must be between 1 and {max_ttl_s} seconds, got {ttl_s}")
        if leeway_s < 0 or cache_size < 0:
            raise ConfigError("leeway_s and cache_size must not be negative")
        self.ca = ca
        self.store = store
        self.trust_domain = trust_domain
        self.audience = audience
        self.ttl_s = ttl_s
        self.max_ttl_s = max_ttl_s
        self.leeway_s = float(leeway_s)
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._lock = threading.RLock()
        self._jws = jwt.PyJWS(algorithms=[_ALGORITHM])
        self._revoked_jtis: dict[str, float] = {}
        self._revoked_runs: dict[str, float] = {}
        store.execute(_REVOKED_TABLE)
        for row in store.query("SELECT jti, run_id, expires_at FROM revoked_tokens"):
            expires = float(row["expires_at"]) if row["expires_at"] is not None else float("inf")
            jti, run_id = row["jti"], row["run_id"]
            if jti:
                self._revoked_jtis[jti] = max(expires, self._revoked_jtis.get(jti, expires))
            elif run_id:
                self._revoked_runs[run_id] = max(expires, self._revoked_runs.get(run_id, expires))

    # -- issuing ---------------------------------------------------------------------------------------------

    def issue(self, agent: str, run_id: str, *, audience: str | None = None, ttl_s: int | None = None) -> str:
        """Issues a run token for ``agent`` in run ``run_id``.

        Args:
            agent: the agent name.
            run_id: the run the token is for.
            audience: the audience; defaults to the service's audience.
            ttl_s: lifetime in seconds; defaults to the service's ``ttl_s``.

        Returns:
            The compact JWS (``header.payload.signature``).

        Raises:
            UnknownAgent: the agent name is not valid.
            TokenRevoked: the run was revoked; no new tokens are issued for it.
            ValueError: ``run_id`` is empty or ``ttl_s`` is out of range.
        """
        sub = agent_spiffe_id(self.trust_domain, agent)
        if not isinstance(run_id, str) or not run_id:
            raise ValueError("a run token needs a non-empty run id")
        lifetime = self.ttl_s if ttl_s is None else ttl_s
        if not 0 < lifetime <= self.max_ttl_s:
            raise ValueError(f"ttl_s must be between 1 and {self.max_ttl_s} seconds, got {lifetime}")
        if run_id in self._revoked_runs:
            raise TokenRevoked(f"run {run_id!r} was revoked; no new tokens are issued for it")
        return self._encode(sub, agent, (audience or self.audience,), run_id, lifetime)

    def _encode(self, sub: str, agent: str, aud: tuple[str, ...], run_id: str, lifetime: int) -> str:
        iat = int(self._clock())
        payload: dict[str, Any] = {
            "sub": sub,
            "aud": list(aud),
            "exp": iat + lifetime,
            "iat": iat,
            "jti": uuid.uuid4().hex,
            "run": run_id,
            "agent": agent,
        }
        return jwt.encode(
            payload, self.ca._private_key, algorithm=_ALGORITHM, headers={"kid": self.ca.key_id, "typ": "JWT"}
        )

    def renew(self, token: str) -> str:
        """Swaps a valid token for a fresh one with a new ``jti`` and ``exp``.

        The new token has the same agent, run, audience and lifetime. The old token is revoked, so each token
        can be renewed only once.

        Args:
            token: a token that is neither expired nor revoked (its audience is kept, not checked).

        Returns:
            The new token.

        Raises:
            AuthError: the precise reason the old token is refused (see :meth:`verify`).
            StoreError: the old token's revocation could not be persisted (it is still refused in this
                process, and the new token is not returned).
        """
        with self._lock:
            claims = self._verify(token, audience=None)
            lifetime = max(1, min(self.max_ttl_s, round(claims.exp - claims.iat)))
            new = self._encode(claims.sub, claims.agent, claims.aud, claims.run_id, lifetime)
            self._revoke_jti(claims.jti, run_id=claims.run_id, expires_at=claims.exp, reason="renewed")
            return new

    # -- verifying -------------------------------------------------------------------------------------------

    def verify(self, token: str | None, *, audience: str | None = None) -> TokenClaims:
        """Verifies a run token and returns its claims.

        The first verification of a token checks its signature and structure; the result is cached, and later
        calls with the same token only re-check expiry, audience and revocation.

        Args:
            token: the token as presented (``None`` or empty when the caller sent none).
            audience: the audience the token must carry; defaults to the service's audience.

        Returns:
            The verified claims.

        Raises:
            TokenMissing: no token.
            TokenInvalid: malformed, tampered, signed by another key or algorithm, or claims that do not fit
                together (``sub`` is not the agent's SPIFFE id in this trust domain).
            TokenExpired: the token expired (the message says when).
            TokenWrongAudience: the token is for another audience.
            TokenRevoked: the token or its run was revoked.
        """
        return self._verify(token, audience=audience or self.audience)

    def _verify(self, token: str | None, *, audience: str | None) -> TokenClaims:
        if token is None or (isinstance(token, str) and not token.strip()):
            raise TokenMissing("no run token was presented")
        if not isinstance(token, str):
            raise TokenInvalid("the run token must be a string")
        if len(token) > _MAX_TOKEN_CHARS:
            raise TokenInvalid(f"the run token is longer than {_MAX_TOKEN_CHARS} characters")
        key = hashlib.sha256(token.encode()).digest()
        claims = self._cache_get(key)
        if claims is None:
            claims = self._decode(token)
            now = self._clock()
            if claims.iat > now + self.leeway_s:
                raise TokenInvalid(f"the run token claims to be issued in the future ({_iso(claims.iat)})")
            self._check(claims, audience, now)
            self._cache_put(key, claims)
            return claims
        try:
            self._check(claims, audience, self._clock())
        except (TokenExpired, TokenRevoked):
            with self._cache_lock:
                self._cache.pop(key, None)
            raise
        return claims

    def _check(self, claims: TokenClaims, audience: str | None, now: float) -> None:
        if now >= claims.exp + self.leeway_s:
            raise TokenExpired(
                f"the run token expired at {_iso(claims.exp)} ({now - claims.exp:.0f}s ago); "
                "ask for a new one"
            )
        if audience is not None and audience not in claims.aud:
            got = ", ".join(repr(a) for a in claims.aud)
            raise TokenWrongAudience(
                f"the run token is for audience {got}, but this service expects {audience!r}"
            )
        if claims.jti in self._revoked_jtis:
            raise TokenRevoked(f"the run token {claims.jti} was revoked")
        if claims.run_id in self._revoked_runs:
            raise TokenRevoked(f"run {claims.run_id!r} was revoked; its tokens are no longer accepted")

    def _decode(self, token: str) -> TokenClaims:
        """Full verification: structure, header, EdDSA signature with the CA key, and claim types."""
        if token.count(".") != 2:
            raise TokenInvalid("the run token is malformed (expected three dot-separated parts)")
        try:
            decoded = self._jws.decode_complete(token, self.ca.public_key, algorithms=[_ALGORITHM])
        except jwt.InvalidSignatureError as exc:
            if self._unverified_header(token).get("kid") != self.ca.key_id:
                raise TokenInvalid(
                    f"the run token was not signed by the certificate authority of {self.trust_domain}"
                ) from exc
            raise TokenInvalid("the run token's signature is not valid (the token was altered)") from exc
        except jwt.InvalidAlgorithmError as exc:
            alg = str(self._unverified_header(token).get("alg"))[:20]
            raise TokenInvalid(f"the run token uses algorithm {alg!r}; only EdDSA is accepted") from exc
        except jwt.PyJWTError as exc:
            raise TokenInvalid("the run token is malformed") from exc
        header = decoded["header"]
        if header.get("kid") != self.ca.key_id:
            raise TokenInvalid(
                f"the run token was not signed by the certificate authority of {self.trust_domain}"
            )
        if header.get("typ", "JWT") != "JWT" or "crit" in header or "b64" in header:
            raise TokenInvalid("the run token has an unsupported header")
        try:
            payload = json.loads(decoded["payload"])
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenInvalid("the run token's payload is not JSON") from exc
        if not isinstance(payload, Mapping):
            raise TokenInvalid("the run token's payload is not a JSON object")
        return self._claims(payload)

    @staticmethod
    def _unverified_header(token: str) -> dict[str, Any]:
        try:
            return jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return {}

    def _claims(self, payload: Mapping[str, Any]) -> TokenClaims:
        sub, agent, jti, run = (_str_claim(payload, k) for k in ("sub", "agent", "jti", "run"))
        raw_aud = payload.get("aud")
        aud_list = [raw_aud] if isinstance(raw_aud, str) else raw_aud
        if not (isinstance(aud_list, list) and aud_list and all(isinstance(a, str) and a for a in aud_list)):
            raise TokenInvalid("the run token's 'aud' claim is missing or not a list of strings")
        exp, iat = _number(payload.get("exp")), _number(payload.get("iat"))
        if exp is None or iat is None:
            raise TokenInvalid("the run token's 'exp' or 'iat' claim is missing or not a number")
        if not 0 < exp - iat <= self.max_ttl_s:
            raise TokenInvalid(f"the run token's lifetime is not between 1 and {self.max_ttl_s} seconds")
        try:
            expected_sub = agent_spiffe_id(self.trust_domain, agent)
        except UnknownAgent as exc:
            raise TokenInvalid("the run token's 'agent' claim is not a valid agent name") from exc
        if sub != expected_sub:
            raise TokenInvalid(
                f"the run token's subject {sub[:120]!r} is not agent {agent!r} "
                f"of trust domain {self.trust_domain}"
            )
        return TokenClaims(sub=sub, agent=agent, aud=tuple(aud_list), exp=exp, iat=iat, jti=jti, run_id=run)

    def _cache_get(self, key: bytes) -> TokenClaims | None:
        if not self._cache_size:
            return None
        with self._cache_lock:
            claims = self._cache.get(key)
            if claims is not None:
                self._cache.move_to_end(key)
            return claims

    def _cache_put(self, key: bytes, claims: TokenClaims) -> None:
        if not self._cache_size:
            return
        with self._cache_lock:
            self._cache[key] = claims
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    # -- revoking --------------------------------------------------------------------------------------------

    def revoke(self, token_or_jti: str, *, reason: str = "") -> None:
        """Revokes one token, given either the token itself or its ``jti``. Idempotent.

        A token must carry a valid signature from this CA (it may be expired or for another audience). A bare
        ``jti`` is kept until no token with it can still be valid (now + ``max_ttl_s``).

        Args:
            token_or_jti: the token, or its ``jti``.
            reason: why (stored with the revocation).

        Raises:
            TokenMissing: empty argument.
            TokenInvalid: a token that does not verify against this CA.
            StoreError: the revocation could not be persisted (it is still in force in this process).
        """
        if not token_or_jti or not token_or_jti.strip():
            raise TokenMissing("revoke needs a run token or a token id (jti)")
        if "." in token_or_jti:
            if len(token_or_jti) > _MAX_TOKEN_CHARS:
                raise TokenInvalid(f"the run token is longer than {_MAX_TOKEN_CHARS} characters")
            claims = self._decode(token_or_jti)
            self._revoke_jti(claims.jti, run_id=claims.run_id, expires_at=claims.exp, reason=reason)
        else:
            jti = token_or_jti.strip()
            self._revoke_jti(jti, run_id=None, expires_at=self._clock() + self.max_ttl_s, reason=reason)

    def revoke_run(self, run_id: str, *, reason: str = "") -> None:
        """Refuses every token of run ``run_id`` from now on, and issues no new ones for it. Idempotent.

        Args:
            run_id: the run.
            reason: why (stored with the revocation).

        Raises:
            ValueError: empty run id.
            StoreError: the revocation could not be persisted (it is still in force in this process).
        """
        if not run_id:
            raise ValueError("revoke_run needs a run id")
        with self._lock:
            if run_id in self._revoked_runs:
                return
            now = self._clock()
            # Every token of this run was issued before now (issuing stops here) and lives at most max_ttl_s.
            expires_at = now + self.max_ttl_s
            self._revoked_runs[run_id] = expires_at
            self.store.append("revoked_tokens", [
                {"jti": None, "run_id": run_id, "reason": reason, "revoked_at": now, "expires_at": expires_at}
            ])

    def _revoke_jti(self, jti: str, *, run_id: str | None, expires_at: float, reason: str) -> None:
        with self._lock:
            if jti in self._revoked_jtis:
                return
            self._revoked_jtis[jti] = expires_at  # in force before it is persisted: fail closed
            row = {"jti": jti, "run_id": run_id, "reason": reason, "revoked_at": self._clock(),
                   "expires_at": expires_at}
            self.store.append("revoked_tokens", [row])

    def is_revoked(self, jti: str | None = None, *, run_id: str | None = None) -> bool:
        """Whether token ``jti`` or run ``run_id`` is revoked (as known to this process)."""
        return (jti is not None and jti in self._revoked_jtis) or (
            run_id is not None and run_id in self._revoked_runs
        )

    def prune(self) -> int:
        """Deletes revocations of tokens that have expired anyway (also from memory).

        A revocation is dropped once ``expires_at + leeway_s`` is in the past: no token it covers can pass the
        expiry check any more.

        Returns:
            The number of revocations removed from memory.

        Raises:
            StoreError: the store could not be updated.
        """
        with self._lock:
            cutoff = self._clock() - self.leeway_s
            self.store.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", [cutoff])
            removed = 0
            for table in (self._revoked_jtis, self._revoked_runs):
                stale = [k for k, expires in table.items() if expires < cutoff]
                for k in stale:
                    del table[k]
                removed += len(stale)
            return removed
