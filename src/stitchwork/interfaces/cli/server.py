"""``stitchwork up``: serve the control plane."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import ConfigOpt, config_from, console, err, escape, fail, server_side


def up(
    host: str = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port (default 8470)."),
    config_path: Path | None = ConfigOpt,
) -> None:
    """Serve the control plane (HTTP API + OpenAPI) until interrupted."""
    server_side("uvicorn", "stitchwork up")  # names the extra to install when the server side is missing
    server_side("stitchwork.interfaces.http.app", "stitchwork up")
    start_local_bus = server_side("stitchwork.messaging.embedded", "stitchwork up").start_local_bus
    Platform = server_side("stitchwork.platform", "stitchwork up").Platform
    Service = server_side("stitchwork.service", "stitchwork up").Service
    from stitchwork.interfaces.cli.client import server_file

    try:
        config = config_from(config_path)
        bind_host = host or config.server.host
        bind_port = port or config.server.port
        if not config.dashboard.public_url:  # links in approval notifications point at this server
            host_part = f"[{bind_host}]" if ":" in bind_host else bind_host
            config = config.replace(dashboard=replace(config.dashboard, public_url=f"http://{host_part}:{bind_port}"))
        if bind_host not in {"127.0.0.1", "localhost", "::1"}:
            err.print(f"[yellow]warning:[/] binding to {bind_host}: the API is reachable from other machines")
        _clear_stale_server_file(server_file(config))
        # From here on a SIGTERM is a SystemExit, so every cleanup below runs whenever it arrives (also during
        # start-up). uvicorn re-raises a SIGTERM it caught once it has shut down (FACTS.md): under the default
        # handler the `finally` below would not run. The embedded nats-server is also bound to this process's death
        # (PR_SET_PDEATHSIG), for a SIGKILL or a crash.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # The embedded nats-server (unless [messaging] bus names one) starts first: the platform's events hub uses it.
        local_bus = start_local_bus(config)
        try:
            platform = Platform.open(config, role="server")
        except BaseException:
            local_bus.stop()
            raise
    except StitchworkError as exc:
        fail(exc)
    try:
        _serve(config, platform, Service(platform), bind_host, bind_port, local_bus.note or f"bus: {local_bus.uri}")
    finally:
        local_bus.stop()
        server_file(config).unlink(missing_ok=True)
        import asyncio

        asyncio.run(platform.aclose())


def _serve(config: Any, platform: Any, service: Any, bind_host: str, bind_port: int, bus_note: str) -> None:
    """Saves the operator token (first start), announces the server (``server.json``) and runs it."""
    import uvicorn

    from stitchwork.interfaces.cli.client import server_file, token_file
    from stitchwork.interfaces.http.app import create_app

    if not service.has_operator_token():
        token = service.create_operator_token()
        path = token_file(config)
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
        console.print(f"[bold]operator token (shown once; also saved to {escape(str(path))}, mode 0600):[/] {token}")
    url = f"http://{bind_host}:{bind_port}"
    server_file(config).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    console.print(f"Stitchwork control plane on {url} (OpenAPI: {url}/openapi.json); state in {config.state_dir}",
                  markup=False)
    if config.dashboard.enabled:
        console.print(f"Dashboard: {url}/ui/ (sign in with the operator token)", highlight=False, markup=False)
    console.print(bus_note, highlight=False, markup=False)
    uvicorn.run(create_app(service), host=bind_host, port=bind_port, log_level="warning")


def _clear_stale_server_file(path: Path) -> None:
    """A ``server.json`` whose process is gone is removed; one of a running `up` stops this one."""
    from stitchwork.errors import ConfigError

    try:
        pid = int(json.loads(path.read_text()).get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        path.unlink(missing_ok=True)
        return
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pid = 0
        except PermissionError:
            pass
        if pid:
            raise ConfigError(f"`stitchwork up` (pid {pid}) already serves this state directory ({path}); stop it "
                              "first")
    path.unlink(missing_ok=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def register(app: typer.Typer) -> None:
    app.command()(up)
