"""Run tokens: short-lived JWT-SVID-shaped tokens, signed by the CA root key, that agents present on every call.

A token (``alg=EdDSA``, ``kid`` = the CA key id) names one agent (its SPIFFE id), one run and its audiences, and
lives minutes. :class:`TokenService` issues, renews, verifies (with a bounded cache of verified claims) and revokes
them; the revocations are kept by :class:`~stitchwork.security.identity.revocation.Revocations`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

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
from stitchwork.security.identity.ca import CertificateAuthority, _iso
from stitchwork.security.identity.revocation import Revocations
from stitchwork.security.identity.spiffe import _check_trust_domain, agent_spiffe_id

__all__ = ["TokenClaims", "TokenService"]

_ALGORITHM = "EdDSA"
_MAX_TOKEN_CHARS = 8192
"""Longer strings are refused before any hashing or decoding (our tokens are ~400 characters)."""


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
        self._jws = jwt.PyJWS(algorithms=[_ALGORITHM])
        self._revocations = Revocations(store, clock=clock, max_ttl_s=max_ttl_s, leeway_s=self.leeway_s)

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
        if self._revocations.is_revoked(run_id=run_id):
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
        with self._revocations.lock:  # no other renewal of this token between its check and its revocation
            claims = self._verify(token, audience=None)
            lifetime = max(1, min(self.max_ttl_s, round(claims.exp - claims.iat)))
            new = self._encode(claims.sub, claims.agent, claims.aud, claims.run_id, lifetime)
            self._revocations.revoke_token(claims.jti, run_id=claims.run_id, expires_at=claims.exp, reason="renewed")
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
        self._revocations.check(claims.jti, claims.run_id)

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
            self._revocations.revoke_token(claims.jti, run_id=claims.run_id, expires_at=claims.exp, reason=reason)
        else:
            jti = token_or_jti.strip()
            expires_at = self._clock() + self.max_ttl_s
            self._revocations.revoke_token(jti, run_id=None, expires_at=expires_at, reason=reason)

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
        self._revocations.revoke_run(run_id, reason=reason)

    def is_revoked(self, jti: str | None = None, *, run_id: str | None = None) -> bool:
        """Whether token ``jti`` or run ``run_id`` is revoked (as known to this process)."""
        return self._revocations.is_revoked(jti, run_id=run_id)

    def prune(self) -> int:
        """Deletes revocations of tokens that have expired anyway (also from memory).

        A revocation is dropped once ``expires_at + leeway_s`` is in the past: no token it covers can pass the
        expiry check any more.

        Returns:
            The number of revocations removed from memory.

        Raises:
            StoreError: the store could not be updated.
        """
        return self._revocations.prune()
