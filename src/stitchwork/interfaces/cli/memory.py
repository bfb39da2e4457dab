"""``stitchwork memory ls | search | grant | revoke | grants``: the operator's view of agent memory.

Each command goes through the API when ``stitchwork up`` runs (DuckDB has one writer), otherwise it opens the
platform in this process (:mod:`stitchwork.service.memory` does the work either way).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer

from stitchwork.errors import StitchworkError

if TYPE_CHECKING:
    from stitchwork.interfaces.cli.client import HttpClient
    from stitchwork.interfaces.cli.local import LocalClient

__all__ = ["register"]


def _client(config_path: Path | None) -> HttpClient | LocalClient:
    """The running server's HTTP client, else a client opening the platform in this process."""
    from stitchwork.interfaces.cli._common import config_from
    from stitchwork.interfaces.cli.client import connect

    return connect(config_from(config_path))


def register(app: typer.Typer) -> None:
    """Adds the ``memory`` command group."""
    from stitchwork.interfaces.cli._common import (
        ConfigOpt,
        FormatOpt,
        JsonOpt,
        console,
        fail,
        output_format,
        print_rows,
    )

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
        try:
            rows = _client(config_path).memory_list(agent, namespace, limit)
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
            rows = _client(config_path).memory_search(agent, query, limit)
        except StitchworkError as exc:
            fail(exc)
        print_rows(rows, output_format(fmt, as_json), title=f"memory of {agent}: {query}",
                   empty=f"nothing in {agent}'s memory matches {query!r}")

    def _change(verb: str, owner: str, grantee: str, namespace: str, write: bool, config_path: Path | None) -> None:
        mode: Literal["read", "write"] = "write" if write else "read"
        try:
            _client(config_path).memory_grant(owner, grantee, namespace, mode, revoke=verb == "revoke")
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
            rows = _client(config_path).memory_grants(owner)
        except StitchworkError as exc:
            fail(exc)
        print_rows(rows, output_format(fmt, as_json), title="memory grants",
                   empty="no memory grants" + (f" for {owner}'s memory" if owner else ""))
