"""``stitchwork memory ls | search | grant | revoke | grants``: the operator's view of agent memory.

Each command goes through the API when ``stitchwork up`` runs (DuckDB has one writer), otherwise it opens the
platform in this process (:mod:`stitchwork.service.memory` does the work either way).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer

from stitchwork.errors import StitchworkError

if TYPE_CHECKING:
    from stitchwork.config import Config
    from stitchwork.platform import Platform

__all__ = ["register"]


def _call(config: Config, method: str, path: str, local: Callable[[Platform], Any], **http: Any) -> Any:
    """``method path`` on the running server, else ``local(platform)`` on a platform opened here."""
    from stitchwork.interfaces.cli.client import HttpClient, connect

    client = connect(config)
    if isinstance(client, HttpClient):
        return client._call(method, path, **http)

    async def run(service: Any) -> Any:
        return local(service.platform)

    return client._with(run)


def register(app: typer.Typer) -> None:
    """Adds the ``memory`` command group."""
    from stitchwork.interfaces.cli._common import (
        ConfigOpt,
        FormatOpt,
        JsonOpt,
        config_from,
        console,
        fail,
        output_format,
        print_rows,
    )

    class _Api:  # stitchwork.service.memory, imported only when the platform opens in this process
        def __getattr__(self, name: str) -> Any:
            from stitchwork.service import memory

            return getattr(memory, name)

    api = _Api()

    memory_app = typer.Typer(help="Agent memory: list, search, and who may read whose.", no_args_is_help=True)
    app.add_typer(memory_app, name="memory")

    @memory_app.command("ls")
    def memory_ls(
        agent: str = typer.Argument(None, help="An agent: list its items (default: list agents with memory)."),
        namespace: str = typer.Option(None, "--namespace", "-n", help="Only this namespace."),
        limit: int = typer.Option(100, "--limit", help="Most items shown."),
        fmt: str = FormatOpt,
        as_json: bool = JsonOpt,
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Agents with memory, or one agent's items (newest first) with their provenance."""
        path = "/v1/memory" if agent is None else f"/v1/memory/{agent}"
        params = {k: v for k, v in (("namespace", namespace), ("limit", limit)) if v is not None and agent}
        try:
            rows = _call(config_from(config_path), "GET", path, lambda p: api.list_memory(p, agent, namespace, limit),
                         params=params)
        except StitchworkError as exc:
            fail(exc)
        print_rows(rows, output_format(fmt, as_json), title="memory" if agent is None else f"memory of {agent}",
                   empty="no agent has memory yet" if agent is None else f"no memory items for {agent}")

    @memory_app.command("search")
    def memory_search(
        agent: str = typer.Argument(..., help="Whose memory."),
        query: str = typer.Argument(..., help="Words to look for (BM25, any term)."),
        limit: int = typer.Option(10, "--limit"),
        fmt: str = FormatOpt,
        as_json: bool = JsonOpt,
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Full-text search of one agent's memory."""
        try:
            rows = _call(config_from(config_path), "GET", f"/v1/memory/{agent}/search",
                         lambda p: api.search(p, agent, query, limit), params={"q": query, "limit": limit})
        except StitchworkError as exc:
            fail(exc)
        print_rows(rows, output_format(fmt, as_json), title=f"memory of {agent}: {query}",
                   empty=f"nothing in {agent}'s memory matches {query!r}")

    def _change(verb: str, owner: str, grantee: str, namespace: str, write: bool, config_path: Path | None) -> None:
        mode: Literal["read", "write"] = "write" if write else "read"
        body = {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode}
        path = "/v1/memory/grants" if verb == "grant" else "/v1/memory/grants/revoke"
        fn = api.grant if verb == "grant" else api.revoke
        try:
            _call(config_from(config_path), "POST", path,
                  lambda p: fn(p, owner, grantee, namespace=namespace, mode=mode, by="operator:cli"), json=body)
        except StitchworkError as exc:
            fail(exc)
        what = f"{mode} {owner}'s memory" + ("" if namespace == "*" else f" (namespace {namespace})")
        console.print(f"{grantee} may {what}" if verb == "grant" else f"{grantee} may no longer {what}", markup=False)

    namespace_opt = typer.Option("*", "--namespace", "-n", help="One namespace (default: all).")
    write_opt = typer.Option(False, "--write", help="A write grant (the memory tools write only one's own memory).")

    @memory_app.command("grant")
    def memory_grant(
        owner: str = typer.Argument(..., help="Whose memory."),
        grantee: str = typer.Argument(..., help="The agent that may read it ('*': every agent)."),
        namespace: str = namespace_opt,
        write: bool = write_opt,
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Let GRANTEE read OWNER's memory. Its reads also need a Cedar permit (see policies/read.cedar)."""
        _change("grant", owner, grantee, namespace, write, config_path)

    @memory_app.command("revoke")
    def memory_revoke(
        owner: str = typer.Argument(..., help="Whose memory."),
        grantee: str = typer.Argument(..., help="The agent losing access."),
        namespace: str = namespace_opt,
        write: bool = write_opt,
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Remove a grant."""
        _change("revoke", owner, grantee, namespace, write, config_path)

    @memory_app.command("grants")
    def memory_grants(
        owner: str = typer.Argument(None, help="Only this owner's grants."),
        fmt: str = FormatOpt,
        as_json: bool = JsonOpt,
        config_path: Path | None = ConfigOpt,
    ) -> None:
        """Who may read whose memory."""
        try:
            rows = _call(config_from(config_path), "GET", "/v1/memory/grants", lambda p: api.grants(p, owner),
                         params={"owner": owner} if owner else {})
        except StitchworkError as exc:
            fail(exc)
        print_rows(rows, output_format(fmt, as_json), title="memory grants",
                   empty="no memory grants" + (f" for {owner}'s memory" if owner else ""))
