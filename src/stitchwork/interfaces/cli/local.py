"""The CLI without a server: each operation opens the platform in this process (the ``server`` extra).

Imported only when no ``stitchwork up`` is running (:func:`stitchwork.interfaces.cli.client.connect`), so the light
client install never loads DuckDB, Cedar or wasmtime.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from stitchwork.config import Config
from stitchwork.platform import Platform
from stitchwork.service import Service, memory

T = TypeVar("T")


class LocalClient:
    """Opens the platform in this process for each operation."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def _with(self, fn: Callable[[Service], Awaitable[T]], *, bus_approvals: bool = False) -> T:
        async def go() -> T:
            platform = Platform.open(self.config, bus_approvals=bus_approvals)
            try:
                return await fn(Service(platform))
            finally:
                await platform.aclose()

        return asyncio.run(go())

    def run(self, agent: str, task: str, model: str | None) -> dict[str, Any]:
        return self._with(lambda s: s.run(agent, task, model=model))

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._with(lambda s: _now(s.get_run(run_id)))

    def run_calls(self, run_id: str) -> list[dict[str, Any]]:
        return self._with(lambda s: s.run_calls(run_id), bus_approvals=True)

    def undo(self, run_id: str, call: str | None = None) -> dict[str, Any]:
        return self._with(lambda s: s.undo(run_id, call=call, by="operator:cli"), bus_approvals=True)

    def list_runs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.list_runs(limit=limit, status=status)))

    def approvals(self, status: str) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.approvals(status)), bus_approvals=True)

    def decide(self, approval_id: str, approve: bool, note: str) -> dict[str, Any]:
        return self._with(lambda s: s.decide(approval_id, approve=approve, by="operator:cli", note=note),
                          bus_approvals=True)

    def memory_list(self, agent: str | None, namespace: str | None, limit: int) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(memory.list_memory(s.platform, agent, namespace, limit)))

    def memory_search(self, agent: str, query: str, limit: int) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(memory.search(s.platform, agent, query, limit)))

    def memory_grant(self, owner: str, grantee: str, namespace: str, mode: Literal["read", "write"], *,
                     revoke: bool = False) -> Any:
        change = memory.revoke if revoke else memory.grant
        return self._with(lambda s: _now(change(s.platform, owner, grantee, namespace=namespace, mode=mode,
                                                by="operator:cli")))

    def memory_grants(self, owner: str | None) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(memory.grants(s.platform, owner)))

    def audit_tail(self, n: int) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.audit_tail(n)))

    def audit_query(self, sql: str) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.audit_query(sql)))

    def audit_verify(self) -> dict[str, Any]:
        return self._with(lambda s: _now(s.audit_verify()))

    def audit_report(self, name: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.audit_report(name, since, until)))

    def audit_export(self, to: str, since: float | None = None) -> dict[str, Any]:
        return self._with(lambda s: _now(s.audit_export(to, since)))

    def audit_compact(self, to: str, older_than_days: float | None = None, upto_seq: int | None = None
                      ) -> dict[str, Any]:
        return self._with(lambda s: _now(s.audit_compact(to, older_than_days, upto_seq)))

    def data_retention(self) -> dict[str, int]:
        return self._with(lambda s: _now(s.data_retention()))

    def secret_set(self, name: str, value: str) -> None:
        self._with(lambda s: s.secret_set(name, value, by="operator:cli"))

    def secret_names(self) -> list[str]:
        return self._with(lambda s: _now(s.secret_names()))

    def secret_delete(self, name: str) -> None:
        self._with(lambda s: s.secret_delete(name, by="operator:cli"))

    def session_open(self, agent: str, task: str, ttl_s: int | None = None) -> dict[str, Any]:
        async def go(service: Service) -> dict[str, Any]:
            info = await service.sessions.open(agent, task, ttl_s=ttl_s, by="operator:cli")
            return info.to_dict()

        return self._with(go)

    def session_renew(self, run_id: str, ttl_s: int | None = None) -> dict[str, Any]:
        async def go(service: Service) -> dict[str, Any]:
            info = await service.sessions.renew(run_id, ttl_s=ttl_s, by="operator:cli")
            return info.to_dict()

        return self._with(go)

    def session_close(self, run_id: str) -> dict[str, Any]:
        return self._with(lambda s: s.sessions.close(run_id, by="operator:cli"))

    def session_show(self, run_id: str) -> dict[str, Any]:
        return self._with(lambda s: _now(s.sessions.describe(run_id)))

    def sessions(self, include_closed: bool = False) -> list[dict[str, Any]]:
        return self._with(lambda s: _now(s.sessions.find(include_closed=include_closed)))


async def _now(value: T) -> T:
    return value


__all__ = ["LocalClient"]
