"""Tests for the built-in CA, X.509-SVIDs and run tokens (stitchwork.security.identity)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stitchwork.data._base import Store, open_store
from stitchwork.errors import (
    AuthError,
    ConfigError,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    TokenRevoked,
    TokenWrongAudience,
    UnknownAgent,
)
from stitchwork.security.identity.ca import CertificateAuthority
from stitchwork.security.identity.spiffe import agent_spiffe_id
from stitchwork.security.identity.tokens import TokenClaims, TokenService

TD = "stitchwork.local"
AUD = "stitchwork-gateway"
T0 = 1_700_000_000.0


class FakeClock:
    """A settable time source."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj: object) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def b64url_decode_json(segment: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    return value


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header_b64, payload_b64, _ = token.split(".")
    return b64url_decode_json(header_b64), b64url_decode_json(payload_b64)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD, clock=clock)


@pytest.fixture
def store() -> Iterator[Store]:
    with open_store("memory://") as s:
        yield s


@pytest.fixture
def svc(ca: CertificateAuthority, store: Store, clock: FakeClock) -> TokenService:
    return TokenService(ca, store, trust_domain=TD, audience=AUD, ttl_s=300, clock=clock)


def claims_payload(clock: FakeClock, **over: Any) -> dict[str, Any]:
    now = int(clock())
    payload: dict[str, Any] = {
        "sub": f"spiffe://{TD}/agent/alice",
        "aud": [AUD],
        "exp": now + 300,
        "iat": now,
        "jti": "0" * 32,
        "run": "run-1",
        "agent": "alice",
    }
    payload.update(over)
    return {k: v for k, v in payload.items() if v is not None}


def sign_with_ca(ca: CertificateAuthority, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, ca._private_key, algorithm="EdDSA", headers={"kid": ca.key_id, "typ": "JWT"})


def assert_refused(svc: TokenService, token: str, error: type[AuthError], **kw: Any) -> AuthError:
    with pytest.raises(error) as info:
        svc.verify(token, **kw)
    assert type(info.value) is error
    assert token not in str(info.value)  # messages never echo the token
    signature = token.split(".")[-1]
    if len(signature) >= 16:
        assert signature not in str(info.value)
    return info.value


# -- SPIFFE ids ----------------------------------------------------------------------------------------------


def test_agent_spiffe_id() -> None:
    assert agent_spiffe_id(TD, "alice") == "spiffe://stitchwork.local/agent/alice"
    assert agent_spiffe_id("example.org", "mail-bot_2.v1") == "spiffe://example.org/agent/mail-bot_2.v1"
    assert agent_spiffe_id(TD, "a" * 63).endswith("/agent/" + "a" * 63)


@pytest.mark.parametrize(
    "name", ["", "Alice", "-alice", ".alice", "_a", "a/b", "a b", "a" * 64, "alice\n", "../etc", "é", "a:b"]
)
def test_bad_agent_names_are_refused(name: str) -> None:
    with pytest.raises(UnknownAgent, match="agent name"):
        agent_spiffe_id(TD, name)


@pytest.mark.parametrize("td", ["", "Stitchwork.Local", "a/b", "spiffe://x", "x y", "-x"])
def test_bad_trust_domain_is_a_config_error(td: str) -> None:
    with pytest.raises(ConfigError, match="trust domain"):
        agent_spiffe_id(td, "alice")


# -- certificate authority -----------------------------------------------------------------------------------


def test_ca_files_and_permissions(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca_dir = tmp_path / "state" / "ca"
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / "root.key").stat().st_mode) == 0o600
    assert (ca_dir / "root.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (ca_dir / "root.crt").read_bytes() == ca.root_cert_pem
    assert sorted(p.name for p in ca_dir.iterdir()) == ["root.crt", "root.key"]  # no temp files left
    raw = ca.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert ca.key_id == hashlib.sha256(raw).hexdigest()[:16]
    root = x509.load_pem_x509_certificate(ca.root_cert_pem)
    root.verify_directly_issued_by(root)  # self-signed
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]


def test_ca_reload_gives_same_key(tmp_path: Path, ca: CertificateAuthority, clock: FakeClock) -> None:
    again = CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD, clock=clock)
    assert again.key_id == ca.key_id
    assert again.root_cert_pem == ca.root_cert_pem
    assert again.verify(b"data", ca.sign(b"data"))
    other = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD, clock=clock)
    assert other.key_id != ca.key_id


def test_missing_root_cert_is_recreated_from_the_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    (tmp_path / "state" / "ca" / "root.crt").unlink()
    again = CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)
    assert again.key_id == ca.key_id
    assert (tmp_path / "state" / "ca" / "root.crt").read_bytes() == again.root_cert_pem


def test_expired_root_cert_is_renewed_with_the_same_key(tmp_path: Path, ca: CertificateAuthority) -> None:
    later = FakeClock(T0 + 11 * 365 * 86400)
    again = CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD, clock=later)
    assert again.key_id == ca.key_id
    assert again.root_cert_pem != ca.root_cert_pem
    assert again.root_cert.not_valid_after_utc.timestamp() > later()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, ca: CertificateAuthority, mode: int) -> None:
    key = tmp_path / "state" / "ca" / "root.key"
    os.chmod(key, mode)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)
    assert str(key) in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_corrupt_key_file_names_the_file(tmp_path: Path, ca: CertificateAuthority, content: bytes) -> None:
    key = tmp_path / "state" / "ca" / "root.key"
    key.write_bytes(content)
    with pytest.raises(ConfigError, match="corrupt") as info:
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)
    assert str(key) in str(info.value)


def test_non_ed25519_key_file_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    key = tmp_path / "state" / "ca" / "root.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key.write_bytes(pem)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)


def test_corrupt_or_foreign_root_cert_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    cert = tmp_path / "state" / "ca" / "root.crt"
    cert.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match=r"root\.crt is corrupt"):
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)
    other = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD)
    cert.write_bytes(other.root_cert_pem)
    with pytest.raises(ConfigError, match="does not belong to the key"):
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain=TD)


def test_ca_of_another_trust_domain_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigError, match=r"example\.org"):
        CertificateAuthority.load_or_create(tmp_path / "state", trust_domain="example.org")


def test_failed_key_write_leaves_no_partial_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", broken_fsync)
        with pytest.raises(ConfigError, match="cannot write the CA key file"):
            CertificateAuthority.load_or_create(tmp_path, trust_domain=TD)
    assert list((tmp_path / "ca").iterdir()) == []
    ca = CertificateAuthority.load_or_create(tmp_path, trust_domain=TD)
    assert CertificateAuthority.load_or_create(tmp_path, trust_domain=TD).key_id == ca.key_id


def test_concurrent_creation_keeps_the_first_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process writes root.key between our check and our write, we adopt its key."""
    winner = CertificateAuthority.load_or_create(tmp_path / "winner", trust_domain=TD)
    winner_key = (tmp_path / "winner" / "ca" / "root.key").read_bytes()
    real_read = CertificateAuthority._read_key
    calls = []

    def racing_read(path: Path) -> Ed25519PrivateKey | None:
        calls.append(path)
        if len(calls) == 1:  # our first look finds nothing; then the other process writes its key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, winner_key)
            os.close(fd)
            return None
        return real_read(path)

    monkeypatch.setattr(CertificateAuthority, "_read_key", staticmethod(racing_read))
    loser = CertificateAuthority.load_or_create(tmp_path / "loser", trust_domain=TD)
    assert loser.key_id == winner.key_id
    assert (tmp_path / "loser" / "ca" / "root.key").read_bytes() == winner_key


def test_sign_and_verify_never_raise(ca: CertificateAuthority, tmp_path: Path) -> None:
    sig = ca.sign(b"hello")
    assert len(sig) == 64
    assert ca.verify(b"hello", sig)
    assert not ca.verify(b"hellO", sig)
    assert not ca.verify(b"hello", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not ca.verify(b"hello", b"short")
    assert not ca.verify(b"hello", b"")
    other = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD)
    assert not ca.verify(b"hello", other.sign(b"hello"))


# -- X.509-SVIDs ---------------------------------------------------------------------------------------------


def test_svid_carries_spiffe_uri_and_verifies(ca: CertificateAuthority) -> None:
    cert_pem, key_pem = ca.issue_agent_svid("alice", ttl_s=3600)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/agent/alice"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.root_cert_pem))
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)
    assert cert.not_valid_after_utc.timestamp() == T0 + 3600
    assert ca.verify_agent_svid(cert_pem) == f"spiffe://{TD}/agent/alice"


def test_svid_from_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD)
    cert_pem, _ = other.issue_agent_svid("alice")
    with pytest.raises(TokenInvalid, match="not issued by"):
        ca.verify_agent_svid(cert_pem)


def test_expired_svid_is_refused(ca: CertificateAuthority, clock: FakeClock) -> None:
    cert_pem, _ = ca.issue_agent_svid("alice", ttl_s=60)
    clock.advance(59)
    assert ca.verify_agent_svid(cert_pem).endswith("/alice")
    clock.advance(2)
    with pytest.raises(TokenInvalid, match="expired at"):
        ca.verify_agent_svid(cert_pem)


def test_svid_refuses_garbage_and_the_root_itself(ca: CertificateAuthority) -> None:
    with pytest.raises(TokenInvalid, match="PEM"):
        ca.verify_agent_svid(b"garbage")
    with pytest.raises(TokenInvalid, match="not a leaf"):
        ca.verify_agent_svid(ca.root_cert_pem)


def test_svid_for_bad_agent_name(ca: CertificateAuthority) -> None:
    with pytest.raises(UnknownAgent):
        ca.issue_agent_svid("Not/Valid")
    with pytest.raises(ValueError, match="ttl_s"):
        ca.issue_agent_svid("alice", ttl_s=0)


# -- run tokens: issuing and the happy path ------------------------------------------------------------------


def test_issue_shape_and_verify(svc: TokenService, ca: CertificateAuthority, clock: FakeClock) -> None:
    token = svc.issue("alice", "run-1")
    header, payload = parts(token)
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": ca.key_id}
    assert payload["sub"] == f"spiffe://{TD}/agent/alice"
    assert payload["aud"] == [AUD]
    assert payload["iat"] == int(T0) and payload["exp"] == int(T0) + 300
    assert payload["run"] == "run-1" and payload["agent"] == "alice"
    assert len(payload["jti"]) == 32 and int(payload["jti"], 16) >= 0
    claims = svc.verify(token)
    assert claims == TokenClaims(
        sub=f"spiffe://{TD}/agent/alice", agent="alice", aud=(AUD,), exp=T0 + 300, iat=T0,
        jti=payload["jti"], run_id="run-1",
    )
    assert svc.issue("alice", "run-1") != token  # fresh jti every time


def test_issue_with_custom_audience_and_ttl(svc: TokenService, clock: FakeClock) -> None:
    token = svc.issue("bob", "run-2", audience="model-proxy", ttl_s=30)
    claims = svc.verify(token, audience="model-proxy")
    assert claims.aud == ("model-proxy",) and claims.exp - claims.iat == 30
    with pytest.raises(ValueError, match="ttl_s"):
        svc.issue("bob", "run-2", ttl_s=svc.max_ttl_s + 1)
    with pytest.raises(ValueError, match="run id"):
        svc.issue("bob", "")
    with pytest.raises(UnknownAgent):
        svc.issue("Bob!", "run-2")


def test_service_config_errors(ca: CertificateAuthority, store: Store) -> None:
    with pytest.raises(ConfigError, match="trust domain"):
        TokenService(ca, store, trust_domain="example.org", audience=AUD)
    with pytest.raises(ConfigError, match="lifetime"):
        TokenService(ca, store, trust_domain=TD, audience=AUD, ttl_s=0)
    with pytest.raises(ConfigError, match="audience"):
        TokenService(ca, store, trust_domain=TD, audience="")


# -- run tokens: every refusal -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token(svc: TokenService, token: str | None) -> None:
    with pytest.raises(TokenMissing):
        svc.verify(token)


@pytest.mark.parametrize(
    "token", ["abc", "a.b", "a.b.c", "a.b.c.d", "!!!.???.***", "eyJhbGciOiJFZERTQSJ9.e30.", "x" * 20_000]
)
def test_malformed_token(svc: TokenService, token: str) -> None:
    assert_refused(svc, token, TokenInvalid)


def test_modified_payload_is_refused(svc: TokenService) -> None:
    token = svc.issue("alice", "run-1")
    header_b64, _, sig_b64 = token.split(".")
    _, payload = parts(token)
    for change in ({"run": "run-2"}, {"agent": "mallory", "sub": f"spiffe://{TD}/agent/mallory"},
                   {"exp": payload["exp"] + 10_000}, {"aud": ["other"]}):
        forged = f"{header_b64}.{b64url_json({**payload, **change})}.{sig_b64}"
        err = assert_refused(svc, forged, TokenInvalid)
        assert "signature" in str(err)


def test_modified_signature_is_refused(svc: TokenService) -> None:
    token = svc.issue("alice", "run-1")
    head, _, sig = token.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 0xFF
    assert_refused(svc, f"{head}.{b64url(bytes(raw))}", TokenInvalid)


def test_token_from_another_ca_is_refused(tmp_path: Path, svc: TokenService, clock: FakeClock) -> None:
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD, clock=clock)
    with open_store("memory://") as other_store:
        other = TokenService(other_ca, other_store, trust_domain=TD, audience=AUD, clock=clock)
        token = other.issue("alice", "run-1")
        assert other.verify(token).agent == "alice"
    err = assert_refused(svc, token, TokenInvalid)
    assert "certificate authority" in str(err)
    # Same kid as ours, but signed with the other key: still refused.
    forged = jwt.encode(parts(token)[1], other_ca._private_key, algorithm="EdDSA",
                        headers={"kid": svc.ca.key_id, "typ": "JWT"})
    assert_refused(svc, forged, TokenInvalid)


def test_alg_none_token_is_refused(svc: TokenService, clock: FakeClock) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": svc.ca.key_id}
    body = claims_payload(clock)
    for sig in ("", b64url(b"x" * 64)):
        token = f"{b64url_json(header)}.{b64url_json(body)}.{sig}"
        err = assert_refused(svc, token, TokenInvalid)
        assert "only EdDSA" in str(err)


def test_alg_confusion_hs256_with_public_key_is_refused(svc: TokenService, clock: FakeClock) -> None:
    """An attacker who knows the public key signs with HS256 using it as the HMAC secret."""
    secrets = [
        svc.ca.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        svc.ca.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        svc.ca.root_cert_pem,
    ]
    for secret in secrets:
        header = {"alg": "HS256", "typ": "JWT", "kid": svc.ca.key_id}
        signing_input = f"{b64url_json(header)}.{b64url_json(claims_payload(clock))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        err = assert_refused(svc, f"{signing_input}.{b64url(mac)}", TokenInvalid)
        assert "only EdDSA" in str(err)


def test_other_asymmetric_algorithm_is_refused(svc: TokenService, clock: FakeClock) -> None:
    token = jwt.encode(claims_payload(clock), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": svc.ca.key_id})
    assert_refused(svc, token, TokenInvalid)


def test_expired_token(svc: TokenService, clock: FakeClock) -> None:
    token = svc.issue("alice", "run-1")
    clock.advance(299)
    assert svc.verify(token).agent == "alice"
    clock.advance(1)  # exactly exp: refused
    err = assert_refused(svc, token, TokenExpired)
    assert "expired at 2023-11-14T22:18:20Z" in str(err)
    clock.advance(100)
    assert "(100s ago)" in str(assert_refused(svc, token, TokenExpired))


def test_leeway_tolerates_small_clock_skew(ca: CertificateAuthority, store: Store, clock: FakeClock) -> None:
    svc = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock, leeway_s=30)
    token = svc.issue("alice", "run-1")
    clock.advance(300 + 29)
    assert svc.verify(token).agent == "alice"
    clock.advance(1)
    assert_refused(svc, token, TokenExpired)


def test_token_issued_in_the_future_is_refused(svc: TokenService, ca: CertificateAuthority,
                                               clock: FakeClock) -> None:
    token = sign_with_ca(ca, claims_payload(clock, iat=int(T0) + 60, exp=int(T0) + 360))
    err = assert_refused(svc, token, TokenInvalid)
    assert "future" in str(err)


def test_wrong_audience(svc: TokenService) -> None:
    token = svc.issue("alice", "run-1", audience="model-proxy")
    err = assert_refused(svc, token, TokenWrongAudience)
    assert "'model-proxy'" in str(err) and f"'{AUD}'" in str(err)
    token = svc.issue("alice", "run-1")
    err = assert_refused(svc, token, TokenWrongAudience, audience="model-proxy")
    assert "expects 'model-proxy'" in str(err)


def test_single_string_audience_is_accepted(svc: TokenService, ca: CertificateAuthority,
                                           clock: FakeClock) -> None:
    assert svc.verify(sign_with_ca(ca, claims_payload(clock, aud=AUD))).aud == (AUD,)


@pytest.mark.parametrize(
    "change",
    [
        {"sub": f"spiffe://{TD}/agent/bob"},                # sub names another agent
        {"sub": "spiffe://example.org/agent/alice"},        # sub in another trust domain
        {"sub": "alice"},                                   # not a SPIFFE id
        {"agent": "Alice", "sub": f"spiffe://{TD}/agent/Alice"},  # invalid agent name
        {"sub": None},
        {"agent": None},
        {"run": None},
        {"run": ""},
        {"jti": None},
        {"jti": 7},
        {"aud": None},
        {"aud": []},
        {"aud": [1]},
        {"exp": None},
        {"exp": "soon"},
        {"iat": True},
        {"exp": int(T0) - 1},                               # exp before iat
        {"exp": int(T0) + 86400 + 1},                       # longer than max_ttl_s
    ],
)
def test_claims_that_do_not_fit_are_refused(svc: TokenService, ca: CertificateAuthority, clock: FakeClock,
                                            change: dict[str, Any]) -> None:
    assert_refused(svc, sign_with_ca(ca, claims_payload(clock, **change)), TokenInvalid)


def test_payload_must_be_a_json_object(svc: TokenService, ca: CertificateAuthority) -> None:
    token = jwt.api_jws.encode(b"[1, 2]", ca._private_key, algorithm="EdDSA", headers={"kid": ca.key_id})
    assert_refused(svc, token, TokenInvalid)


def test_revoked_token(svc: TokenService) -> None:
    token, other = svc.issue("alice", "run-1"), svc.issue("alice", "run-1")
    svc.revoke(token, reason="leaked")
    assert "revoked" in str(assert_refused(svc, token, TokenRevoked))
    assert svc.verify(other).run_id == "run-1"
    svc.revoke(token)  # idempotent
    jti = svc.verify(other).jti
    svc.revoke(jti)
    assert_refused(svc, other, TokenRevoked)
    assert svc.is_revoked(jti)


def test_revoke_refuses_foreign_or_empty_input(tmp_path: Path, svc: TokenService, clock: FakeClock) -> None:
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other", trust_domain=TD, clock=clock)
    with pytest.raises(TokenInvalid):
        svc.revoke(sign_with_ca(other_ca, claims_payload(clock)))
    with pytest.raises(TokenMissing):
        svc.revoke("")


def test_revoked_run(svc: TokenService) -> None:
    a, b = svc.issue("alice", "run-1"), svc.issue("bob", "run-1")
    keep = svc.issue("alice", "run-2")
    svc.revoke_run("run-1", reason="run cancelled")
    for token in (a, b):
        assert "run 'run-1' was revoked" in str(assert_refused(svc, token, TokenRevoked))
    assert svc.verify(keep).run_id == "run-2"
    with pytest.raises(TokenRevoked, match="no new tokens"):
        svc.issue("alice", "run-1")
    svc.revoke_run("run-1")  # idempotent
    assert svc.is_revoked(run_id="run-1") and not svc.is_revoked(run_id="run-2")


def test_renew(svc: TokenService, clock: FakeClock) -> None:
    old = svc.issue("alice", "run-1", audience="model-proxy", ttl_s=120)
    old_claims = svc.verify(old, audience="model-proxy")
    clock.advance(100)
    new = svc.renew(old)
    new_claims = svc.verify(new, audience="model-proxy")
    assert (new_claims.agent, new_claims.run_id, new_claims.aud) == ("alice", "run-1", ("model-proxy",))
    assert new_claims.jti != old_claims.jti
    assert new_claims.exp == old_claims.exp + 100 and new_claims.exp - new_claims.iat == 120
    assert_refused(svc, old, TokenRevoked, audience="model-proxy")
    with pytest.raises(TokenRevoked):
        svc.renew(old)  # a token can be renewed only once
    clock.advance(119)
    assert svc.verify(new, audience="model-proxy").jti == new_claims.jti


def test_renew_refuses_expired_revoked_and_invalid(svc: TokenService, clock: FakeClock) -> None:
    expired = svc.issue("alice", "run-1")
    clock.advance(300)
    with pytest.raises(TokenExpired):
        svc.renew(expired)
    revoked = svc.issue("alice", "run-2")
    svc.revoke_run("run-2")
    with pytest.raises(TokenRevoked):
        svc.renew(revoked)
    with pytest.raises(TokenInvalid):
        svc.renew("a.b.c")
    with pytest.raises(TokenMissing):
        svc.renew("")


# -- the verification cache ----------------------------------------------------------------------------------


@pytest.fixture
def decode_calls(svc: TokenService, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = svc._decode

    def counting(token: str) -> TokenClaims:
        calls.append(token)
        return real(token)

    monkeypatch.setattr(svc, "_decode", counting)
    return calls


def test_cache_skips_the_signature_check_on_repeat(svc: TokenService, decode_calls: list[str]) -> None:
    token = svc.issue("alice", "run-1")
    first = svc.verify(token)
    assert svc.verify(token) == first
    assert svc.verify(token) == first
    assert len(decode_calls) == 1
    # A tampered copy is a different cache key: full verification, refused.
    head, _, sig = token.rpartition(".")
    assert_refused(svc, f"{head}.{sig[::-1]}", TokenInvalid)
    assert len(decode_calls) == 2


def test_cache_does_not_bypass_revocation(svc: TokenService, decode_calls: list[str]) -> None:
    token = svc.issue("alice", "run-1")
    svc.verify(token)
    svc.revoke(token)
    assert_refused(svc, token, TokenRevoked)
    token2 = svc.issue("alice", "run-2")
    svc.verify(token2)
    svc.revoke_run("run-2")
    assert_refused(svc, token2, TokenRevoked)


def test_cache_does_not_bypass_expiry(svc: TokenService, clock: FakeClock, decode_calls: list[str]) -> None:
    token = svc.issue("alice", "run-1")
    svc.verify(token)
    svc.verify(token)
    assert len(decode_calls) == 1
    clock.advance(300)
    assert_refused(svc, token, TokenExpired)


def test_cache_does_not_bypass_audience(svc: TokenService, decode_calls: list[str]) -> None:
    token = svc.issue("alice", "run-1")
    svc.verify(token)
    assert_refused(svc, token, TokenWrongAudience, audience="model-proxy")
    assert len(decode_calls) == 1  # the audience check ran on the cached claims
    assert svc.verify(token).agent == "alice"


def test_cache_is_bounded(ca: CertificateAuthority, store: Store, clock: FakeClock) -> None:
    svc = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock, cache_size=2)
    tokens = [svc.issue("alice", f"run-{i}") for i in range(5)]
    for token in tokens:
        svc.verify(token)
    assert len(svc._cache) == 2
    assert set(svc._cache) == {hashlib.sha256(t.encode()).digest() for t in tokens[-2:]}
    uncached = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock, cache_size=0)
    assert uncached.verify(tokens[0]).run_id == "run-0"
    assert len(uncached._cache) == 0


# -- persistence of revocations ------------------------------------------------------------------------------


def test_revocations_survive_a_new_service(ca: CertificateAuthority, store: Store, svc: TokenService,
                                           clock: FakeClock) -> None:
    revoked, of_run = svc.issue("alice", "run-1"), svc.issue("bob", "run-9")
    fine = svc.issue("alice", "run-2")
    svc.revoke(revoked, reason="leaked")
    svc.revoke_run("run-9", reason="cancelled")
    rows = store.query(
        "SELECT jti, run_id, reason, revoked_at, expires_at FROM revoked_tokens ORDER BY reason"
    )
    assert [(r["run_id"], r["reason"]) for r in rows] == [("run-9", "cancelled"), ("run-1", "leaked")]
    assert rows[0]["jti"] is None and rows[1]["jti"] == parts(revoked)[1]["jti"]
    assert rows[1]["expires_at"] == T0 + 300 and rows[1]["revoked_at"] == T0

    fresh = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock)
    assert_refused(fresh, revoked, TokenRevoked)
    assert_refused(fresh, of_run, TokenRevoked)
    assert fresh.verify(fine).run_id == "run-2"


def test_renewal_revocation_persists(ca: CertificateAuthority, store: Store, svc: TokenService,
                                     clock: FakeClock) -> None:
    old = svc.issue("alice", "run-1")
    svc.renew(old)
    fresh = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock)
    assert_refused(fresh, old, TokenRevoked)


def test_prune_drops_only_revocations_of_expired_tokens(ca: CertificateAuthority, store: Store,
                                                        svc: TokenService, clock: FakeClock) -> None:
    short = svc.issue("alice", "run-1", ttl_s=60)
    svc.revoke(short)
    svc.revoke_run("run-2")
    assert svc.prune() == 0
    clock.advance(61)
    assert svc.prune() == 1
    assert_refused(svc, short, TokenExpired)  # still refused, now because it expired
    assert [r["run_id"] for r in store.query("SELECT run_id FROM revoked_tokens")] == ["run-2"]
    assert svc.is_revoked(run_id="run-2")
    clock.advance(svc.max_ttl_s)
    assert svc.prune() == 1
    assert store.query("SELECT count(*) AS n FROM revoked_tokens") == [{"n": 0}]
    fresh = TokenService(ca, store, trust_domain=TD, audience=AUD, clock=clock)
    assert not fresh.is_revoked(run_id="run-2")
