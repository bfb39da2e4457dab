"""A config with one agent that appends lines through a side-effecting tool; used by the durable-run tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stitchwork.config import AgentsConfig, Config, DataConfig, IsolationConfig, MessagingConfig, SecurityConfig

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


PAY_MANIFEST = MANIFEST.replace('name = "append"', 'name = "pay"').replace('side_effect = "write"',
                                                                          'side_effect = "irreversible"')
"""The same ledger function as an irreversible tool: every call waits for a human approval."""


def call(cid: str, text: str, delay: float = 0.0, tool: str = "append") -> dict[str, Any]:
    return {"id": cid, "name": tool, "arguments": {"text": text, "delay": delay}}


def build(root: Path, turns: list[dict[str, Any]], *, bus: str = "memory://", approval_timeout_s: int = 3600,
          model: str = "scripted://scribe.jsonl") -> Config:
    """Writes tools, agent and a TOML config under ``root``; returns the config (also at ``root/stitchwork.toml``)."""
    tools, agents = root / "tools", root / "agents"
    tools.mkdir(parents=True, exist_ok=True)
    agents.mkdir(parents=True, exist_ok=True)
    (tools / "ledger.py").write_text(TOOL.format(starts=str(root / "starts.log"), effects=str(root / "effects.log")))
    (tools / "append.toml").write_text(MANIFEST)
    (tools / "pay.toml").write_text(PAY_MANIFEST)
    (agents / "scribe.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    (agents / "scribe.toml").write_text(f'name = "scribe"\nmodel = "{model}"\ntools = ["append", "pay"]\n'
                                        'max_steps = 20\n')
    # A second agent whose one call always waits for a human: pay p1, then answer "paid".
    (agents / "cashier.jsonl").write_text(json.dumps({"tool_calls": [call("c1", "p1", tool="pay")]}) + "\n"
                                          + json.dumps({"content": "paid"}) + "\n")
    (agents / "cashier.toml").write_text('name = "cashier"\nmodel = "scripted://cashier.jsonl"\ntools = ["pay"]\n')
    (root / "stitchwork.toml").write_text(
        f'state_dir = "{root / "state"}"\ntool_dirs = ["{tools}"]\nagent_dirs = ["{agents}"]\n'
        f'[isolation]\ndefault = "inline://"\nallow_inline = true\ntimeout_s = 30\n[data]\naudit_flush_ms = 5\n'
        f'[messaging]\nbus = "{bus}"\nnats_port = 0\n[security]\napproval_timeout_s = {approval_timeout_s}\n'
    )
    return Config(state_dir=root / "state", tool_dirs=(str(tools),), agent_dirs=(str(agents),),
                  isolation=IsolationConfig(default="inline://", timeout_s=30, allow_inline=True),
                  data=DataConfig(audit_flush_ms=5),
                  agents=AgentsConfig(), messaging=MessagingConfig(bus=bus, nats_port=0),
                  security=SecurityConfig(approval_timeout_s=approval_timeout_s))


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
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cli_env(root: Path) -> dict[str, str]:
    """The environment for ``python -m stitchwork`` on ``root``'s config."""
    env = {**os.environ, "STITCHWORK_CONFIG": str(root / "stitchwork.toml")}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def spawn_worker(root: Path, bus: str, name: str, *, ack_wait_s: float = 2.0, prefix: str = "",
                 env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``stitchwork worker`` as a real process (``prefix``: its subjects' prefix, for a shared NATS server)."""
    env = {**cli_env(root), **(env_extra or {})}
    if prefix:
        env["STITCHWORK_MESSAGING__SUBJECT_PREFIX"] = prefix
    log = open(root / f"worker-{name}.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "stitchwork", "worker", "--bus", bus, "--name", name, "--ack-wait",
         str(ack_wait_s), "--concurrency", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
