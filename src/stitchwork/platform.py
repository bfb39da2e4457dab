"""The one place the platform is assembled from a :class:`~stitchwork.config.Config`.

:meth:`Platform.open` builds every layer once, for one of three roles, and nothing reassigns the parts afterwards:

============  =====================================================================================================
``local``     the CLI without a server: the store's run store, approvals and idempotency ledger; with
              ``bus_approvals`` the approvals of durable runs on a configured bus are listed and decided beside
              the platform's own
``server``    ``stitchwork up``: as ``local``, plus the run-events hub (every run event on the bus, served over
              WebSocket) and the bus's approvals beside the store's
``worker``    ``stitchwork worker`` (:func:`open_worker`): checkpoints, idempotency records, approvals and run
              events on the bus; a private store in ``<state>/workers/<name>``
============  =====================================================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from stitchwork.agents.assistant import with_default_assistant
from stitchwork.agents.definition import AgentRegistry, load_agents
from stitchwork.agents.loop import Runner
from stitchwork.agents.runs import DatabaseRunStore, RunStore
from stitchwork.audit.log import AuditLog
from stitchwork.config import Config
from stitchwork.data._base import Store, open_store
from stitchwork.errors import ConfigError, StitchworkError
from stitchwork.gateway.a2a import A2ACaller
from stitchwork.gateway.context import GatewayContext, Sandboxes
from stitchwork.gateway.core import Gateway
from stitchwork.gateway.idempotency import IdempotencyLedger, StoreLedger
from stitchwork.gateway.meters import MemoryMeters, MeterStore, StoreMeters
from stitchwork.gateway.models import MODEL_TOOL_ACTION, ModelDoor, meter_retention
from stitchwork.gateway.undo import UNDO_TOOL_ACTION
from stitchwork.gateway.upstream import UpstreamTools, expand_grants
from stitchwork.isolation._base import INLINE_REFUSED, is_inline
from stitchwork.memory.bus import BusMemory
from stitchwork.memory.store import AgentMemory
from stitchwork.memory.tools import TOOLS_DIR as MEMORY_TOOLS
from stitchwork.memory.tools import MemoryTools
from stitchwork.messaging._base import Bus, open_bus
from stitchwork.messaging.bridge import SyncBus
from stitchwork.messaging.embedded import bus_uri as configured_bus_uri
from stitchwork.observability import METRICS, TRACING
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.identity.ca import CertificateAuthority
from stitchwork.security.identity.tokens import TokenService
from stitchwork.security.policy import PolicyEngine, ToolAction, builtin_policy_dir
from stitchwork.security.vault import Vault, open_vault
from stitchwork.tools.a2a import HOST as A2A_HOST
from stitchwork.tools.a2a import remote_manifests
from stitchwork.tools.manifest import SideEffect, ToolManifest, ToolRegistry, load_tools
from stitchwork.workers.approvals import BusApprovalStore, FederatedApprovals
from stitchwork.workers.auditfeed import AuditForwarder
from stitchwork.workers.events import EventHub, RunEventPublisher, resolve_events_uri
from stitchwork.workers.ledger import BusLedger
from stitchwork.workers.limits import apply_stream_limits
from stitchwork.workers.messages import AgentMessenger
from stitchwork.workers.meters import BusMeters
from stitchwork.workers.runstore import BusRunStore
from stitchwork.workers.subjects import Subjects
from stitchwork.workers.worker import TRANSIENT, Worker, worker_config

PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN_TOOLS = PACKAGE_DIR / "demo" / "tools"
BUILTIN_AGENTS = PACKAGE_DIR / "demo" / "agents"

Role = Literal["local", "server", "worker"]


def ensure_state_dir(path: Path) -> Path:
    """Creates the state directory with owner-only permissions."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def open_vault_for(config: Config) -> Vault:
    ensure_state_dir(config.state_dir)
    return open_vault(config.vault_uri)


@dataclass(frozen=True)
class Durable:
    """The bus-backed parts of a worker's platform."""

    bus: Bus
    sync: SyncBus
    subjects: Subjects
    runs: BusRunStore
    ledger: BusLedger
    events: RunEventPublisher
    worker: str


@dataclass(frozen=True)
class _RoleParts:
    """What differs between the roles: where runs, approvals, idempotency records and run events go."""

    runs: RunStore
    approvals: ApprovalStore
    ledger: IdempotencyLedger
    on_event: Callable[..., None] | None = None
    reraise: tuple[type[Exception], ...] = ()
    events: EventHub | RunEventPublisher | None = None
    durable: Durable | None = None
    closers: tuple[Callable[[], Any], ...] = ()
    bus_meters: BusMeters | None = None
    """Model-use meters on this role's bus, if it has one that others share."""


def _fleet_mode(parts: _RoleParts) -> bool:
    """Whether this platform is part of a fleet: a worker, or the server, on a bus other processes share."""
    if parts.durable is not None:
        return urlsplit(parts.durable.sync.uri).scheme != "memory"
    return isinstance(parts.events, EventHub) and urlsplit(parts.events.uri).scheme != "memory"


def _memory(config: Config, parts: _RoleParts, store: Store,
            audit: AuditLog) -> tuple[AgentMemory, tuple[Callable[[], Any], ...]]:
    """Agent memory (``[data] memory``): the store's, or the bus's shared by the fleet; and what closes it."""
    choice = config.data.memory or ("bus" if _fleet_mode(parts) else "store")
    if choice not in {"store", "bus"}:
        raise ConfigError(f"[data] memory must be store or bus, or empty (bus in fleet mode), got {choice!r}")
    if choice == "store":
        return AgentMemory(store, audit=audit), ()
    prefix = config.messaging.subject_prefix
    if parts.durable is not None:
        return BusMemory(parts.durable.sync, prefix=prefix, audit=audit), ()
    if isinstance(parts.events, EventHub):  # the server: the bus its workers use
        return BusMemory(parts.events.sync, prefix=prefix, audit=audit), ()
    uri = configured_bus_uri(config)
    if urlsplit(uri).scheme == "memory":
        raise ConfigError('[data] memory = "bus" needs a shared bus; [messaging] bus is memory:// here')
    sync = SyncBus(uri)
    return BusMemory(sync, prefix=prefix, audit=audit), (sync.close,)


def _meters(config: Config, parts: _RoleParts, store: Store) -> tuple[MeterStore, tuple[Callable[[], Any], ...]]:
    """Where the model door keeps spend and rate meters (``[compute] meters``), and what closes it."""
    choice = config.compute.meters
    if choice not in {"", "store", "bus", "memory"}:
        raise ConfigError(f"compute.meters must be store, bus, memory or empty, got {choice!r}")
    if choice == "memory":
        return MemoryMeters(), ()
    if choice == "store" or (not choice and parts.bus_meters is None):
        return StoreMeters(store), ()
    if parts.bus_meters is not None:
        return parts.bus_meters, ()
    uri = configured_bus_uri(config)  # "bus" asked for where the role has none: connect to the configured bus
    if urlsplit(uri).scheme == "memory":
        raise ConfigError("compute.meters = \"bus\" needs a shared bus; [messaging] bus is memory:// here")
    sync = SyncBus(uri)
    return BusMeters(Subjects(config.messaging.subject_prefix), sync=sync, retention=_meter_ttl(config)), (sync.close,)


def _meter_ttl(config: Config) -> Callable[[str], float]:
    """How long each bus meter outlives its last update (``[messaging.limits.meters]`` and the budgets)."""
    return meter_retention(config.compute.agents, config.compute.models, config.messaging.limits.meters.max_age_s)


def _gauges(audit: AuditLog, store: Store) -> tuple[Callable[[], Any], ...]:
    """Registers this platform's scrape-time gauges (audit lag, queue depth); returns their removers."""

    def depth() -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        with contextlib.suppress(StitchworkError):  # a worker's store holds neither table
            runs = store.query("SELECT status, count(*) AS n FROM runs "
                               "WHERE status IN ('running', 'waiting_approval') GROUP BY status")
            counts = {r["status"]: float(r["n"]) for r in runs}
            out += [((f"runs_{status}",), counts.get(status, 0.0)) for status in ("running", "waiting_approval")]
        with contextlib.suppress(StitchworkError):
            pending = store.query("SELECT count(*) AS n FROM approvals WHERE status = 'pending'")
            out.append((("approvals",), float(pending[0]["n"] if pending else 0)))
        return out

    return (METRICS.audit_lag.source(lambda: [((), float(audit.lag()))]), METRICS.queue_depth.source(depth))


@dataclass
class Platform:
    """Every layer of one Stitchwork installation, opened from a config (see the module docstring)."""

    config: Config
    role: Role
    store: Store
    ca: CertificateAuthority
    tokens: TokenService
    audit: AuditLog
    approvals: ApprovalStore
    vault: Vault
    tools: ToolRegistry
    agents: AgentRegistry
    policy: PolicyEngine
    gateway: Gateway
    runs: RunStore
    runner: Runner
    memory: AgentMemory | None = None
    """Every agent's memory (:mod:`stitchwork.memory`); its tools are registered when ``[data] memory_tools``."""
    events: EventHub | RunEventPublisher | None = None
    """Where run events go: the control plane's hub (``server``) or a worker's ordered publisher (``worker``)."""
    durable: Durable | None = None
    """A worker's bus-backed parts (``worker`` only)."""
    _closers: tuple[Callable[[], Any], ...] = field(default=(), repr=False)
    upstream: UpstreamTools | None = None
    """The upstream MCP servers whose tools are ``NAME.tool`` (:mod:`stitchwork.gateway.upstream`)."""

    @classmethod
    def open(cls, config: Config, *, role: Role = "local", bus: Bus | None = None, bus_uri: str = "",
             subjects: Subjects | None = None, worker_name: str = "", bus_approvals: bool = False) -> Platform:
        """Opens the store, CA, vault, policies, tools and agents; a bad policy stops here with file and line.

        Args:
            config: The configuration (a worker's is :func:`~stitchwork.workers.worker.worker_config`).
            role: ``local``, ``server`` or ``worker`` (see the module docstring).
            bus: A worker's open bus connection (``worker`` only; the worker owns it).
            bus_uri: The URI ``bus`` was opened with.
            subjects: Subject names on the bus (default: ``[messaging] subject_prefix``).
            worker_name: The worker's name, in its run events.
            bus_approvals: ``local`` only: also list and decide the approvals workers keep on a configured bus.
        """
        state = ensure_state_dir(config.state_dir)
        subjects = subjects or Subjects(config.messaging.subject_prefix)
        tool_dirs = [*(config.tool_dirs or (BUILTIN_TOOLS,)), *([MEMORY_TOOLS] if config.data.memory_tools else [])]
        tools = load_tools(tool_dirs, max_arg_bytes=config.agents.max_arg_bytes,
                           extra=remote_manifests(config.a2a.remotes))
        vault = open_vault(config.vault_uri)
        try:  # upstream MCP servers' tools join the registry before policies and agents are checked against it
            upstream = UpstreamTools(config.mcp, vault, state, fresh=role == "server")
            for manifest in upstream.all_manifests():
                tools.register(manifest)
            hosts = set(MemoryTools.HANDLERS) if config.data.memory_tools else set()
            hosts |= {f"mcp:{name}" for name in upstream.servers} | {A2A_HOST}
            if unbound := sorted(t.name for t in tools if t.host and t.host not in hosts):
                raise ConfigError(f"host-side tool(s) {', '.join(unbound)} name no registered handler")
            _check_inline(config, tools)
            agents = load_agents(config.agent_dirs or (BUILTIN_AGENTS,))
            agents = with_default_assistant(agents, tools, model=config.compute.default_model)
            policy = _policy(config, tools, agents)
            for agent in agents:
                for tool in agent.tools:
                    if tool not in tools and not tool.startswith(upstream.prefixes() or ("\0",)):
                        raise ConfigError(f"agent {agent.name!r} names unknown tool {tool!r}")
        except BaseException:
            vault.close()
            raise
        store = open_store(config.store_uri)
        parts: _RoleParts | None = None
        audit: AuditLog | None = None
        try:
            ca = CertificateAuthority.load_or_create(state, trust_domain=config.security.trust_domain)
            tokens = TokenService(ca, store, trust_domain=config.security.trust_domain,
                                  audience=config.security.audience, ttl_s=config.security.token_ttl_s)
            audit = AuditLog(store, signer=ca, journal_path=state / "audit.journal",
                             flush_ms=config.data.audit_flush_ms)
            parts = _role_parts(config, role, store, tools, subjects, bus=bus, bus_uri=bus_uri,
                                worker_name=worker_name, bus_approvals=bus_approvals)
            iso = config.isolation
            context = GatewayContext(
                tokens=tokens, policy=policy, audit=audit, approvals=parts.approvals, vault=vault, tools=tools,
                agents=_grants(agents, tools),
                sandboxes=Sandboxes(iso.default, iso.limits, allow_inline=iso.allow_inline),
                trusted_sources=frozenset(config.security.trusted_sources),
                audience=config.security.audience,
                idempotency=parts.ledger,
            )
            memory, memory_closers = _memory(config, parts, store, audit)
            parts = dataclasses.replace(parts, closers=(*parts.closers, *memory_closers))
            hosted = MemoryTools(memory).handlers() if config.data.memory_tools else {}
            hosted.update({f"mcp:{name}": server for name, server in upstream.servers.items()})
            if any(t.host == A2A_HOST for t in tools):
                hosted[A2A_HOST] = A2ACaller(context)
            meters, meter_closers = _meters(config, parts, store)
            parts = dataclasses.replace(parts, closers=(*parts.closers, *meter_closers))
            gateway = Gateway(context, models=ModelDoor(context, config.compute, meters=meters),
                              host_handlers=hosted)
            TRACING.configure(config.observability.otlp_endpoint, service_name=config.observability.service_name)
            parts = dataclasses.replace(parts, closers=(*parts.closers, *_gauges(audit, store)))
            runner = Runner(gateway, agents, parts.runs, state_dir=state, max_seconds=config.agents.max_seconds,
                            on_event=parts.on_event, reraise=parts.reraise)
        except BaseException:
            if parts is not None:
                for close in parts.closers:
                    close()
            if audit is not None:
                with contextlib.suppress(StitchworkError):
                    audit.close()
            store.close()
            vault.close()
            raise
        platform = cls(config, role, store, ca, tokens, audit, parts.approvals, vault, tools, agents, policy, gateway,
                       parts.runs, runner, memory, parts.events, parts.durable, parts.closers, upstream=upstream)
        upstream.on_change(platform._upstream_changed)
        return platform

    async def _upstream_changed(self, server: str, manifests: list[ToolManifest]) -> None:
        """An upstream MCP server's tool list changed: registry, the agents' grants and the policy follow it."""
        prefix = f"{server}."
        for tool in list(self.tools):
            if tool.name.startswith(prefix):
                self.tools.remove(tool.name)
        for manifest in manifests:
            self.tools.register(manifest)
        self.policy = _policy(self.config, self.tools, self.agents)
        context = self.gateway.context
        context.policy = self.policy
        context.agents = _grants(self.agents, self.tools)
        await self.audit.aappend("mcp", tool=server, decision="tools_changed",
                                 data={"tools": sorted(m.name for m in manifests)})

    def messenger(self, bus: Bus, *, subjects: Subjects | None = None) -> AgentMessenger:
        """Signed agent-to-agent messages of this platform's agents over ``bus``."""
        return AgentMessenger(self.gateway, bus, ca=self.ca, agents=self.agents.names(),
                              policy_dirs=self.config.security.policy_dirs,
                              subjects=subjects or Subjects(self.config.messaging.subject_prefix))

    async def aclose(self) -> None:
        if self.upstream is not None:
            await self.upstream.aclose()
        await self.gateway.aclose()
        await self.audit.aclose()
        if isinstance(self.events, EventHub):
            await self.events.aclose()
        for close in self._closers:
            close()
        self.vault.close()
        self.store.close()


def _policy(config: Config, tools: ToolRegistry, agents: AgentRegistry) -> PolicyEngine:
    """The Cedar engine over the built-in and configured policies, with every tool's action."""
    if UNDO_TOOL_ACTION.name in tools:
        raise ConfigError(f"a tool cannot be named {UNDO_TOOL_ACTION.name!r}: it is the Cedar action of undo calls "
                          f"({tools.get(UNDO_TOOL_ACTION.name).source})")
    policy_paths = [builtin_policy_dir()] if config.security.builtin_policies else []
    policy_paths += [Path(p) for p in config.security.policy_dirs]
    return PolicyEngine.load(
        policy_paths,
        [ToolAction(t.name, t.side_effect.value, t.args_schema) for t in tools] + [MODEL_TOOL_ACTION, UNDO_TOOL_ACTION],
        agents=agents.names(),
    )


def _grants(agents: AgentRegistry, tools: ToolRegistry) -> dict[str, frozenset[str]]:
    """Each agent's tools, ``NAME.*`` (an upstream server's every tool) expanded."""
    names = [t.name for t in tools]
    return {a.name: expand_grants(a.tools, names) for a in agents}


def _role_parts(config: Config, role: Role, store: Store, tools: ToolRegistry, subjects: Subjects, *,
                bus: Bus | None, bus_uri: str, worker_name: str, bus_approvals: bool) -> _RoleParts:
    timeout = config.security.approval_timeout_s
    kept = config.messaging.limits
    apv_ttl = kept.approvals.max_age_s
    if role == "worker":
        if bus is None or not bus_uri:
            raise ConfigError("a worker's platform needs its open bus and the bus URI")
        sync = SyncBus(bus_uri, bus=bus)
        runs = BusRunStore(sync, subjects, abus=bus, finished_ttl_s=kept.state.max_age_s)
        ledger = BusLedger(sync, subjects, abus=bus, ttl_s=kept.idempotency.max_age_s)
        runs.ledger = ledger
        runs.side_effecting = lambda name: name in tools and tools.get(name).side_effect is not SideEffect.READ
        events = RunEventPublisher(bus, sync, subjects, worker=worker_name)
        durable = Durable(bus, sync, subjects, runs, ledger, events, worker_name)
        return _RoleParts(runs, BusApprovalStore(sync, subjects, timeout_s=timeout, ttl_s=apv_ttl), ledger,
                          on_event=events,
                          reraise=TRANSIENT, events=events, durable=durable, closers=(sync.close,),
                          bus_meters=BusMeters(subjects, abus=bus, retention=_meter_ttl(config)))
    local = ApprovalStore(store, timeout_s=timeout)
    if role == "server":
        hub = EventHub(resolve_events_uri(config), subjects)
        # Approvals of durable runs (requested inside workers) are listed and decided here like the platform's own.
        approvals = FederatedApprovals(local, BusApprovalStore(hub.sync, subjects, timeout_s=timeout, ttl_s=apv_ttl))
        shared = urlsplit(hub.uri).scheme != "memory"
        return _RoleParts(DatabaseRunStore(store), approvals, StoreLedger(store), on_event=hub.on_event, events=hub,
                          bus_meters=BusMeters(subjects, sync=hub.sync, retention=_meter_ttl(config)) if shared
                          else None)
    if bus_approvals:
        try:
            uri = configured_bus_uri(config)
        except ConfigError:
            uri = ""
        # Without `stitchwork up` the embedded bus is not running and only the platform's approvals exist; with an
        # external NATS workers keep theirs on it, and an unreachable bus is an error rather than a shorter list.
        if uri and urlsplit(uri).scheme != "memory":
            sync = SyncBus(uri)
            approvals = FederatedApprovals(local, BusApprovalStore(sync, subjects, timeout_s=timeout,
                                                                   ttl_s=apv_ttl))
            return _RoleParts(DatabaseRunStore(store), approvals, StoreLedger(store), closers=(sync.close,))
    return _RoleParts(DatabaseRunStore(store), local, StoreLedger(store))


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def open_worker(config: Config, *, bus_uri: str, name: str = "", concurrency: int = 4,
                      ack_wait_s: float = 30.0, max_deliver: int = 5, subjects: Subjects | None = None) -> Worker:
    """Connects to the bus, assembles a worker's platform (``role="worker"``) and returns the worker."""
    name = name or default_worker_name()
    subjects = subjects or Subjects(config.messaging.subject_prefix)
    bus = await open_bus(bus_uri)
    try:
        await apply_stream_limits(bus, subjects, config.messaging.limits)  # before this worker uses the streams
        platform = Platform.open(worker_config(config, name), role="worker", bus=bus, bus_uri=bus_uri,
                                 subjects=subjects, worker_name=name)
    except BaseException:
        await bus.aclose()
        raise
    assert platform.durable is not None
    feed = AuditForwarder(platform.audit, bus, subjects, writer=name,
                          position=platform.config.state_dir / "audit-forwarded.json") \
        if config.messaging.fleet_audit else None
    worker = Worker(platform, bus=bus, runs=platform.durable.runs, events=platform.durable.events, name=name,
                    concurrency=concurrency, ack_wait_s=ack_wait_s, max_deliver=max_deliver, subjects=subjects,
                    audit_feed=feed)
    if feed is not None:
        await feed.start()  # first sends what a previous life of this worker had not forwarded
    await worker.keep_checkpoints(config.messaging.checkpoints_kept)
    return worker


__all__ = ["Durable", "Platform", "Role", "default_worker_name", "ensure_state_dir", "open_vault_for", "open_worker"]


def _check_inline(config: Config, tools: ToolRegistry) -> None:
    """Refuses ``inline://`` (no isolation) as the default or a tool's sandbox unless the operator allowed it.

    Raises:
        ConfigError: It is named and ``[isolation] allow_inline`` is off.
    """
    if config.isolation.allow_inline:
        return
    named = [f"tool {t.name!r}" for t in tools if t.sandbox and is_inline(t.sandbox)]
    if is_inline(config.isolation.default):
        named.insert(0, "[isolation] default")
    if named:
        raise ConfigError(f"{', '.join(named)}: {INLINE_REFUSED}")
