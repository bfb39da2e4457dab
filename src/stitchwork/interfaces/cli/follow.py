"""`stitchwork run --follow`: start a run on the control plane and print its events as they happen.

Events come over the WebSocket ``/v1/events``; if the connection drops, the client reconnects with the last
sequence number it printed, so no event is missed or printed twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from stitchwork.config import Config
from stitchwork.errors import AuthError, ConfigError, RunError, RunTimedOut
from stitchwork.interfaces.cli.client import running_server, token_file

STOP_KINDS = {"finished", "waiting_approval"}


def _token(config: Config) -> str:
    token = os.environ.get("STITCHWORK_TOKEN")
    if token:
        return token
    try:
        return token_file(config).read_text().strip()
    except OSError as exc:
        raise AuthError("set STITCHWORK_TOKEN to the operator token printed by `stitchwork up`") from exc


def follow_events(url: str, token: str, run_id: str, on_event: Callable[[dict[str, Any]], None], *,
                  after: int = 0, timeout_s: float = 600.0, retries: int = 20) -> int:
    """Prints (via ``on_event``) the run's events until it finishes or waits; returns the last sequence seen."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/events"
    deadline = time.monotonic() + timeout_s
    last, failures = after, 0
    while time.monotonic() < deadline:
        try:
            with connect(f"{ws_url}?run_id={run_id}&after={last}",
                         additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
                failures = 0
                while True:
                    event = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                    last = int(event["seq"])
                    on_event(event)
                    if event.get("kind") in STOP_KINDS:
                        return last
        except InvalidStatus as exc:
            raise AuthError(f"the event stream refused the connection: {exc}") from exc
        except TimeoutError:
            break
        except (ConnectionClosed, OSError) as exc:
            received = getattr(exc, "rcvd", None)
            if received is not None and getattr(received, "code", 0) == 4401:
                raise AuthError("the event stream needs a valid operator token") from exc
            failures += 1
            if failures > retries:
                raise RunError(f"lost the event stream of {run_id} {failures} times: {exc}") from exc
            time.sleep(min(2.0, 0.1 * failures))
    raise RunTimedOut(f"run {run_id} did not finish within {timeout_s:.0f}s")


def run_and_follow(config: Config, agent: str, task: str, model: str | None,
                   on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Starts the run on the running control plane, follows its events, returns the run."""
    url = running_server(config)
    if url is None:
        raise ConfigError("--follow streams events from `stitchwork up`; start it first")
    token = _token(config)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        started = http.post("/v1/runs", json={"agent": agent, "task": task, "model": model, "wait": False})
        if started.status_code >= 400:
            raise RunError(f"the platform refused the run (HTTP {started.status_code}): {started.text[:500]}")
        run_id = started.json()["id"]
        follow_events(url, token, run_id, on_event)
        record: dict[str, Any] = http.get(f"/v1/runs/{run_id}").json()
        return record


def describe(event: dict[str, Any]) -> str:
    """One line per event for the terminal."""
    data = event.get("data") or {}
    kind = event.get("kind", "?")
    if kind == "tool":
        detail = f"{data.get('call')} → {data.get('status')}"
    elif kind == "model":
        calls = ", ".join(data.get("tool_calls") or []) or "answer"
        detail = f"model → {calls}"
    elif kind == "waiting_approval":
        detail = "waiting for approval: " + ", ".join(data.get("approvals") or [])
    else:
        detail = json.dumps(data, default=str)[:200]
    return f"#{event.get('seq')} {kind}: {detail}"


def follow_command(config_path: Any, agent: str, task: str, model: str | None, as_json: bool) -> None:
    """The body of `stitchwork run --follow`: prints events, then the run; exits with the run's code."""
    from stitchwork.config import load_config
    from stitchwork.errors import StitchworkError
    from stitchwork.interfaces.cli._common import console, exit_for_run, fail, show_run

    try:
        record = run_and_follow(load_config(config_path), agent, task, model,
                                lambda event: console.print(describe(event), highlight=False, markup=False))
    except StitchworkError as exc:
        fail(exc)
    show_run(record, as_json)
    exit_for_run(record)
