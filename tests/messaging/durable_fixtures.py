"""A config with one agent that appends lines through a side-effecting tool; used by the durable-run tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stitchwork.config import AgentsConfig, Config, DataConfig, IsolationConfig, MessagingConfig

TOOL = '''
import os
import time

STARTS = {starts!r}
EFFECTS = {effects!r}


def append(text: str, delay: float = 0.0) -> dict:
    """A side effect we can count: one line per execution start, one per completed effect."""
    key = os.environ.get("STITCHWORK_IDEMPOTENCY_KEY", "")
    with open(STARTS, "a", encoding="utf-8") as handle:
        handle.write(text + " " + key + "\\n")
    time.sleep(delay)
    with open(EFFECTS, "a", encoding="utf-8") as handle:
        handle.write(text + "\\n")
    return {{"appended": text}}
'''

MANIFEST = '''name = "append"
description = "Append a line to the ledger."
side_effect = "write"
entry = "ledger.py:append"
[args]
type = "object"
required = ["text"]
additionalProperties = false
properties.text = { type = "string" }
properties.delay = { type = "number" }
'''


def call(cid: str, text: str, delay: float = 0.0) -> dict[str, Any]:
    return {"id": cid, "name": "append", "arguments": {"text": text, "delay": delay}}


def build(root: Path, turns: list[dict[str, Any]], *, bus: str = "memory://") -> Config:
    """Writes tools, agent and a TOML config under ``root``; returns the config (also at ``root/stitchwork.toml``)."""
    tools, agents = root / "tools", root / "agents"
    tools.mkdir(parents=True, exist_ok=True)
    agents.mkdir(parents=True, exist_ok=True)
    (tools / "ledger.py").write_text(TOOL.format(starts=str(root / "starts.log"), effects=str(root / "effects.log")))
    (tools / "append.toml").write_text(MANIFEST)
    (agents / "scribe.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    (agents / "scribe.toml").write_text('name = "scribe"\nmodel = "scripted://scribe.jsonl"\ntools = ["append"]\n'
                                        'max_steps = 20\n')
    (root / "stitchwork.toml").write_text(
        f'state_dir = "{root / "state"}"\ntool_dirs = ["{tools}"]\nagent_dirs = ["{agents}"]\n'
        f'[isolation]\ndefault = "inline://"\ntimeout_s = 30\n[data]\naudit_flush_ms = 5\n'
        f'[messaging]\nbus = "{bus}"\nnats_port = 0\n'
    )
    return Config(state_dir=root / "state", tool_dirs=(str(tools),), agent_dirs=(str(agents),),
                  isolation=IsolationConfig(default="inline://", timeout_s=30), data=DataConfig(audit_flush_ms=5),
                  agents=AgentsConfig(), messaging=MessagingConfig(bus=bus, nats_port=0))


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def wait_until(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def cli_env(root: Path) -> dict[str, str]:
    """The environment for ``python -m stitchwork.cli`` on ``root``'s config."""
    env = {**os.environ, "STITCHWORK_CONFIG": str(root / "stitchwork.toml")}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn_worker(root: Path, bus: str, name: str, *, ack_wait_s: float = 2.0) -> subprocess.Popen[bytes]:
    """``stitchwork worker`` as a real process."""
    env = cli_env(root)
    log = open(root / f"worker-{name}.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "stitchwork.cli", "worker", "--bus", bus, "--name", name, "--ack-wait",
         str(ack_wait_s), "--concurrency", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
