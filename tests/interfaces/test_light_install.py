"""The light client install: `pip install stitchwork` (no extras) runs the CLI against a remote `stitchwork up`.

A fresh virtual environment is given only the packages of ``[project] dependencies`` in pyproject.toml and what they
depend on (linked from this environment, so no network is needed): DuckDB, cedarpy, wasmtime, FastAPI and the rest
of the server side are simply not importable there. Remote commands must work; commands that need the server side
must fail with exit 2 and the command that installs it. (CI also installs it for real with pip: .ci/run.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from stitchwork.messaging.server import free_port
from tests.workers.durable_fixtures import build, call, wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVER_SIDE = ("duckdb", "cedarpy", "wasmtime", "fastapi", "uvicorn", "starlette", "jsonschema", "jwt",
               "cryptography", "orjson", "nats")


def light_distributions() -> set[str]:
    """The light install's distributions: pyproject's dependencies and theirs, recursively (no extras)."""
    pending = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    found: set[str] = set()
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in found:
            continue
        found.add(name)
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}) or any(
                    child.marker.evaluate({"extra": e}) for e in requirement.extras):
                pending.append(child)
    return found


def top_level_paths(name: str) -> set[Path]:
    """The files and directories a distribution puts at the top of site-packages (and its metadata)."""
    dist = metadata.distribution(name)
    paths: set[Path] = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        paths.add(Path(str(dist.locate_file(first))))
    return paths


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with only the light install; returns its python."""
    base = tmp_path_factory.mktemp("light")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    linked = base / "site"
    linked.mkdir()
    for name in sorted(light_distributions()):
        for path in top_level_paths(name):
            (linked / path.name).symlink_to(path)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "stitchwork-light.pth").write_text(f"{linked}\n{ROOT / 'src'}\n")
    return python


def cli(python: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STITCHWORK_") and k != "PYTHONPATH"}
    return subprocess.run([str(python), "-m", "stitchwork", *args], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_the_light_install_has_no_server_side(light: Path) -> None:
    names = light_distributions()
    assert {"typer", "rich", "httpx"} <= names
    assert not names & {"duckdb", "cedarpy", "wasmtime", "fastapi", "uvicorn", "jsonschema", "cryptography"}
    for module in SERVER_SIDE:
        probe = subprocess.run([str(light), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} is importable in the light install"


def test_help_and_local_commands_need_no_server_side(light: Path, tmp_path: Path) -> None:
    env = {"STITCHWORK_STATE_DIR": str(tmp_path / "state")}
    shown = cli(light, "--help", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "runs" in shown.stdout and "Exit codes" in shown.stdout
    doctor = cli(light, "doctor", "--json", env=env)
    assert doctor.returncode == 0, doctor.stderr
    backends = {b["backend"]: b for b in json.loads(doctor.stdout)["backends"]}
    assert backends["wasm://"]["usable"] is False and "stitchwork[wasm]" in backends["wasm://"]["why_not"]


@pytest.mark.parametrize(("args", "extra"), [
    (["up"], "server"), (["demo"], "server"), (["worker"], "server"), (["sandbox", "prepare"], "server"),
    (["runs", "ls"], "server"), (["approvals"], "server"), (["audit", "verify"], "server"),
    (["memory", "ls"], "server"), (["eval", "agentdojo"], "server"),
    (["kafka-export", "kafka://127.0.0.1:1"], "kafka"),
    (["runs", "dead", "--bus", "nats://127.0.0.1:1"], "nats"), (["submit", "a", "task", "--bus", "nats://127.0.0.1:1"],
                                                                 "nats"), (["data", "retention"], "server"),
])
def test_server_side_commands_name_the_extra(light: Path, tmp_path: Path, args: list[str], extra: str) -> None:
    result = cli(light, *args, env={"STITCHWORK_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"pip install 'stitchwork[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `stitchwork up` (this environment, with the server side) on a free port: (url, operator token)."""
    build(tmp_path, [{"tool_calls": [call("c1", "x")]}, {"content": "finished"}])
    port = free_port()
    env = {**os.environ, "STITCHWORK_CONFIG": str(tmp_path / "stitchwork.toml"),
           "PYTHONPATH": str(ROOT / "src")}
    env.pop("STITCHWORK_URL", None)
    up = subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    token_file = tmp_path / "state" / "operator.token"
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            token = token_file.read_text().strip()
            return httpx.get(f"{url}/v1/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        except (OSError, httpx.HTTPError):
            return False

    try:
        wait_until(healthy, 90, "stitchwork up answers")
        yield url, token_file.read_text().strip()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)


def test_remote_commands_work_from_the_light_install(light: Path, server: tuple[str, str], tmp_path: Path) -> None:
    url, token = server
    env = {"STITCHWORK_URL": url, "STITCHWORK_TOKEN": token, "STITCHWORK_STATE_DIR": str(tmp_path / "client")}

    def ok(*args: str, code: int = 0) -> str:
        result = cli(light, *args, env=env)
        assert result.returncode == code, result.stdout + result.stderr
        return result.stdout

    assert json.loads(ok("runs", "ls", "--json")) == []
    completed = json.loads(ok("run", "scribe", "append x", "--json"))
    assert completed["status"] == "completed" and completed["result"] == "finished"
    waiting = json.loads(ok("run", "cashier", "pay p1", "--json", code=4))
    (approval_id,) = waiting["pending_approvals"]
    assert [a["id"] for a in json.loads(ok("approvals", "--json"))] == [approval_id]
    assert "approved" in ok("approve", approval_id)
    listed = json.loads(ok("runs", "ls", "--json"))
    assert [r["id"] for r in listed] == [waiting["id"], completed["id"]]
    wait_until(lambda: json.loads(cli(light, "runs", "show", waiting["id"], "--json", env=env).stdout)["status"]
               == "completed", 60, "the approved run finished")
    assert "stored" in ok("secrets", "set", "api_key", "--value", "v-123")
    assert json.loads(ok("secrets", "list", "--json")) == ["api_key"]
    assert json.loads(ok("audit", "verify", "--json"))["ok"] is True
    assert json.loads(ok("audit", "tail", "-n", "2", "--json"))
    refused = cli(light, "runs", "ls", env={**env, "STITCHWORK_TOKEN": "swo_wrong"})
    assert refused.returncode == 2 and "operator token" in refused.stderr
