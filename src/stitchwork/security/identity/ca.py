"""The built-in certificate authority: one Ed25519 root key and self-signed root certificate per trust domain.

It signs run tokens (:mod:`stitchwork.security.identity.tokens`) and issues X.509-SVIDs: leaf certificates whose
only URI SAN is an agent's SPIFFE id.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stitchwork._files import fsync_dir
from stitchwork.errors import ConfigError, TokenInvalid
from stitchwork.security.identity.spiffe import _AGENT_NAME, _check_trust_domain, agent_spiffe_id

__all__ = ["CertificateAuthority"]

_ROOT_VALIDITY_S = 10 * 365 * 86400
_BACKDATE_S = 60
"""Certificates start this long before "now" so a peer whose clock is slightly behind accepts them."""


def _utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _iso(ts: float) -> str:
    return _utc(ts).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    fsync_dir(path.parent, best_effort=True)


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

