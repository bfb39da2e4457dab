"""One error tree for the whole platform.

Every error a user or an agent can see derives from :class:`StitchworkError`::

    StitchworkError
    ├── ConfigError                 bad configuration, unknown adapter URI, missing extra
    │   └── PolicyLoadError         a Cedar policy or schema that does not parse or validate (file, line)
    ├── AuthError                   a run token was refused
    │   ├── TokenMissing
    │   ├── TokenInvalid            bad signature, malformed, tampered
    │   ├── TokenExpired
    │   ├── TokenWrongAudience
    │   └── TokenRevoked
    ├── UnknownAgent
    ├── ToolError
    │   ├── UnknownTool
    │   ├── InvalidArguments        JSON schema, size, encoding or path-traversal problems
    │   └── RemoteAgentError        a remote A2A agent could not be reached or answered unusably
    ├── PolicyDenied                Cedar said no (carries the deciding policy ids)
    │   ├── MemoryDenied            agent memory without a grant
    │   └── RateLimited             a requests- or tokens-per-minute limit (carries Retry-After seconds)
    ├── ApprovalRequired            Cedar asks for a human (carries the approval id)
    ├── ApprovalError               unknown approval, already decided
    ├── SecretError
    │   ├── SecretNotFound
    │   ├── SecretNotGranted        a tool asked for a secret its manifest does not name
    │   ├── VaultCorrupt
    │   └── VaultKeyError           wrong or missing vault key
    ├── SandboxError                a sandbox could not start (not: the program inside failed)
    │   └── BackendUnavailable      the backend cannot run on this host (the message says why)
    ├── StoreError
    │   ├── StoreCorrupt            the database file is damaged; it is left untouched
    │   └── QueryRefused            a read-only query that could write, reach outside its tables, or ran too long
    ├── AuditError
    │   └── AuditTampered           `audit verify` found a bad event (carries its sequence number)
    ├── ModelError
    │   ├── ModelUnavailable        429, 5xx, timeout, refused connection, truncated stream: retry elsewhere
    │   └── ModelRejected           the backend refused the request itself (4xx): retrying will not help
    │       ├── ModelNotFound       the server does not serve that model (404); the message lists what it serves
    │       └── ContextLengthExceeded  the prompt and completion do not fit the model's context
    ├── RunError
    │   └── RunTimedOut             waiting for a run (to finish or to ask for approval) took longer than allowed
    ├── NothingToUndo               `stitchwork undo`: the run (or the call asked for) has no call left to undo
    └── BusError
        ├── BusConflict             a compare-and-set publish lost: another writer advanced the subject
        └── BusFull                 a stream that never drops unfinished messages is at its size limit

Adapters translate backend exceptions into this tree with ``raise ... from exc``.
"""

from __future__ import annotations


class StitchworkError(Exception):
    """Base of every error Stitchwork raises on purpose."""

    code: str = "error"

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe description for API responses and agent-visible tool results."""
        return {"error": self.code, "message": str(self)}


class ConfigError(StitchworkError):
    code = "config_error"


class PolicyLoadError(ConfigError):
    """A policy file that does not parse or validate: names the file and line."""

    code = "policy_load_error"

    def __init__(self, message: str, *, path: str = "", line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = f"{path}:{line}" if path and line else path
        super().__init__(f"{where}: {message}" if where else message)


class AuthError(StitchworkError):
    code = "unauthenticated"


class TokenMissing(AuthError):
    code = "token_missing"


class TokenInvalid(AuthError):
    code = "token_invalid"


class TokenExpired(AuthError):
    code = "token_expired"


class TokenWrongAudience(AuthError):
    code = "token_wrong_audience"


class TokenRevoked(AuthError):
    code = "token_revoked"


class UnknownAgent(StitchworkError):
    code = "unknown_agent"


class ToolError(StitchworkError):
    code = "tool_error"


class UnknownTool(ToolError):
    code = "unknown_tool"


class InvalidArguments(ToolError):
    code = "invalid_arguments"


class RemoteAgentError(ToolError):
    """A remote A2A agent could not be reached, refused the call, or answered with something unusable."""

    code = "remote_agent_error"


class PolicyDenied(StitchworkError):
    """Cedar denied the call."""

    code = "policy_denied"

    def __init__(self, message: str, *, policy_ids: tuple[str, ...] = ()) -> None:
        self.policy_ids = policy_ids
        super().__init__(message)

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "policy_ids": list(self.policy_ids)}


class MemoryDenied(PolicyDenied):
    """An agent tried to read or write agent memory it has no grant for."""

    code = "memory_denied"


class RateLimited(PolicyDenied):
    """A requests- or tokens-per-minute limit was reached; retry after ``retry_after_s`` seconds."""

    code = "rate_limited"

    def __init__(self, message: str, *, policy_ids: tuple[str, ...] = (), retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, policy_ids=policy_ids)

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "retry_after_s": self.retry_after_s}


class ApprovalRequired(StitchworkError):
    """Policy asks a human; the call waits for approval ``approval_id``."""

    code = "approval_required"

    def __init__(self, message: str, *, approval_id: str, policy_ids: tuple[str, ...] = ()) -> None:
        self.approval_id = approval_id
        self.policy_ids = policy_ids
        super().__init__(message)

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "approval_id": self.approval_id, "policy_ids": list(self.policy_ids)}


class ApprovalError(StitchworkError):
    code = "approval_error"


class SecretError(StitchworkError):
    code = "secret_error"


class SecretNotFound(SecretError):
    code = "secret_not_found"


class SecretNotGranted(SecretError):
    code = "secret_not_granted"


class VaultCorrupt(SecretError):
    code = "vault_corrupt"


class VaultKeyError(SecretError):
    code = "vault_key_error"


class SandboxError(StitchworkError):
    code = "sandbox_error"


class BackendUnavailable(SandboxError):
    code = "backend_unavailable"


class StoreError(StitchworkError):
    code = "store_error"


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class QueryRefused(StoreError):
    """A read-only query (the audit query) was refused or stopped: not one read-only statement, a table or
    function outside what it may reach, more rows than its limit, or longer than its time limit."""

    code = "query_refused"


class AuditError(StitchworkError):
    code = "audit_error"


class AuditTampered(AuditError):
    """The audit chain is broken at event ``seq``."""

    code = "audit_tampered"

    def __init__(self, message: str, *, seq: int | None) -> None:
        self.seq = seq
        super().__init__(message)


class ModelError(StitchworkError):
    code = "model_error"


class ModelUnavailable(ModelError):
    """The deployment could not answer now (rate limit, server error, timeout, cut stream); try another."""

    code = "model_unavailable"

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ModelRejected(ModelError):
    """The backend refused the request (4xx other than 429); the same request will fail anywhere alike."""

    code = "model_rejected"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ModelNotFound(ModelRejected):
    """The server does not serve the model asked for."""

    code = "model_not_found"


class ContextLengthExceeded(ModelRejected):
    """The conversation (and the completion asked for) is longer than the model's context window."""

    code = "context_length_exceeded"


class RunError(StitchworkError):
    code = "run_error"


class RunTimedOut(RunError):
    """A client stopped waiting for a run; the run itself may still go on."""

    code = "timed_out"


class NothingToUndo(StitchworkError):
    """``stitchwork undo`` found no call to reverse: none declares an undo, all are undone, or the call asked for
    is not undoable (the message says which and why)."""

    code = "nothing_to_undo"


class BusError(StitchworkError):
    code = "bus_error"


class BusConflict(BusError):
    """A compare-and-set publish found a newer message on its subject (a fencing token went stale)."""

    code = "bus_conflict"


class LedgerConflict(BusConflict):
    """An idempotency ledger refused a *started* record: its key already has one (another process claimed the call
    first). Raised by the store's ledger (a unique claim on the key); the bus ledger raises its :class:`BusConflict`
    (a compare-and-set), of which this is a kind, so one handler serves both."""

    code = "ledger_conflict"


class BusFull(BusError):
    """A stream that keeps unfinished messages (jobs, undecided approvals) is at its ``max_msgs``/``max_bytes``:
    the new message is refused rather than an unfinished one dropped (``[messaging.limits.KIND]``)."""

    code = "bus_full"
