"""Agent memory and its grants on the bus: one memory for every worker and the platform (``[data] memory = "bus"``).

The same interface and rules as :class:`~stitchwork.memory.store.AgentMemory` (provenance labels on every item,
scope by grants, BM25 search with the same formula), kept as keys on the bus instead of tables in one process's
database, so a run resumed on another worker reads what it wrote and the grants an operator gave:

===================================================  ===========================================================
``<p>mem.<owner>.<digest(namespace, key)>``          the item's newest state (``deleted`` when removed)
``<p>memgrant.<owner>.<digest(grantee, ns, mode)>``  one grant's newest state (``revoked`` when removed)
===================================================  ===========================================================

(``<owner>`` is the agent name as one subject token with a digest of the exact name.) Only the newest message of
each subject is kept. Search reads the owner's items and scores them in this process: fine for the thousands of
items an agent keeps, not for millions (use a shared store for those).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from stitchwork.errors import StoreError
from stitchwork.memory.store import (
    K1,
    AgentMemory,
    B,
    MemoryHit,
    MemoryItem,
    Mode,
    _item,
    _row,
    _value_json,
    _words,
)
from stitchwork.messaging.bridge import SyncBus
from stitchwork.security.taint import Label


def owner_token(name: str) -> str:
    """An agent name as one subject token: readable part plus a digest of the exact name."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:40] or "_"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:40]


class BusMemory(AgentMemory):
    """:class:`~stitchwork.memory.store.AgentMemory` on the bus (see the module docstring).

    Args:
        bus: a synchronous bus connection (memory tools are called synchronously).
        prefix: the installation's subject prefix (``[messaging] subject_prefix``).
        audit: If given, grants, revokes and refused accesses are recorded (kind ``"memory"``).
        clock: Time source.
    """

    def __init__(self, bus: SyncBus, *, prefix: str = "sw", audit: Any = None, clock: Any = time.time) -> None:
        # The database-backed parent is not initialised: every method that touches data is replaced here.
        self.bus = bus
        self.prefix = prefix
        self.audit = audit
        self.clock = clock
        self._lock = threading.RLock()
        self._bounded = False

    # ------------------------------------------------------------------------------------------ subjects
    def _item_subject(self, owner: str, namespace: str, key: str) -> str:
        return f"{self.prefix}mem.{owner_token(owner)}.{_digest(namespace, key)}"

    def _grant_subject(self, owner: str, grantee: str, namespace: str, mode: str) -> str:
        return f"{self.prefix}memgrant.{owner_token(owner)}.{_digest(grantee, namespace, mode)}"

    def _publish(self, subject: str, doc: dict[str, Any]) -> None:
        if not self._bounded:  # only the newest state of each key matters
            self._bounded = True
            for stream in (f"{self.prefix}mem._", f"{self.prefix}memgrant._"):
                self.bus.keep_last(stream, 1)
        self.bus.publish(subject, json.dumps(doc, ensure_ascii=False, sort_keys=True).encode())

    def _docs(self, pattern: str) -> list[dict[str, Any]]:
        found = []
        for delivery in self.bus.latest(pattern):
            doc = json.loads(delivery.data)
            if isinstance(doc, dict) and not doc.get("deleted"):
                found.append(doc)
        return found

    def _owner_rows(self, owner: str) -> list[dict[str, Any]]:
        return [d for d in self._docs(f"{self.prefix}mem.{owner_token(owner)}.*") if d.get("agent") == owner]

    def _grant_rows(self, owner: str | None = None) -> list[dict[str, Any]]:
        pattern = f"{self.prefix}memgrant.{owner_token(owner) if owner else '*'}.*"
        return [d for d in self._docs(pattern) if owner is None or d.get("owner") == owner]

    # ------------------------------------------------------------------------------------------ scope
    def allowed(self, agent: str, owner: str, namespace: str, mode: Mode) -> bool:
        if agent == owner:
            return True
        modes = ("read", "write") if mode == "read" else ("write",)
        return any(g["grantee"] in (agent, "*") and g["namespace"] in (namespace, "*") and g["mode"] in modes
                   for g in self._grant_rows(owner))

    def grant(self, owner: str, grantee: str, *, namespace: str = "*", mode: Mode = "read", by: str) -> None:
        if mode not in ("read", "write"):
            raise StoreError(f"grant mode must be 'read' or 'write', got {mode!r}")
        self._publish(self._grant_subject(owner, grantee, namespace, mode),
                      {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode, "granted_by": by,
                       "granted_at": self.clock()})
        if self.audit is not None:
            self.audit.append("memory", agent=owner, tool="memory.grant", decision="grant",
                              data={"grantee": grantee, "namespace": namespace, "mode": mode, "by": by})

    def revoke(self, owner: str, grantee: str, *, namespace: str = "*", mode: Mode = "read", by: str) -> None:
        self._publish(self._grant_subject(owner, grantee, namespace, mode),
                      {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode, "deleted": True})
        if self.audit is not None:
            self.audit.append("memory", agent=owner, tool="memory.revoke", decision="revoke",
                              data={"grantee": grantee, "namespace": namespace, "mode": mode, "by": by})

    def _require_any(self, agent: str, owner: str) -> None:
        if agent == owner:
            return
        if not any(g["grantee"] in (agent, "*") for g in self._grant_rows(owner)):
            self._require(agent, owner, "*", "read")

    def _namespaces(self, agent: str, owner: str) -> list[str] | None:
        if agent == owner:
            return None
        names = [g["namespace"] for g in self._grant_rows(owner) if g["grantee"] in (agent, "*")]
        return None if "*" in names else names

    # ------------------------------------------------------------------------------------------ key-value
    def put(
        self, agent: str, key: str, *, text: str = "", value: Any = None, labels: Sequence[Label],
        namespace: str = "default", owner: str | None = None,
    ) -> MemoryItem:
        owner = owner or agent
        if not labels:
            raise StoreError("memory writes need at least one provenance label")
        self._require(agent, owner, namespace, "write")
        value_json = _value_json(key, value)
        now = self.clock()
        words = _words(key, text, value)
        with self._lock:
            old = self._get(owner, namespace, key)
            row = {**_row(owner, namespace, key, text, value_json, labels, old, now, len(words)),
                   "terms": dict(Counter(words))}
            self._publish(self._item_subject(owner, namespace, key), row)
        return _item(row)

    def put_many(
        self, agent: str, docs: Sequence[tuple[str, str]], *, labels: Sequence[Label], namespace: str = "default",
    ) -> int:
        if not labels:
            raise StoreError("memory writes need at least one provenance label")
        for key, text in dict(docs).items():
            self.put(agent, key, text=text, labels=labels, namespace=namespace)
        return len(dict(docs))

    def delete(self, agent: str, key: str, *, namespace: str = "default", owner: str | None = None) -> bool:
        owner = owner or agent
        self._require(agent, owner, namespace, "write")
        with self._lock:
            existed = self._get(owner, namespace, key) is not None
            if existed:
                self._publish(self._item_subject(owner, namespace, key),
                              {"agent": owner, "namespace": namespace, "key": key, "deleted": True})
        return existed

    def keys(self, agent: str, *, namespace: str = "default", owner: str | None = None) -> list[str]:
        owner = owner or agent
        self._require(agent, owner, namespace, "read")
        return sorted(r["key"] for r in self._owner_rows(owner) if r["namespace"] == namespace)

    def _get(self, owner: str, namespace: str, key: str) -> MemoryItem | None:
        found = self.bus.last(self._item_subject(owner, namespace, key))
        if found is None:
            return None
        row = json.loads(found.data)
        return None if row.get("deleted") else _item(row)

    def items(self, owner: str, *, namespace: str | None = None, limit: int = 1000) -> list[MemoryItem]:
        rows = [r for r in self._owner_rows(owner) if namespace is None or r["namespace"] == namespace]
        rows.sort(key=lambda r: (-float(r["updated_at"]), r["namespace"], r["key"]))
        return [_item(r) for r in rows[:limit]]

    def owners(self) -> list[dict[str, Any]]:
        by_owner: dict[str, list[float]] = {}
        for row in self._docs(f"{self.prefix}mem.*.*"):
            by_owner.setdefault(str(row["agent"]), []).append(float(row["updated_at"]))
        return [{"agent": a, "items": len(t), "updated_at": max(t)} for a, t in sorted(by_owner.items())]

    def grants(self, owner: str | None = None) -> list[dict[str, Any]]:
        rows = [{k: g[k] for k in ("owner", "grantee", "namespace", "mode", "granted_by", "granted_at")}
                for g in self._grant_rows(owner)]
        return sorted(rows, key=lambda g: (g["owner"], g["grantee"], g["namespace"], g["mode"]))

    def expire(self, before: float) -> int:
        old = [r for r in self._docs(f"{self.prefix}mem.*.*") if float(r["updated_at"]) < before]
        for row in old:
            self._publish(self._item_subject(row["agent"], row["namespace"], row["key"]),
                          {"agent": row["agent"], "namespace": row["namespace"], "key": row["key"], "deleted": True})
        return len(old)

    # ------------------------------------------------------------------------------------------ search
    def reindex(self) -> int:
        """Nothing to rebuild: each item carries its own terms. Returns the number of items."""
        return len(self._docs(f"{self.prefix}mem.*.*"))

    def _search_owner(
        self, agent: str, owner: str, wanted: list[str], namespace: str | None, limit: int
    ) -> list[MemoryHit]:
        """BM25 over ``owner``'s items in this process (:meth:`AgentMemory.search` checks access and merges owners)."""
        spaces = [namespace] if namespace is not None else self._namespaces(agent, owner)
        rows = [r for r in self._owner_rows(owner) if spaces is None or r["namespace"] in spaces]
        return _bm25(rows, wanted)[:limit]


def _bm25(rows: list[dict[str, Any]], wanted: list[str]) -> list[MemoryHit]:
    """The store's BM25 (same k1, b and idf) over ``rows``, best first."""
    if not rows:
        return []
    n_docs = len(rows)
    avgdl = sum(int(r["doc_len"]) for r in rows) / n_docs or 1.0
    df = Counter(t for r in rows for t in wanted if t in r.get("terms", {}))
    hits = []
    for row in rows:
        tfs = row.get("terms", {})
        score = 0.0
        for term in wanted:
            tf = tfs.get(term, 0)
            if tf:
                idf = math.log(1 + (n_docs - df[term] + 0.5) / (df[term] + 0.5))
                score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * int(row["doc_len"]) / avgdl))
        if score > 0 or any(t in tfs for t in wanted):
            hits.append(MemoryHit(_item(row), score))
    hits.sort(key=lambda h: (-h.score, h.item.namespace, h.item.key))
    return hits


__all__ = ["BusMemory", "owner_token"]
