"""The ``stitchwork`` command line: one Typer app, its command groups registered from an explicit list."""

from __future__ import annotations

from collections.abc import Callable

import typer

from stitchwork.interfaces.cli import (
    approvals,
    audit,
    demo,
    eval,
    mcp,
    memory,
    runs,
    sandbox,
    secrets,
    server,
    sessions,
    workers,
)

REGISTRATIONS: tuple[Callable[[typer.Typer], None], ...] = (
    server.register,  # up
    runs.register,  # run
    approvals.register,  # approvals, approve, deny
    demo.register,  # demo
    workers.register,  # worker, submit, kafka-export, runs dead|resubmit
    sandbox.register,  # sandbox run|prepare|bench, doctor
    audit.register,  # audit tail|query|verify|report|export|compact, data retention
    secrets.register,  # secrets set|list|rm
    memory.register,  # memory ls|search|grant|revoke|grants
    eval.register,  # eval agentdojo
    sessions.register,  # session open|renew|close|show|ls
    mcp.register,  # mcp serve --stdio
)
"""Every command group, in the order ``--help`` lists them. A new group is one line here."""


def build() -> typer.Typer:
    """The command line with every group of :data:`REGISTRATIONS`."""
    app = typer.Typer(help="Stitchwork: run autonomous agents safely.", no_args_is_help=True,
                      pretty_exceptions_enable=False, add_completion=False)
    for register in REGISTRATIONS:
        register(app)
    return app


app = build()


def main() -> None:
    app()


__all__ = ["REGISTRATIONS", "app", "build", "main"]
