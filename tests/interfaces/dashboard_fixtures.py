"""An installation for the dashboard tests: the demo's inbox assistant, an agent that reads a hostile web page,
and one whose call always waits for a human; and `stitchwork up` serving it on a free port."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stitchwork.messaging.server import free_port
from stitchwork.platform import BUILTIN_AGENTS, BUILTIN_TOOLS

HOSTILE = (
    '<script>window.__pwned = "script"; alert("script")</script>'
    '<img src="x" onerror="window.__pwned = \'img\'; alert(\'img\')">'
    '<a id="evil" href="javascript:window.__pwned=\'link\';alert(\'link\')">click me</a>'
    '<svg onload="window.__pwned=\'svg\'"></svg>'
)
"""Markup a tool returns, a model repeats and an argument carries: it must reach the operator's screen as text."""

WEB_TOOL = f'''
HOSTILE = {HOSTILE!r}


def fetch_page(url: str) -> dict:
    return {{"url": url, "title": "Quarterly report", "html": HOSTILE}}


def remove_file(path: str) -> dict:
    return {{"removed": path}}
'''

FETCH_MANIFEST = '''name = "fetch_page"
description = "Fetch a web page."
side_effect = "read"
entry = "web.py:fetch_page"
[args]
type = "object"
required = ["url"]
additionalProperties = false
properties.url = { type = "string", maxLength = 2000 }
'''

REMOVE_MANIFEST = '''name = "remove_file"
description = "Delete a file for good."
side_effect = "irreversible"
entry = "web.py:remove_file"
target = "path"
[args]
type = "object"
required = ["path"]
additionalProperties = false
properties.path = { type = "string", maxLength = 500 }
'''


def _turns(*turns: dict[str, Any]) -> str:
    return "\n".join(json.dumps(t) for t in turns) + "\n"


def build(root: Path, *, extra_toml: str = "", sandbox: str = "inline://", bus: str = "memory://") -> Path:
    """Writes tools, agents and ``stitchwork.toml`` under ``root``; returns the config file."""
    tools, agents = root / "tools", root / "agents"
    shutil.copytree(BUILTIN_TOOLS, tools, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(BUILTIN_AGENTS, agents, ignore=shutil.ignore_patterns("__pycache__"))
    (tools / "web.py").write_text(WEB_TOOL)
    (tools / "fetch_page.toml").write_text(FETCH_MANIFEST)
    (tools / "remove_file.toml").write_text(REMOVE_MANIFEST)
    (agents / "web-reader.jsonl").write_text(_turns(
        {"content": "Reading the page.", "tool_calls": [
            {"id": "w1", "name": "fetch_page", "arguments": {"url": "https://example.com/report?q=" + HOSTILE}}]},
        {"content": "The page says: " + HOSTILE},
    ))
    (agents / "web-reader.toml").write_text(
        'name = "web-reader"\nmodel = "scripted://web-reader.jsonl"\ntools = ["fetch_page"]\n')
    (agents / "janitor.jsonl").write_text(_turns(
        {"content": "Removing the old file.", "tool_calls": [
            {"id": "j1", "name": "remove_file", "arguments": {"path": "/srv/old-report.csv"}}]},
        {"content": "Done with the clean-up."},
    ))
    (agents / "janitor.toml").write_text(
        'name = "janitor"\nmodel = "scripted://janitor.jsonl"\ntools = ["remove_file"]\n')
    config = root / "stitchwork.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\ntool_dirs = ["{tools}"]\nagent_dirs = ["{agents}"]\n'
        f'[isolation]\ndefault = "{sandbox}"\ntimeout_s = 30\n[data]\naudit_flush_ms = 5\n'
        f'[messaging]\nbus = "{bus}"\nnats_port = 0\n{extra_toml}'
    )
    return config


def env_for(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STITCHWORK_")}
    env["STITCHWORK_CONFIG"] = str(config)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Server:
    """A running `stitchwork up`."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    root: Path

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None,
            timeout: float = 60) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token if token is None else token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, json.loads(raw) if raw else None

    def wait_run(self, run_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, run = self.api("GET", f"/v1/runs/{run_id}")
            if run and run.get("status") in statuses:
                return dict(run)
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} is {run and run.get('status')}, not one of {statuses}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: uvicorn shuts down cleanly
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(config: Path, root: Path, *, timeout: float = 90) -> Server:
    port = free_port()
    # cwd: inline:// runs Python tools in the server's directory, where the demo's send_email writes its outbox
    log = open(root / "up.log", "wb")  # noqa: SIM115 - the server writes to it until stopped
    process = subprocess.Popen([sys.executable, "-m", "stitchwork", "up", "--port", str(port)], env=env_for(config),
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    server = Server(f"http://127.0.0.1:{port}", "", process, root)
    deadline = time.monotonic() + timeout
    token_file = root / "state" / "operator.token"
    while True:
        if process.poll() is not None:
            raise AssertionError(f"stitchwork up exited: {(root / 'up.log').read_text()[-3000:]}")
        if token_file.exists() and token_file.read_text().strip():
            server.token = token_file.read_text().strip()
            try:
                status, _ = server.api("GET", "/v1/health", timeout=2)
                if status == 200:
                    return server
            except OSError:
                pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"stitchwork up did not answer: {(root / 'up.log').read_text()[-3000:]}")
        time.sleep(0.2)
