"""Publishing agents over A2A: who may call which agent, and what a caller's message becomes.

An operator publishes an agent with ``[a2a.publish.NAME]`` (opt-in per agent) and names its callers with
``[a2a.peers.PEER]``, each authenticated by a bearer key the operator issued it and keeps in the vault
(``key = "secret://name"``; set it with ``stitchwork secrets set name``). A Stitchwork run token also
authenticates a caller, as the peer ``agent:<name>``, unless ``[a2a] run_tokens = false``. Nobody is anonymous:
a request without a valid bearer is refused (and audited) before the protocol layer reads it.

A message from a peer starts a run of the published agent, whose every tool and model call passes the gateway.
**Trust:** the caller is another agent, so its text is not the operator's: the task is recorded as content from
``a2a-peer:<peer>``, *untrusted* unless the operator sets ``trusted = true`` for that peer (or lists the source in
``[security] trusted_sources``). Addresses, recipients or targets it names therefore count as tainted and cannot
steer external or irreversible calls (the default policy pack denies or asks, as for injected mail).

**Tasks are durable:** each A2A task is a row of the ``a2a_tasks`` table in the platform's store (:class:`A2ATasks`):
its owner (the peer), the published agent, the run it maps to and the task as the protocol last saw it. After a
restart ``GetTask`` still answers, and another message to the task picks up the same run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stitchwork.agents.runs import RunRecord, RunStatus
from stitchwork.data._base import Store
from stitchwork.errors import AuthError, ConfigError, SecretError, StitchworkError, TokenInvalid, TokenMissing
from stitchwork.gateway.context import digest
from stitchwork.security.taint import Label
from stitchwork.service import Service
from stitchwork.tools._remote import secret_name

TASKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS a2a_tasks (
    owner VARCHAR NOT NULL,
    agent VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    context_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    task VARCHAR NOT NULL,
    updated_at DOUBLE NOT NULL,
    PRIMARY KEY (owner, agent, id)
)
"""

PUBLISH_KEYS = frozenset({"description", "peers"})
PEER_KEYS = frozenset({"key", "trusted"})
RUN_TOKEN_PEER = "agent:"


@dataclass(frozen=True)
class Peer:
    """An authenticated caller: its name, whether its messages are trusted content, and its key's vault name."""

    name: str
    trusted: bool = False
    key: str = ""

    @property
    def label(self) -> Label:
        """The provenance label of what this peer sends."""
        return Label(f"a2a-peer:{self.name}", self.trusted)


@dataclass(frozen=True)
class Publication:
    """A published agent: its card's description, and the peers allowed to call it (``None``: every peer)."""

    agent: str
    description: str
    peers: frozenset[str] | None


def parse_a2a(publish: Mapping[str, Any], peers: Mapping[str, Any],
              agents: list[str]) -> tuple[dict[str, Publication], dict[str, Peer]]:
    """The publications and peers of ``[a2a]``.

    Raises:
        ConfigError: an unknown agent or key, a peer without a vault key, a publication naming an unknown peer.
    """
    known: dict[str, Peer] = {}
    for name, table in sorted(peers.items()):
        where = f"[a2a.peers.{name}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        if unknown := sorted(set(table) - PEER_KEYS):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(PEER_KEYS))}")
        if str(name).startswith(RUN_TOKEN_PEER):
            raise ConfigError(f"{where}: peer names starting with {RUN_TOKEN_PEER!r} are the platform's own agents")
        key = secret_name(table.get("key"), where=f"{where} key")
        if not key:
            raise ConfigError(f"{where}: a peer needs key = \"secret://name\" (its bearer key, in the vault)")
        trusted = table.get("trusted", False)
        if not isinstance(trusted, bool):
            raise ConfigError(f"{where}: trusted must be true or false")
        known[str(name)] = Peer(str(name), trusted, key)
    published: dict[str, Publication] = {}
    for agent, table in sorted(publish.items()):
        where = f"[a2a.publish.{agent}]"
        if agent not in agents:
            raise ConfigError(f"{where}: unknown agent {agent!r}; known: {', '.join(agents) or 'none'}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        if unknown := sorted(set(table) - PUBLISH_KEYS):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(PUBLISH_KEYS))}")
        allowed = table.get("peers")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(p, str) for p in allowed):
                raise ConfigError(f"{where}: peers must be a list of peer names")
            if missing := sorted(p for p in allowed if p not in known and not p.startswith(RUN_TOKEN_PEER)):
                raise ConfigError(f"{where}: unknown peer(s) {', '.join(missing)}")
        published[agent] = Publication(agent, str(table.get("description") or f"The Stitchwork agent {agent}."),
                                       frozenset(allowed) if allowed is not None else None)
    return published, known


@dataclass(frozen=True)
class StoredTask:
    """One A2A task as stored: the protocol's task (JSON text; empty until first saved) and the run it maps to."""

    owner: str
    agent: str
    id: str
    context_id: str
    run_id: str
    task: str
    updated_at: float


class A2ATasks:
    """The A2A tasks of published agents in the platform's store, each kept apart by owner (the calling peer)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.execute(TASKS_SCHEMA)

    def save(self, owner: str, agent: str, task_id: str, context_id: str, task: str) -> None:
        """Records the task's latest protocol state (its run, once linked, is kept)."""
        existing = self.get(owner, agent, task_id)
        self._put(StoredTask(owner, agent, task_id, context_id, existing.run_id if existing else "", task,
                             time.time()))

    def link(self, owner: str, agent: str, task_id: str, context_id: str, run_id: str) -> None:
        """Records that the task is served by run ``run_id``."""
        existing = self.get(owner, agent, task_id)
        self._put(StoredTask(owner, agent, task_id, context_id, run_id, existing.task if existing else "",
                             time.time()))

    def get(self, owner: str, agent: str, task_id: str) -> StoredTask | None:
        rows = self.store.query("SELECT * FROM a2a_tasks WHERE owner = ? AND agent = ? AND id = ?",
                                [owner, agent, task_id])
        return _stored(rows[0]) if rows else None

    def find(self, owner: str, agent: str, *, limit: int = 10_000) -> list[StoredTask]:
        """The owner's tasks of ``agent``, most recently updated first."""
        rows = self.store.query("SELECT * FROM a2a_tasks WHERE owner = ? AND agent = ? AND task <> '' "
                                "ORDER BY updated_at DESC LIMIT ?", [owner, agent, limit])
        return [_stored(r) for r in rows]

    def delete(self, owner: str, agent: str, task_id: str) -> None:
        self.store.execute("DELETE FROM a2a_tasks WHERE owner = ? AND agent = ? AND id = ?", [owner, agent, task_id])

    def _put(self, row: StoredTask) -> None:
        self.store.execute(
            "INSERT INTO a2a_tasks (owner, agent, id, context_id, run_id, task, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, agent, id) DO UPDATE SET "
            "context_id = excluded.context_id, run_id = excluded.run_id, task = excluded.task, "
            "updated_at = excluded.updated_at",
            [row.owner, row.agent, row.id, row.context_id, row.run_id, row.task, row.updated_at])


def _stored(row: Mapping[str, Any]) -> StoredTask:
    return StoredTask(str(row["owner"]), str(row["agent"]), str(row["id"]), str(row["context_id"]),
                      str(row["run_id"]), str(row["task"]), float(row["updated_at"]))


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class A2APublisher:
    """The published agents of one control plane: caller authentication, runs started from messages."""

    def __init__(self, service: Service) -> None:
        self.service = service
        platform = service.platform
        self.config = platform.config.a2a
        self.publications, self.peers = parse_a2a(self.config.publish, self.config.peers, platform.agents.names())

    @functools.cached_property
    def tasks(self) -> A2ATasks:
        """The published agents' tasks (the table is created on first use: only where agents are published)."""
        return A2ATasks(self.service.platform.store)

    def published(self, agent: str) -> Publication | None:
        return self.publications.get(agent)

    async def authenticate(self, agent: str, token: str) -> Peer:
        """The peer presenting ``token`` to the published ``agent``; a refusal is audited.

        Raises:
            AuthError: no token, a token that is neither a peer's key nor a valid run token, or a peer the
                publication does not admit.
        """
        try:
            peer = self._peer(token)
            publication = self.publications[agent]
            if publication.peers is not None and peer.name not in publication.peers:
                raise AuthError(f"peer {peer.name!r} may not call the agent {agent!r}")
        except AuthError as exc:
            await self.service.platform.audit.aappend(
                "auth", agent=agent, tool="a2a", decision="deny", data={"error": exc.code, "reason": str(exc)})
            raise
        return peer

    def _peer(self, token: str) -> Peer:
        if not token:
            raise TokenMissing("A2A callers must authenticate: Authorization: Bearer <peer key or run token>")
        presented = _sha(token)
        vault = self.service.platform.vault
        for peer in self.peers.values():
            try:
                key = vault.get(peer.key)
            except SecretError:
                continue
            if hmac.compare_digest(presented, _sha(key)):
                return peer
        if self.config.run_tokens and token.count(".") == 2:
            claims = self.service.platform.tokens.verify(token, audience=self.service.platform.config.security.audience)
            return Peer(RUN_TOKEN_PEER + claims.agent)
        raise TokenInvalid("the bearer is neither a peer's key nor a valid run token")

    async def start(self, agent: str, peer: Peer, text: str, *, context_id: str = "") -> RunRecord:
        """Starts a run of ``agent`` on the peer's message (labelled as the peer's) and drives it in the background.

        Raises:
            StitchworkError: the run cannot be created (no model, an empty message); audited.
        """
        platform = self.service.platform
        data: dict[str, Any] = {"peer": peer.name, "trusted": peer.trusted, "context_id": context_id,
                                "message_sha256": digest(text)}
        try:
            record = platform.runner.create(agent, text, task_source=peer.label)
        except StitchworkError as exc:
            await platform.audit.aappend("a2a", agent=agent, tool="a2a", decision="error",
                                         data={**data, "error": exc.code, "reason": str(exc)})
            raise
        await platform.audit.aappend("a2a", agent=agent, run_id=record.id, tool="a2a", decision="allow", data=data)
        self.service._spawn(platform.runner.drive(record.id))
        return record

    async def wait(self, run_id: str, timeout_s: float) -> RunRecord:
        """The run once it finished or waits for a human, or as it is after ``timeout_s``."""
        runs = self.service.platform.runs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pause = 0.02
        while True:
            record = runs.get(run_id)
            if record.status is not RunStatus.RUNNING or loop.time() >= deadline:
                if record.status is RunStatus.WAITING_APPROVAL and loop.time() < deadline:
                    await asyncio.sleep(min(pause, deadline - loop.time()))  # a human may answer in time
                    pause = min(pause * 2, 0.5)
                    continue
                return record
            await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
            pause = min(pause * 2, 0.25)


__all__ = ["A2APublisher", "A2ATasks", "Peer", "Publication", "StoredTask", "parse_a2a"]
