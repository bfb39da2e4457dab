"""The ``stitchwork`` command line: one Typer app, its command groups registered from an explicit list."""

from __future__ import annotations

from collections.abc import Callable

import typer

from stitchwork.interfaces.cli import (
    approvals,
    audit,
    data,
    demo,
    eval,
    mcp,
    memory,
    runs,
    sandbox,
    secrets,
    server,
    sessions,
    undo,
    workers,
)
from stitchwork.interfaces.cli._common import EXIT_CODES_HELP, ExitCode, err, missing_extra

REGISTRATIONS: tuple[Callable[[typer.Typer], None], ...] = (
    server.register,  # up
    runs.register,  # run, runs ls|show
    undo.register,  # undo RUN [--call ID]
    approvals.register,  # approvals, approve, deny
    demo.register,  # demo
    workers.register,  # worker, submit, kafka-export, runs dead|resubmit
    sandbox.register,  # sandbox run|prepare|bench, doctor
    audit.register,  # audit tail|query|verify|report
    data.register,  # data retention|export|compact (and the hidden old spellings audit export|compact)
    secrets.register,  # secrets set|list|rm
    memory.register,  # memory ls|search|grant|revoke|grants
    eval.register,  # eval agentdojo
    sessions.register,  # session open|renew|close|show|ls
    mcp.register,  # mcp serve --stdio
)
"""Every command group, in the order ``--help`` lists them. A new group is one line here."""


EPILOG = (
    f"{EXIT_CODES_HELP} Remote mode: STITCHWORK_URL (e.g. http://host:8470) and STITCHWORK_TOKEN (the operator "
    "token) point every command at a running `stitchwork up`; the light install (pip install stitchwork) needs "
    "nothing else."
)


def build() -> typer.Typer:
    """The command line with every group of :data:`REGISTRATIONS`."""
    app = typer.Typer(help="Stitchwork: run autonomous agents safely.", epilog=EPILOG, no_args_is_help=True,
                      pretty_exceptions_enable=False, add_completion=False,
                      rich_markup_mode=None)  # help shows config names such as [data.retention] as written
    for register in REGISTRATIONS:
        register(app)
    return app


app = build()


def main() -> None:
    """The ``stitchwork`` script. A server-side package missing from a light install (``pip install stitchwork``
    without extras) ends the command with exit 2 and the extra that provides it, never a traceback."""
    try:
        app()
    except ImportError as exc:
        err.print(f"error: {missing_extra(exc, 'this command')}", markup=False)
        raise SystemExit(ExitCode.USAGE) from None


__all__ = ["REGISTRATIONS", "app", "build", "main"]
