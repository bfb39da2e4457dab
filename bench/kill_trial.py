"""Kill trial: workers SIGKILLed at random while runs with side effects go on; nothing lost, nothing done twice.

    python3 bench/kill_trial.py [--kills 100] [--workers 3] [--runs 0] [--seed 1] [--json]

A NATS JetStream server, ``--workers`` worker processes (``stitchwork worker``, 2 runs each at a time) and, in this
process, the platform (``Platform.open(role="server")``: its approvals, and the fleet audit ingester that appends
every worker's audit events to the platform's one chain). A scripted agent makes 6 tool calls per run:

=========  ============  ==============  ===================================================================
call       side effect   idempotency     counted
=========  ============  ==============  ===================================================================
lookup     read          none            starts only (reads may run again)
effect x2  write         none            one line per execution in ``effects.log`` (outside the sandbox)
keyed x2   external      key             one line per *new* key: the tool de-duplicates by its key (flock)
notify     external      none            one line per execution in ``effects.log``
=========  ============  ==============  ===================================================================

Each tool sleeps before and after its effect, so kills land before, during and after effects. A killer SIGKILLs
a random live worker every 0.3-4 s and starts it again at once (same name and state directory). A "human" answers
every approval: an uncertain call (``policy_ids == ("uncertain",)``) is looked up in ``effects.log``; if its effect
is there the human denies the re-run ("it already happened"), else approves it. Runs are submitted so that about
``2 x workers`` are in flight, until ``--kills`` kills were made (and at least ``--runs`` runs submitted).

Counted at the end: lost runs (not completed), duplicated executions of write/external calls (a key with more
than one effect line), missing effects (a completed run without one of its 5 effect lines), uncertain calls and how
they were resolved (from the platform's audit trail: ``uncertain`` events by decision), and ``verify`` of the
platform's chain with the writers and runs it covers. Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from stitchwork.config import load_config  # noqa: E402
from stitchwork.messaging._base import open_bus  # noqa: E402
from stitchwork.messaging.server import NatsServer  # noqa: E402
from stitchwork.workers.queue import enqueue_run, run_state  # noqa: E402
from stitchwork.workers.subjects import Subjects  # noqa: E402

TOOL = '''
import fcntl
import os
import random
import time

STARTS = {starts!r}
EFFECTS = {effects!r}


def _line(path, text):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text + "\\n")


def _nap():
    time.sleep(random.uniform(0.02, 0.25))


def lookup(name: str) -> dict:
    _line(STARTS, "lookup " + os.environ.get("STITCHWORK_IDEMPOTENCY_KEY", ""))
    _nap()
    return {{"found": name}}


def effect(name: str) -> dict:
    key = os.environ["STITCHWORK_IDEMPOTENCY_KEY"]
    _line(STARTS, "effect " + key)
    _nap()
    _line(EFFECTS, key)
    _nap()
    return {{"done": name}}


notify = effect


def keyed(name: str) -> dict:
    """De-duplicates by its idempotency key, as an API with Idempotency-Key does."""
    key = os.environ["STITCHWORK_IDEMPOTENCY_KEY"]
    _line(STARTS, "keyed " + key)
    _nap()
    with open(EFFECTS, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        if key not in handle.read().split():
            handle.write(key + "\\n")
    _nap()
    return {{"done": name}}
'''


def manifest(name: str, side_effect: str, idempotency: str = "none") -> str:
    return (f'name = "{name}"\ndescription = "{name}"\nside_effect = "{side_effect}"\nentry = "trial.py:{name}"\n'
            f'idempotency = "{idempotency}"\n[args]\ntype = "object"\nrequired = ["name"]\n'
            'additionalProperties = false\nproperties.name = { type = "string" }\n')


def tool_call(cid: str, name: str, arg: str) -> dict[str, Any]:
    return {"id": cid, "name": name, "arguments": {"name": arg}}


TURNS = [
    {"tool_calls": [tool_call("c1", "lookup", "a"), tool_call("c2", "effect", "w1")]},
    {"tool_calls": [tool_call("c3", "keyed", "k1")]},
    {"tool_calls": [tool_call("c4", "effect", "w2"), tool_call("c5", "keyed", "k2")]},
    {"tool_calls": [tool_call("c6", "notify", "n1")]},
    {"content": "done"},
]
EFFECT_CALLS = ("c2", "c3", "c4", "c5", "c6")
"""Calls with an effect line: each must be there exactly once for a completed run."""


def build(root: Path, bus: str, prefix: str) -> Path:
    tools, agents = root / "tools", root / "agents"
    tools.mkdir(parents=True)
    agents.mkdir(parents=True)
    (tools / "trial.py").write_text(TOOL.format(starts=str(root / "starts.log"), effects=str(root / "effects.log")))
    for name, side, idem in (("lookup", "read", "none"), ("effect", "write", "none"), ("keyed", "external", "key"),
                             ("notify", "external", "none")):
        (tools / f"{name}.toml").write_text(manifest(name, side, idem))
    (agents / "clerk.jsonl").write_text("\n".join(json.dumps(t) for t in TURNS) + "\n")
    (agents / "clerk.toml").write_text('name = "clerk"\nmodel = "scripted://clerk.jsonl"\n'
                                       'tools = ["lookup", "effect", "keyed", "notify"]\nmax_steps = 20\n')
    path = root / "stitchwork.toml"
    path.write_text(
        f'state_dir = "{root / "state"}"\ntool_dirs = ["{tools}"]\nagent_dirs = ["{agents}"]\n'
        f'[isolation]\ndefault = "inline://"\nallow_inline = true\ntimeout_s = 30\n[data]\naudit_flush_ms = 5\n'
        f'[messaging]\nbus = "{bus}"\nnats_port = 0\nsubject_prefix = "{prefix}"\n'
    )
    return path


class Fleet:
    """The worker processes: started, killed and started again under the same names."""

    def __init__(self, root: Path, config: Path, bus: str, size: int, ack_wait_s: float) -> None:
        self.root, self.config, self.bus, self.ack_wait_s = root, config, bus, ack_wait_s
        self.names = [f"w{i}" for i in range(size)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0

    def start(self, name: str) -> None:
        env = {**os.environ, "STITCHWORK_CONFIG": str(self.config), "PYTHONPATH": str(ROOT / "src")}
        log = open(self.root / f"worker-{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "stitchwork", "worker", "--bus", self.bus, "--name", name, "--ack-wait",
             str(self.ack_wait_s), "--concurrency", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill_one(self, rng: random.Random) -> str:
        name = rng.choice(self.names)
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            self.kills += 1
        proc.wait()
        self.start(name)
        return name

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def effect_lines(root: Path) -> Counter[str]:
    try:
        return Counter((root / "effects.log").read_text().split())
    except FileNotFoundError:
        return Counter()


async def trial(args: argparse.Namespace) -> dict[str, Any]:
    from stitchwork.platform import Platform
    from stitchwork.security.approvals import ApprovalStatus
    from stitchwork.service import Service

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="sw-kill-"))
    server = NatsServer(root / "nats").start()
    prefix = "kt" + uuid.uuid4().hex[:6]
    config_path = build(root, server.url, prefix)
    config = load_config(config_path)
    subjects = Subjects(prefix)
    fleet = Fleet(root, config_path, server.url, args.workers, args.ack_wait)
    platform = Platform.open(config, role="server")
    service = Service(platform)
    stop_feed = asyncio.Event()
    feed = asyncio.create_task(service.ingest_fleet_audit(stop_feed))
    client = await open_bus(server.url)
    runs: list[str] = []
    resolutions: Counter[str] = Counter()
    finished: dict[str, str] = {}
    started = time.monotonic()
    try:
        for name in fleet.names:
            fleet.start(name)
        done_killing = asyncio.Event()

        async def killer() -> None:
            await asyncio.sleep(3.0)  # let the workers come up once
            while fleet.kills < args.kills:
                await asyncio.sleep(rng.uniform(0.3, 4.0))
                fleet.kill_one(rng)
            done_killing.set()

        async def human() -> None:
            while True:
                await asyncio.sleep(0.3)
                for approval in platform.approvals.find(ApprovalStatus.PENDING):
                    if approval.policy_ids == ("uncertain",):
                        key = str(approval.arguments.get("idempotency_key", ""))
                        happened = effect_lines(root)[key] > 0
                        with contextlib.suppress(Exception):
                            platform.approvals.decide(approval.id, approve=not happened, by="trial-human",
                                                      note="found in effects.log" if happened else "not in effects")
                            resolutions["human: not run again" if happened else "human: run again"] += 1
                    else:
                        with contextlib.suppress(Exception):
                            platform.approvals.decide(approval.id, approve=True, by="trial-human")
                            resolutions["policy approval"] += 1

        async def status(run_id: str) -> str:
            state = await run_state(client, run_id, subjects=subjects)
            return str(state["status"]) if state else "queued"

        tasks = [asyncio.create_task(killer()), asyncio.create_task(human())]
        while not done_killing.is_set() or len(runs) < args.runs:
            active = [r for r in runs if r not in finished]
            for run_id in active:
                if (s := await status(run_id)) not in ("queued", "running", "waiting_approval"):
                    finished[run_id] = s
            if len([r for r in runs if r not in finished]) < 2 * args.workers:
                runs.append(await enqueue_run(client, "clerk", f"task {len(runs)}", subjects=subjects))
            await asyncio.sleep(0.1)
        tasks[0].cancel()
        deadline = time.monotonic() + args.settle
        while time.monotonic() < deadline and len(finished) < len(runs):
            for run_id in [r for r in runs if r not in finished]:
                if (s := await status(run_id)) not in ("queued", "running", "waiting_approval"):
                    finished[run_id] = s
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        tasks[1].cancel()
        fleet.stop()
        # The workers' last events reach the platform's trail (the feed catches up on shutdown and restart).
        for _ in range(200):
            covered = {e.run_id for e in platform.audit.tail(1_000_000) if "origin" in e.data}
            if set(runs) <= covered:
                break
            await asyncio.sleep(0.1)
    finally:
        stop_feed.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(feed, 15)
        fleet.stop()
        await client.aclose()
    effects = effect_lines(root)
    events = platform.audit.tail(1_000_000)
    fleet_events = [e for e in events if "origin" in e.data]
    uncertain = Counter(e.decision for e in fleet_events if e.kind == "uncertain")
    duplicated = {k: n for k, n in effects.items() if n > 1}
    completed = [r for r in runs if finished.get(r) == "completed"]
    missing = [f"{r}:{c}" for r in completed for c in EFFECT_CALLS if effects[f"{r}:{c}"] == 0]
    report = platform.audit.verify()
    writers = sorted({str(e.data["origin"]["writer"]) for e in fleet_events})
    links = Counter(str(e.data["origin"]["link"]) for e in fleet_events)
    covered_runs = {e.run_id for e in fleet_events}
    starts = Counter(line.split()[0] for line in (root / "starts.log").read_text().splitlines() if line)
    await platform.aclose()
    server.stop()
    result = {
        "kills": fleet.kills, "workers": args.workers, "runs": len(runs), "completed": len(completed),
        "lost": len(runs) - len(completed), "not_completed": {r: finished.get(r, "?") for r in runs
                                                             if r not in completed},
        "tool_calls": 6 * len(completed), "executions": dict(starts),
        "duplicated_write_external": len(duplicated), "duplicated_examples": dict(list(duplicated.items())[:5]),
        "missing_effects": len(missing), "missing_examples": missing[:5],
        "uncertain": dict(uncertain), "uncertain_total": sum(uncertain.values()),
        "resolutions": dict(resolutions),
        "audit_verify_ok": report.ok, "audit_events": len(events), "fleet_events": len(fleet_events),
        "audit_writers": writers, "audit_links": dict(links),
        "runs_in_platform_audit": len(covered_runs & set(runs)), "elapsed_s": round(elapsed, 1), "root": str(root),
    }
    result["ok"] = bool(result["lost"] == 0 and not duplicated and not missing and report.ok
                        and result["runs_in_platform_audit"] == len(runs)
                        and bool(writers) and set(writers) <= {f"w{i}" for i in range(args.workers)})
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=0, help="submit at least this many runs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ack-wait", type=float, default=2.0)
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for the last runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(trial(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
