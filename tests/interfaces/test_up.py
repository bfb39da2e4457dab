"""`stitchwork up` with the embedded nats-server, `stitchwork run --follow`, `submit` + `worker`, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stitchwork.interfaces.cli.app import app
from stitchwork.messaging.server import free_port
from tests.conftest import nats_available
from tests.workers.durable_fixtures import build, call, cli_env, lines, spawn_worker, wait_until

pytestmark = pytest.mark.skipif(bool(nats_available()), reason=nats_available() or "nats available")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stitchwork", *args], env=cli_env(root), capture_output=True,
                          text=True, timeout=120)


def test_up_serves_with_embedded_nats_follow_streams_and_stop_is_clean(tmp_path: Path) -> None:
    build(tmp_path, [{"tool_calls": [call("c1", "x")]}, {"content": "finished"}], bus="nats://embedded")
    state = tmp_path / "state"
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=cli_env(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = None
    try:
        wait_until(lambda: (state / "bus.json").exists() and (state / "server.json").exists(), 60, "up started")
        bus = json.loads((state / "bus.json").read_text())
        assert bus["url"].startswith("nats://127.0.0.1:") and _alive(bus["pid"])
        assert (state / "nats").is_dir()

        def healthy() -> bool:
            try:
                token = (state / "operator.token").read_text().strip()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/health",
                                                 headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        worker = spawn_worker(tmp_path, bus["url"], "w1")  # starts while the API comes up and --follow runs
        wait_until(healthy, 60, "API healthy")
        followed = _cli(tmp_path, "run", "scribe", "append x", "--follow")
        assert followed.returncode == 0, followed.stdout + followed.stderr
        out = followed.stdout
        assert "model → append" in out and "append → ok" in out and "completed" in out
        numbers = [int(line.split()[0][1:]) for line in out.splitlines() if line.startswith("#")]
        assert len(numbers) == 4 and numbers == sorted(numbers)

        submitted = _cli(tmp_path, "submit", "scribe", "append again", "--wait")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        result = json.loads(submitted.stdout)
        assert result["status"] == "completed" and result["result"] == "finished"
        assert lines(tmp_path / "effects.log") == ["x", "x"]

        # An approval requested inside the worker is listed and decided with the platform's CLI (in this
        # process: the commands talk to `up` over HTTP and to the bus, like the real ones above).
        env = {"STITCHWORK_CONFIG": str(tmp_path / "stitchwork.toml")}
        paying = CliRunner().invoke(app, ["submit", "cashier", "pay p1", "--wait"], env=env)
        waiting = json.loads(paying.stdout)
        assert waiting["status"] == "waiting_approval", paying.output
        listed = json.loads(CliRunner().invoke(app, ["approvals", "--format", "json"], env=env).stdout)
        assert [(a["run_id"], a["tool"]) for a in listed] == [(waiting["id"], "pay")]
        approved = CliRunner().invoke(app, ["approve", listed[0]["id"]], env=env)
        assert approved.exit_code == 0 and "approved" in approved.stdout, approved.output
        wait_until(lambda: lines(tmp_path / "effects.log") == ["x", "x", "p1"], 60, "the approved call ran")
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        up.send_signal(signal.SIGINT)
        up.wait(30)
    assert not _alive(bus["pid"]) and not (state / "bus.json").exists()


def _start_up(root: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=cli_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def _gone(pid: int) -> bool:
    try:
        wait_until(lambda: not _alive(pid) or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
                   or "(Z)" in Path(f"/proc/{pid}/stat").read_text(), 20, f"process {pid} gone")
    except (AssertionError, OSError):
        return not _alive(pid)
    return True


def test_up_stops_its_nats_on_sigterm_and_on_sigkill_and_stale_files_never_block_a_restart(tmp_path: Path) -> None:
    build(tmp_path, [{"content": "ok"}], bus="nats://embedded")
    state = tmp_path / "state"
    up = _start_up(tmp_path, free_port())
    try:
        wait_until(lambda: (state / "bus.json").exists() and (state / "server.json").exists(), 60, "up started")
        nats_pid = json.loads((state / "bus.json").read_text())["pid"]
        up.send_signal(signal.SIGTERM)  # uvicorn re-raises it after its shutdown: the cleanup still runs
        assert up.wait(30) != 0 or True
        assert _gone(nats_pid) and not (state / "bus.json").exists() and not (state / "server.json").exists()

        up = _start_up(tmp_path, free_port())
        wait_until(lambda: (state / "bus.json").exists() and (state / "server.json").exists(), 60, "up again")
        nats_pid = json.loads((state / "bus.json").read_text())["pid"]
        up.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel stops the server (parent-death signal)
        up.wait(30)
        assert _gone(nats_pid)
        assert (state / "bus.json").exists() and (state / "server.json").exists()  # stale files stay behind...

        up = _start_up(tmp_path, free_port())  # ...and do not block the next start (same NATS port if fixed)
        wait_until(lambda: (state / "server.json").exists() and json.loads((state / "server.json").read_text())[
            "pid"] == up.pid and (state / "bus.json").exists(), 60, "up after a crash")
        assert _alive(json.loads((state / "bus.json").read_text())["pid"])
        second = subprocess.run([sys.executable, "-m", "stitchwork", "up", "--port", str(free_port())],
                                env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "already serves" in second.stdout + second.stderr  # one `up` per state
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(30)
