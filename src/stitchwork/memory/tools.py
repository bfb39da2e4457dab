"""Agent memory as gateway tools: ``memory_put``, ``memory_get``, ``memory_search``, ``memory_delete``.

The tools are host-side (:mod:`stitchwork.tools.host`): their manifests are in ``memory/manifests/`` and every call
takes the gateway path (identity, Cedar policy, taint, approval, audit). The handlers here only translate a call into
:class:`~stitchwork.memory.store.AgentMemory` operations, with the agent taken from the verified run token.

Provenance. A write stores the labels of the untrusted content the run had seen when it wrote (all of it: a
model's paraphrase escapes value matching, so the whole tainted context is the honest label), and the secrecy labels
of the confidential content it had seen, or that the write declares (``confidential = true``); a write from a run
that has seen only trusted, public content is labelled ``agent:<name>`` (trusted). A read gives back the stored
labels, which the gateway adds to the reading run's provenance, so an injection saved in one run is still untrusted
in the next (and a confidential value still confidential).
What an agent reads from *another* agent's memory is also labelled ``memory:<owner>`` (untrusted): that agent's
user is not necessarily this one's (an operator can trust it with ``[security] trusted_sources``).

Scope. Agents write and delete only their own memory. Reading another agent's memory (``memory_owner``) needs
both an operator's grant (``stitchwork memory grant OWNER GRANTEE``, checked here) and a Cedar permit: the
default pack's ``read-permit`` does not cover it (see ``policies/read.cedar``). Granting is an operator action
(CLI and HTTP API), not a tool: an agent able to grant could be talked into opening its memory by an injection.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from stitchwork.memory.store import AgentMemory, MemoryHit, MemoryItem
from stitchwork.security.taint import Label
from stitchwork.tools.host import HostCall, HostHandler, HostResult

__all__ = ["MAX_LABELS", "TOOLS_DIR", "MemoryTools"]

TOOLS_DIR = Path(__file__).resolve().parent / "manifests"
"""The manifests of the memory tools."""
MAX_LABELS = 32
"""Most provenance labels stored with one item (the first ones the run saw)."""
_ACK = (Label("tool:memory", True),)


def _item_dict(item: MemoryItem) -> dict[str, Any]:
    return {
        "owner": item.agent, "namespace": item.namespace, "key": item.key, "text": item.text, "value": item.value,
        "trusted": item.trusted, "updated_at": item.updated_at,
    }


class MemoryTools:
    """The handlers of the memory tools over one :class:`AgentMemory`.

    Args:
        memory: The store of every agent's memory.
    """

    HANDLERS = ("memory.put", "memory.get", "memory.search", "memory.delete")
    """The handler names the manifests in ``memory/manifests/`` give as ``host``."""

    def __init__(self, memory: AgentMemory) -> None:
        self.memory = memory

    def handlers(self) -> dict[str, HostHandler]:
        """Handler name (the manifests' ``host``) to handler."""
        return {"memory.put": self.put, "memory.get": self.get, "memory.search": self.search,
                "memory.delete": self.delete}

    def _read_labels(self, call: HostCall, owner: str, items: list[MemoryItem]) -> tuple[Label, ...]:
        labels = [lb for item in items for lb in item.labels]
        if owner != call.agent:
            labels.append(Label(f"memory:{owner}", False))
        return tuple(dict.fromkeys(labels)) or _ACK

    async def put(self, call: HostCall) -> HostResult:
        """``memory_put``: writes into the caller's own memory with the run's provenance."""
        args = call.arguments
        labels = call.provenance[:MAX_LABELS] or (Label(f"agent:{call.agent}", True),)
        if args.get("confidential") is True:
            labels = (*labels, Label(f"memory:{call.agent}", True, "confidential"))
        item = await asyncio.to_thread(
            self.memory.put, call.agent, str(args["key"]), text=str(args.get("text", "")), value=args.get("value"),
            labels=labels, namespace=str(args.get("namespace", "default")),
        )
        # No argument is echoed back: an acknowledgement labelled trusted must not ground an untrusted key.
        return HostResult({"stored": True, "trusted": item.trusted}, _ACK)

    async def get(self, call: HostCall) -> HostResult:
        """``memory_get``: one item of the caller's memory, or of ``memory_owner``'s with a grant."""
        args = call.arguments
        owner = str(args.get("memory_owner") or call.agent)
        item = await asyncio.to_thread(self.memory.get, call.agent, str(args["key"]),
                                       namespace=str(args.get("namespace", "default")), owner=owner)
        if item is None:
            return HostResult({"found": False}, _ACK)
        return HostResult({"found": True, **_item_dict(item)}, self._read_labels(call, owner, [item]))

    async def search(self, call: HostCall) -> HostResult:
        """``memory_search``: BM25 search of the caller's memory, or of ``memory_owner``'s with a grant."""
        args = call.arguments
        owner = str(args.get("memory_owner") or call.agent)
        namespace = args.get("namespace")

        def run() -> list[MemoryHit]:
            return self.memory.search(call.agent, str(args["query"]), owners=[owner], namespace=namespace,
                                      limit=int(args.get("limit", 10)), own=owner == call.agent)

        hits = await asyncio.to_thread(run)
        value = {"hits": [{**_item_dict(h.item), "score": round(h.score, 4)} for h in hits]}
        return HostResult(value, self._read_labels(call, owner, [h.item for h in hits]))

    async def delete(self, call: HostCall) -> HostResult:
        """``memory_delete``: removes one item of the caller's own memory."""
        args = call.arguments
        existed = await asyncio.to_thread(self.memory.delete, call.agent, str(args["key"]),
                                          namespace=str(args.get("namespace", "default")))
        return HostResult({"deleted": existed}, _ACK)
