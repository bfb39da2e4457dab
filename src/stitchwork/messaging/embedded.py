"""Which bus an installation uses, and the local nats-server that `stitchwork up` starts for it.

``[messaging] bus = "nats://embedded"`` (the default): `stitchwork up` starts ``nats-server -js`` on
``127.0.0.1:<nats_port>`` with its data in ``<state_dir>/nats`` and writes the URL to ``<state_dir>/bus.json`` so
workers and the CLI on this machine find it. Without the ``nats`` extra it falls back to ``memory://`` (runs then
stay in the `up` process; `stitchwork worker` needs a real bus). Any other URI is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from stitchwork.config import Config
from stitchwork.errors import ConfigError
from stitchwork.messaging.server import NatsServer

EMBEDDED = "nats://embedded"
_ACTIVE: dict[Path, str] = {}
"""State dir → the bus `stitchwork up` started in this process."""


def bus_file(config: Config) -> Path:
    return config.state_dir / "bus.json"


def nats_installed(binary: str = "") -> str:
    """Empty if the embedded server can run, else why not."""
    try:
        import nats  # noqa: F401

        from stitchwork.messaging.server import nats_server_binary

        nats_server_binary(binary)
    except (ImportError, ConfigError) as exc:
        return str(exc) if isinstance(exc, ConfigError) else "nats-py is not installed"
    return ""


def bus_uri(config: Config) -> str:
    """The bus URI clients of this installation use (the embedded server's URL once `up` started it).

    Raises:
        ConfigError: the bus is the embedded server and `stitchwork up` is not running it.
    """
    uri = config.messaging.bus  # STITCHWORK_BUS is this key (config.ENV_ALIASES)
    if uri != EMBEDDED:
        return uri
    if config.state_dir in _ACTIVE:
        return _ACTIVE[config.state_dir]
    try:
        info = json.loads(bus_file(config).read_text())
        return str(info["url"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            "the bus is the nats-server that `stitchwork up` starts, and it is not running "
            f"(no {bus_file(config)}); start `stitchwork up` or set [messaging] bus = \"nats://host:port\""
        ) from exc


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_nats_server(pid: int) -> bool:
    try:
        return "nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return False


def clear_stale_bus(config: Config) -> None:
    """Removes what a `stitchwork up` that did not stop cleanly left: its ``bus.json``, and the nats-server it
    started if that still runs (it would hold the port). A server started by a running `up` is left alone.

    Raises:
        ConfigError: another `stitchwork up` of this state directory is running.
    """
    path = bus_file(config)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return
    owner = int(info.get("owner", 0) or 0)
    if owner and owner != os.getpid() and _alive(owner):
        raise ConfigError(f"`stitchwork up` (pid {owner}) already serves {config.state_dir}; stop it first")
    pid = int(info.get("pid", 0) or 0)
    if _alive(pid) and _is_nats_server(pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not _alive(pid):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)


@dataclass
class LocalBus:
    """The bus `stitchwork up` serves with: a URI and, when embedded, the server process."""

    uri: str
    server: NatsServer | None = None
    note: str = ""
    config: Config | None = None

    def stop(self) -> None:
        if self.config is not None:
            _ACTIVE.pop(self.config.state_dir, None)
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.config is not None:
            with contextlib.suppress(OSError):
                bus_file(self.config).unlink()


def start_local_bus(config: Config) -> LocalBus:
    """Starts the embedded nats-server if the config asks for it (and it is installed); health-checked."""
    uri = config.messaging.bus
    if uri != EMBEDDED:
        return LocalBus(uri)
    if why := nats_installed(config.messaging.nats_server):
        _ACTIVE[config.state_dir] = "memory://stitchwork"
        return LocalBus("memory://stitchwork", note=f"bus: memory:// (no embedded NATS: {why})", config=config)
    clear_stale_bus(config)
    server = NatsServer(config.state_dir / "nats", port=config.messaging.nats_port,
                        binary=config.messaging.nats_server, die_with_parent=True).start()
    _ACTIVE[config.state_dir] = server.url
    path = bus_file(config)
    path.write_text(json.dumps({"url": server.url, "pid": server.process.pid if server.process else 0,
                                "owner": os.getpid()}))
    return LocalBus(server.url, server, note=f"bus: nats-server (JetStream) on {server.url}", config=config)
