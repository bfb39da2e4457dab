"""Revoked run tokens and runs: in memory for the hot path, persisted in the store table ``revoked_tokens``."""

from __future__ import annotations

import threading
from collections.abc import Callable

from stitchwork.data._base import Store
from stitchwork.errors import TokenRevoked

__all__ = ["Revocations"]

_REVOKED_TABLE = """
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti VARCHAR,
    run_id VARCHAR,
    reason VARCHAR,
    revoked_at DOUBLE,
    expires_at DOUBLE
)
"""


class Revocations:
    """The revocations a :class:`~stitchwork.security.identity.tokens.TokenService` enforces.

    A revocation names one token (its ``jti``) or a whole run. It is in force in this process as soon as it is made
    (before it is persisted: fail closed), and every new instance on the same store loads it again. Each one lasts
    until ``expires_at``, after which no token it covers can pass the expiry check (see :meth:`prune`). Thread safe.

    Args:
        store: Where revocations are persisted (the table ``revoked_tokens`` is created if missing).
        clock: Time source (seconds since the epoch).
        max_ttl_s: The longest lifetime of a token: how long a revoked run must be remembered.
        leeway_s: Tolerance for clock differences: a revocation is kept this long after ``expires_at``.

    Attributes:
        lock: Held while a revocation is made; the token service also holds it across a renewal (verify the old
            token, then revoke it), so a token is renewed at most once.

    Raises:
        StoreError: the table cannot be created or read.
    """

    def __init__(self, store: Store, *, clock: Callable[[], float], max_ttl_s: int, leeway_s: float) -> None:
        self.store = store
        self.lock = threading.RLock()
        self._clock = clock
        self._max_ttl_s = max_ttl_s
        self._leeway_s = leeway_s
        self._jtis: dict[str, float] = {}
        self._runs: dict[str, float] = {}
        store.execute(_REVOKED_TABLE)
        for row in store.query("SELECT jti, run_id, expires_at FROM revoked_tokens"):
            expires = float(row["expires_at"]) if row["expires_at"] is not None else float("inf")
            jti, run_id = row["jti"], row["run_id"]
            if jti:
                self._jtis[jti] = max(expires, self._jtis.get(jti, expires))
            elif run_id:
                self._runs[run_id] = max(expires, self._runs.get(run_id, expires))

    def check(self, jti: str, run_id: str) -> None:
        """Refuses a token that was revoked, itself or with its run.

        Raises:
            TokenRevoked: token ``jti`` or run ``run_id`` was revoked.
        """
        if jti in self._jtis:
            raise TokenRevoked(f"the run token {jti} was revoked")
        if run_id in self._runs:
            raise TokenRevoked(f"run {run_id!r} was revoked; its tokens are no longer accepted")

    def is_revoked(self, jti: str | None = None, *, run_id: str | None = None) -> bool:
        """Whether token ``jti`` or run ``run_id`` is revoked (as known to this process)."""
        return (jti is not None and jti in self._jtis) or (run_id is not None and run_id in self._runs)

    def revoke_token(self, jti: str, *, run_id: str | None, expires_at: float, reason: str) -> None:
        """Revokes token ``jti`` until ``expires_at`` (when it expires anyway). Idempotent.

        Raises:
            StoreError: the revocation could not be persisted (it is still in force in this process).
        """
        with self.lock:
            if jti in self._jtis:
                return
            self._jtis[jti] = expires_at  # in force before it is persisted: fail closed
            row = {"jti": jti, "run_id": run_id, "reason": reason, "revoked_at": self._clock(),
                   "expires_at": expires_at}
            self.store.append("revoked_tokens", [row])

    def revoke_run(self, run_id: str, *, reason: str) -> None:
        """Revokes every token of run ``run_id``, for as long as one of them could still be valid. Idempotent.

        Raises:
            StoreError: the revocation could not be persisted (it is still in force in this process).
        """
        with self.lock:
            if run_id in self._runs:
                return
            now = self._clock()
            # Every token of this run was issued before now (issuing stops here) and lives at most max_ttl_s.
            expires_at = now + self._max_ttl_s
            self._runs[run_id] = expires_at
            self.store.append("revoked_tokens", [
                {"jti": None, "run_id": run_id, "reason": reason, "revoked_at": now, "expires_at": expires_at}
            ])

    def prune(self) -> int:
        """Deletes revocations of tokens that have expired anyway (also from memory).

        A revocation is dropped once ``expires_at + leeway_s`` is in the past: no token it covers can pass the
        expiry check any more.

        Returns:
            The number of revocations removed from memory.

        Raises:
            StoreError: the store could not be updated.
        """
        with self.lock:
            cutoff = self._clock() - self._leeway_s
            self.store.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", [cutoff])
            removed = 0
            for table in (self._jtis, self._runs):
                stale = [k for k, expires in table.items() if expires < cutoff]
                for k in stale:
                    del table[k]
                removed += len(stale)
            return removed
