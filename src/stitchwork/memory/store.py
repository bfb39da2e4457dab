"""Agent memory: a per-agent key-value and document store with full-text search, scoped by grants.

Each item belongs to one agent (its *owner*) and sits under ``(namespace, key)``. An item holds searchable
``text``, an optional JSON ``value`` and the provenance :class:`~stitchwork.security.taint.Label` of everything it
was written from. Labels are required on write and come back on every read and search hit, so content that entered
a run untrusted (mail, web pages, tool output) stays untrusted when an agent reads it back from memory later: memory
cannot launder taint. Callers add the labels of what they read to the run's provenance tracker.

Scope. An agent reads and writes only its own memory. Another agent's memory is reachable only through a grant row
in ``memory_grants`` (owner, grantee, namespace or ``*``, mode ``read`` or ``write``), made by an operator with
:meth:`AgentMemory.grant`. The grant table is the whole rule, kept next to the data so it can be queried and
exported like any table; when an audit log is given, every grant, revoke and refused access is audited.

Search. DuckDB's ``fts`` extension cannot be installed offline here (``INSTALL fts`` downloads), and its index
must be rebuilt after every change. Memory therefore keeps its own inverted index, ``memory_postings`` (one row per
item and term with the term frequency and the item's length), maintained on every write and scored with BM25
(k1 = 1.2, b = 0.75) in one SQL ``GROUP BY``: the same SQL on DuckDB and ClickHouse. Terms are word tokens of the
NFKC-normalised, case-folded text (:func:`terms`); no stemming. An update rewrites the item's postings; a crash
between the item write and its postings leaves the item unsearchable until :meth:`AgentMemory.reindex`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from stitchwork.data._base import Store
from stitchwork.data.schema import Column, Table
from stitchwork.errors import MemoryDenied, StoreError
from stitchwork.security.taint import Label, normalise

__all__ = ["GRANTS", "ITEMS", "POSTINGS", "AgentMemory", "MemoryDenied", "MemoryHit", "MemoryItem", "terms"]

Mode = Literal["read", "write"]

ITEMS = Table("memory_items", (
    Column("agent", "VARCHAR", False), Column("namespace", "VARCHAR", False), Column("key", "VARCHAR", False),
    Column("text", "VARCHAR", False), Column("value", "VARCHAR", False), Column("labels", "VARCHAR", False),
    Column("trusted", "BOOLEAN", False), Column("created_at", "DOUBLE", False), Column("updated_at", "DOUBLE", False),
    Column("doc_len", "INTEGER", False),
), key=("agent", "namespace", "key"))  # fmt: skip
POSTINGS = Table("memory_postings", (
    Column("agent", "VARCHAR", False), Column("namespace", "VARCHAR", False), Column("key", "VARCHAR", False),
    Column("term", "VARCHAR", False), Column("tf", "INTEGER", False), Column("doc_len", "INTEGER", False),
), order_by=("agent", "term"), indexes=())  # fmt: skip
GRANTS = Table("memory_grants", (
    Column("owner", "VARCHAR", False), Column("grantee", "VARCHAR", False), Column("namespace", "VARCHAR", False),
    Column("mode", "VARCHAR", False), Column("granted_by", "VARCHAR", False), Column("granted_at", "DOUBLE", False),
), key=("owner", "grantee", "namespace", "mode"))  # fmt: skip

_TERM = re.compile(r"\w+", re.UNICODE)
_MAX_TERM = 64
_MAX_TERMS_PER_QUERY = 32
K1, B = 1.2, 0.75


def terms(text: str) -> list[str]:
    """Index terms of ``text``: word tokens of its normalised form, 2 to 64 characters."""
    return [t for t in _TERM.findall(normalise(text)) if 2 <= len(t) <= _MAX_TERM]


@dataclass(frozen=True)
class MemoryItem:
    """One stored item.

    Attributes:
        agent: Owner.
        namespace: Namespace within the owner's memory.
        key: Key within the namespace.
        text: The searchable text.
        value: A JSON value (None for pure documents).
        labels: Provenance of what the item was written from.
        created_at: First write (Unix time).
        updated_at: Last write (Unix time).
    """

    agent: str
    namespace: str
    key: str
    text: str
    value: Any
    labels: tuple[Label, ...]
    created_at: float
    updated_at: float

    @property
    def trusted(self) -> bool:
        """True only if every label is trusted."""
        return all(label.trusted for label in self.labels)


@dataclass(frozen=True)
class MemoryHit:
    """A search result: the item and its BM25 score."""

    item: MemoryItem
    score: float


def _labels_json(labels: Sequence[Label]) -> str:
    unique = sorted({(lb.source, lb.trusted, lb.secrecy) for lb in labels})
    return json.dumps([{"source": s, "trusted": t, **({"secrecy": c} if c else {})} for s, t, c in unique],
                      separators=(",", ":"))


def _value_json(key: str, value: Any) -> str:
    """A memory value as stored (canonical JSON).

    Raises:
        StoreError: It is not JSON.
    """
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"memory value for {key!r} is not JSON: {exc}") from exc


def _row(owner: str, namespace: str, key: str, text: str, value_json: str, labels: Sequence[Label],
         old: MemoryItem | None, now: float, doc_len: int) -> dict[str, Any]:
    """The stored row of a write (``old``: the item it replaces, whose creation time it keeps)."""
    return {"agent": owner, "namespace": namespace, "key": key, "text": text, "value": value_json,
            "labels": _labels_json(labels), "trusted": all(lb.trusted for lb in labels),
            "created_at": old.created_at if old else now, "updated_at": now, "doc_len": doc_len}


def _item(row: dict[str, Any]) -> MemoryItem:
    labels = tuple(Label(str(lb["source"]), bool(lb["trusted"]), str(lb.get("secrecy", "")))
                   for lb in json.loads(row["labels"]))
    return MemoryItem(row["agent"], row["namespace"], row["key"], row["text"], json.loads(row["value"]), labels,
                      float(row["created_at"]), float(row["updated_at"]))  # fmt: skip


class AgentMemory:
    """Agent memory on a :class:`~stitchwork.data._base.Store`.

    Args:
        store: Where the tables live (created if missing).
        audit: If given, grants, revokes and refused accesses are recorded (kind ``"memory"``).
        clock: Time source.
    """

    def __init__(self, store: Store, *, audit: Any = None, clock: Any = time.time) -> None:
        self.store = store
        self.audit = audit
        self.clock = clock
        self._lock = threading.RLock()
        for table in (ITEMS, POSTINGS, GRANTS):
            store.ensure(table)

    # ------------------------------------------------------------------------------------------ scope
    def allowed(self, agent: str, owner: str, namespace: str, mode: Mode) -> bool:
        """True if ``agent`` may ``mode`` the ``namespace`` of ``owner``'s memory."""
        if agent == owner:
            return True
        modes = ("read", "write") if mode == "read" else ("write",)
        rows = self.store.query(
            "SELECT mode FROM memory_grants WHERE owner = ? AND grantee IN (?, '*') AND namespace IN (?, '*') "
            f"AND mode IN ({', '.join('?' for _ in modes)}) LIMIT 1",
            [owner, agent, namespace, *modes],
        )
        return bool(rows)

    def _require(self, agent: str, owner: str, namespace: str, mode: Mode) -> None:
        if not self.allowed(agent, owner, namespace, mode):
            if self.audit is not None:
                self.audit.append("memory", agent=agent, tool=f"memory.{mode}", decision="deny",
                                  data={"owner": owner, "namespace": namespace, "reason": "no grant"})
            raise MemoryDenied(f"agent {agent!r} may not {mode} namespace {namespace!r} of {owner!r}'s memory "
                               "(an operator can grant it)")

    def grant(self, owner: str, grantee: str, *, namespace: str = "*", mode: Mode = "read", by: str) -> None:
        """Lets ``grantee`` (an agent, or ``*`` for every agent) ``mode`` ``owner``'s ``namespace``."""
        if mode not in ("read", "write"):
            raise StoreError(f"grant mode must be 'read' or 'write', got {mode!r}")
        self.store.execute(
            "INSERT INTO memory_grants (owner, grantee, namespace, mode, granted_by, granted_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (owner, grantee, namespace, mode) DO UPDATE SET "
            "granted_by = excluded.granted_by, granted_at = excluded.granted_at",
            [owner, grantee, namespace, mode, by, self.clock()],
        )
        if self.audit is not None:
            self.audit.append("memory", agent=owner, tool="memory.grant", decision="grant",
                              data={"grantee": grantee, "namespace": namespace, "mode": mode, "by": by})

    def revoke(self, owner: str, grantee: str, *, namespace: str = "*", mode: Mode = "read", by: str) -> None:
        """Removes one grant."""
        self.store.execute(
            "DELETE FROM memory_grants WHERE owner = ? AND grantee = ? AND namespace = ? AND mode = ?",
            [owner, grantee, namespace, mode],
        )
        if self.audit is not None:
            self.audit.append("memory", agent=owner, tool="memory.revoke", decision="revoke",
                              data={"grantee": grantee, "namespace": namespace, "mode": mode, "by": by})

    # ------------------------------------------------------------------------------------------ key-value
    def put(
        self, agent: str, key: str, *, text: str = "", value: Any = None, labels: Sequence[Label],
        namespace: str = "default", owner: str | None = None,
    ) -> MemoryItem:
        """Writes (or replaces) an item and indexes its text.

        Args:
            agent: The writing agent.
            key: Item key.
            text: Searchable text (JSON strings in ``value`` are indexed too).
            value: A JSON-serialisable value.
            labels: Provenance of what the item was written from; at least one. Untrusted content must be labelled
                untrusted: the label is returned with every read.
            namespace: Namespace.
            owner: Whose memory (default: the writer's own; another owner needs a write grant).

        Raises:
            MemoryDenied: No write grant. StoreError: no labels, or a value that is not JSON.
        """
        owner = owner or agent
        if not labels:
            raise StoreError("memory writes need at least one provenance label")
        self._require(agent, owner, namespace, "write")
        value_json = _value_json(key, value)
        now = self.clock()
        words = _words(key, text, value)
        with self._lock:
            old = self._get(owner, namespace, key)
            row = _row(owner, namespace, key, text, value_json, labels, old, now, len(words))
            self.store.execute(
                f"INSERT INTO memory_items ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)}) "
                "ON CONFLICT (agent, namespace, key) DO UPDATE SET text = excluded.text, value = excluded.value, "
                "labels = excluded.labels, trusted = excluded.trusted, updated_at = excluded.updated_at, "
                "doc_len = excluded.doc_len",
                list(row.values()),
            )
            self._index(owner, namespace, key, words, replace=old is not None)
        return _item(row)

    def put_many(
        self, agent: str, docs: Sequence[tuple[str, str]], *, labels: Sequence[Label], namespace: str = "default",
    ) -> int:
        """Writes many ``(key, text)`` documents into the agent's own memory: new keys in one insert per table,
        existing keys through :meth:`put`. Returns the number written."""
        if not labels:
            raise StoreError("memory writes need at least one provenance label")
        with self._lock:
            existing = set(self.keys(agent, namespace=namespace))
            fresh = [(k, t) for k, t in dict(docs).items() if k not in existing]
            now = self.clock()
            label_json, trusted = _labels_json(labels), all(lb.trusted for lb in labels)
            items, postings = [], []
            for key, text in fresh:
                words = _words(key, text, None)
                items.append({"agent": agent, "namespace": namespace, "key": key, "text": text, "value": "null",
                              "labels": label_json, "trusted": trusted, "created_at": now, "updated_at": now,
                              "doc_len": len(words)})
                postings += [{"agent": agent, "namespace": namespace, "key": key, "term": t, "tf": n,
                              "doc_len": len(words)} for t, n in Counter(words).items()]
            self.store.append("memory_items", items)
            self.store.append("memory_postings", postings)
            for key, text in dict(docs).items():
                if key in existing:
                    self.put(agent, key, text=text, labels=labels, namespace=namespace)
        return len(dict(docs))

    def get(self, agent: str, key: str, *, namespace: str = "default", owner: str | None = None) -> MemoryItem | None:
        """The item, or None. Raises MemoryDenied without a read grant."""
        owner = owner or agent
        self._require(agent, owner, namespace, "read")
        return self._get(owner, namespace, key)

    def delete(self, agent: str, key: str, *, namespace: str = "default", owner: str | None = None) -> bool:
        """Removes an item and its postings; True if it existed."""
        owner = owner or agent
        self._require(agent, owner, namespace, "write")
        with self._lock:
            existed = self._get(owner, namespace, key) is not None
            where = "WHERE agent = ? AND namespace = ? AND key = ?"
            self.store.execute(f"DELETE FROM memory_postings {where}", [owner, namespace, key])
            self.store.execute(f"DELETE FROM memory_items {where}", [owner, namespace, key])
        return existed

    def keys(self, agent: str, *, namespace: str = "default", owner: str | None = None) -> list[str]:
        """Keys in a namespace, sorted."""
        owner = owner or agent
        self._require(agent, owner, namespace, "read")
        rows = self.store.query("SELECT key FROM memory_items WHERE agent = ? AND namespace = ? ORDER BY key",
                                [owner, namespace])
        return [r["key"] for r in rows]

    def _get(self, owner: str, namespace: str, key: str) -> MemoryItem | None:
        rows = self.store.query("SELECT * FROM memory_items WHERE agent = ? AND namespace = ? AND key = ?",
                                [owner, namespace, key])
        return _item(rows[0]) if rows else None

    def items(self, owner: str, *, namespace: str | None = None, limit: int = 1000) -> list[MemoryItem]:
        """An owner's items, newest first (operator view: no grant check)."""
        where, params = "WHERE agent = ?", [owner]
        if namespace is not None:
            where, params = where + " AND namespace = ?", [owner, namespace]
        rows = self.store.query(f"SELECT * FROM memory_items {where} ORDER BY updated_at DESC, namespace, key LIMIT ?",
                                [*params, limit])
        return [_item(r) for r in rows]

    def owners(self) -> list[dict[str, Any]]:
        """Every agent with memory: its item count and newest write (operator view)."""
        rows = self.store.query("SELECT agent, count(*) AS items, max(updated_at) AS updated_at FROM memory_items "
                                "GROUP BY agent ORDER BY agent")
        return [{"agent": r["agent"], "items": int(r["items"]), "updated_at": float(r["updated_at"])} for r in rows]

    def grants(self, owner: str | None = None) -> list[dict[str, Any]]:
        """The grant rows (of one owner, or all)."""
        where, params = ("WHERE owner = ?", [owner]) if owner else ("", [])
        return self.store.query(f"SELECT * FROM memory_grants {where} ORDER BY owner, grantee, namespace, mode",
                                params)

    def expire(self, before: float) -> int:
        """Deletes items last written before ``before`` (Unix time) with their postings; returns how many."""
        with self._lock:
            old = self.store.query("SELECT agent, namespace, key FROM memory_items WHERE updated_at < ?", [before])
            where = "WHERE agent = ? AND namespace = ? AND key = ?"
            for row in old:
                params = [row["agent"], row["namespace"], row["key"]]
                self.store.execute(f"DELETE FROM memory_postings {where}", params)
            if old:
                self.store.execute("DELETE FROM memory_items WHERE updated_at < ?", [before])
        return len(old)

    # ------------------------------------------------------------------------------------------ search
    def _index(self, owner: str, namespace: str, key: str, words: list[str], *, replace: bool) -> None:
        if replace:
            self.store.execute("DELETE FROM memory_postings WHERE agent = ? AND namespace = ? AND key = ?",
                               [owner, namespace, key])
        counts = Counter(words)
        rows = [{"agent": owner, "namespace": namespace, "key": key, "term": t, "tf": n, "doc_len": len(words)}
                for t, n in counts.items()]
        self.store.append("memory_postings", rows)

    def reindex(self) -> int:
        """Rebuilds every posting from the items; returns the number of items indexed."""
        with self._lock:
            self.store.execute("DELETE FROM memory_postings WHERE true")
            rows = self.store.query("SELECT agent, namespace, key, text, value FROM memory_items")
            for row in rows:
                words = _words(row["key"], row["text"], json.loads(row["value"]))
                self._index(row["agent"], row["namespace"], row["key"], words, replace=False)
        return len(rows)

    def search(
        self, agent: str, query: str, *, owners: Iterable[str] = (), namespace: str | None = None, limit: int = 10,
        own: bool = True,
    ) -> list[MemoryHit]:
        """Items matching ``query`` (any term), best first, from the agent's own memory (unless ``own`` is false)
        and ``owners`` it may read.

        Raises:
            MemoryDenied: ``owners`` names memory the agent has no read grant for.
        """
        wanted = list(dict.fromkeys(terms(query)))[:_MAX_TERMS_PER_QUERY]
        scopes = list(dict.fromkeys([agent, *owners] if own else owners))
        for owner in scopes:
            if namespace is not None:
                self._require(agent, owner, namespace, "read")
            else:
                self._require_any(agent, owner)
        if not wanted:
            return []
        hits: list[MemoryHit] = []
        for owner in scopes:
            hits.extend(self._search_owner(agent, owner, wanted, namespace, limit))
        hits.sort(key=lambda h: (-h.score, h.item.agent, h.item.namespace, h.item.key))
        return hits[:limit]

    def _require_any(self, agent: str, owner: str) -> None:
        if agent == owner:
            return
        if not self.store.query("SELECT mode FROM memory_grants WHERE owner = ? AND grantee IN (?, '*') LIMIT 1",
                                [owner, agent]):
            self._require(agent, owner, "*", "read")

    def _namespaces(self, agent: str, owner: str) -> list[str] | None:
        """Namespaces of ``owner`` that ``agent`` may read; None for all."""
        if agent == owner:
            return None
        rows = self.store.query("SELECT namespace FROM memory_grants WHERE owner = ? AND grantee IN (?, '*')",
                                [owner, agent])
        names = [r["namespace"] for r in rows]
        return None if "*" in names else names

    def _search_owner(
        self, agent: str, owner: str, wanted: list[str], namespace: str | None, limit: int
    ) -> list[MemoryHit]:
        readable = self._namespaces(agent, owner)
        if namespace is not None:
            spaces: list[str] | None = [namespace]
        else:
            spaces = readable
        ns_sql, ns_params = "", []
        if spaces is not None:
            ns_sql = f" AND namespace IN ({', '.join('?' for _ in spaces)})"
            ns_params = list(spaces)
        stats = self.store.query(
            f"SELECT count(*) AS n, avg(doc_len) AS avgdl FROM memory_items WHERE agent = ?{ns_sql}",
            [owner, *ns_params],
        )[0]
        n_docs, avgdl = int(stats["n"] or 0), float(stats["avgdl"] or 1.0)
        if n_docs == 0:
            return []
        marks = ", ".join("?" for _ in wanted)
        rows = self.store.query(
            "WITH p AS (SELECT namespace, key, term, tf, doc_len FROM memory_postings "
            f"WHERE agent = ?{ns_sql} AND term IN ({marks})), d AS (SELECT term, count(*) AS df FROM p GROUP BY term) "
            f"SELECT namespace, key, sum(ln(1 + (? - df + 0.5) / (df + 0.5)) * tf * {K1 + 1} / "
            f"(tf + {K1} * (1 - {B} + {B} * doc_len / ?))) AS score FROM p JOIN d USING (term) "
            "GROUP BY namespace, key ORDER BY score DESC, namespace, key LIMIT ?",
            [owner, *ns_params, *wanted, n_docs, avgdl, limit],
        )
        if not rows:
            return []
        found = self.store.query(
            f"SELECT * FROM memory_items WHERE agent = ? AND key IN ({', '.join('?' for _ in rows)})",
            [owner, *(r["key"] for r in rows)],
        )
        items = {(r["namespace"], r["key"]): _item(r) for r in found}
        # postings of an item deleted under a crash have no item: they are skipped
        return [MemoryHit(items[(r["namespace"], r["key"])], float(r["score"])) for r in rows
                if (r["namespace"], r["key"]) in items]


def _words(key: str, text: str, value: Any) -> list[str]:
    return terms(" ".join([key, text, *_strings(value)]))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
