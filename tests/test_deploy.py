"""Dockerfile and compose.yaml, written for users: checked without a container engine (this machine has none).

They are parsed, and kept in step with the CLI (every `stitchwork` command and option they use exists and parses),
the config (every STITCHWORK_* variable they set is a real key), the extras (what they install exists) and the API
(the health check's path answers without a token).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from stitchwork.config import load_config
from stitchwork.interfaces.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "a continuation line runs off the end"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def stage() -> list[tuple[str, str]]:
    """The instructions of the final stage (after the last FROM)."""
    instructions = dockerfile()
    last = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last + 1:]


def check_cli(argv: list[str]) -> None:
    """``stitchwork ARGS``: each command exists and every option and value parses (as Click would before running)."""
    assert argv[0] == "stitchwork", argv
    command: Any = typer.main.get_command(app)
    args, name, parent = list(argv[1:]), "stitchwork", None
    while True:
        ctx = command.make_context(name, args, parent=parent)  # raises on an unknown command, option or value
        if not hasattr(command, "commands"):
            assert not ctx.args, f"{shlex.join(argv)}: unexpected arguments {ctx.args}"
            return
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)
        assert command is not None, shlex.join(argv)
        parent = ctx


def test_check_cli_catches_mistakes() -> None:
    check_cli(["stitchwork", "worker", "--name", "w", "--concurrency", "2"])
    for wrong in (["stitchwork", "upx"], ["stitchwork", "up", "--bogus"], ["stitchwork", "up", "--port", "high"],
                  ["stitchwork", "worker", "--name"], ["stitchwork", "runs", "lss"]):
        with pytest.raises(Exception):  # noqa: B017 - Click's usage errors
            check_cli(wrong)


def test_dockerfile_runs_as_a_user_with_a_state_volume_and_a_health_check() -> None:
    final = stage()
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server must not run as root"
    env = " ".join(args for op, args in final if op == "ENV")
    assert "STITCHWORK_STATE_DIR=/var/lib/stitchwork" in env
    volumes = [json.loads(args) for op, args in final if op == "VOLUME"]
    assert ["/var/lib/stitchwork"] in volumes
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "/healthz" in health and "--start-period" in health
    (expose,) = [args for op, args in final if op == "EXPOSE"]
    assert expose == "8470"


def test_dockerfile_commands_exist_in_the_cli() -> None:
    final = stage()
    (cmd,) = [json.loads(args) for op, args in final if op == "CMD"]
    check_cli(cmd)
    assert cmd[cmd.index("--port") + 1] == "8470"
    runs = [shlex.split(args) for op, args in final if op == "RUN" and args.startswith("stitchwork ")]
    assert runs, "the image prepares the wasm:// module at build time"
    for argv in runs:
        check_cli(argv)


def test_dockerfile_installs_from_the_lock_with_real_extras() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    installs = [args for op, args in dockerfile() if op == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        for command in args.split("&&"):
            if "pip install" not in command:
                continue
            assert "-c requirements.lock" in command, command
            for group in re.findall(r"\.\[([\w,]+)\]", command):
                assert set(group.split(",")) <= extras, command
    copied = " ".join(args for op, args in dockerfile() if op == "COPY")
    assert "requirements.lock" in copied and "pyproject.toml" in copied


def test_the_health_check_path_needs_no_token() -> None:
    from stitchwork.interfaces.http.app import PUBLIC_PATHS

    assert "/healthz" in PUBLIC_PATHS  # tests/interfaces/test_http_app.py calls it


def test_compose_has_server_nats_and_two_workers() -> None:
    services = compose()["services"]
    assert "nats" in services and "server" in services
    workers = [s for s in services.values() if s.get("command", [None, None])[:2] == ["stitchwork", "worker"]]
    assert len(workers) >= 2
    names = [w["command"][w["command"].index("--name") + 1] for w in workers]
    assert len(set(names)) == len(names), "each worker needs its own name (its state dir)"
    nats = services["nats"]
    assert "-js" in nats["command"] and "nats" in nats["image"] and nats.get("healthcheck")


def test_compose_binds_the_api_to_loopback_and_shares_the_state_volume() -> None:
    data = compose()
    server = data["services"]["server"]
    assert server["ports"] and all(str(p).startswith("127.0.0.1:") for p in server["ports"])
    for name, service in data["services"].items():
        if name == "nats":
            continue
        assert "state:/var/lib/stitchwork" in service["volumes"], name
        assert service["environment"]["STITCHWORK_MESSAGING__BUS"] == "nats://nats:4222"
    assert "state" in data["volumes"]
    text = (ROOT / "compose.yaml").read_text()
    assert "# Loopback only" in text  # the comment on exposing it


@pytest.mark.parametrize("service", ["server", "worker-1", "worker-2"])
def test_compose_commands_and_settings_exist(service: str, tmp_path: Path) -> None:
    spec = compose()["services"][service]
    check_cli(spec["command"])
    environ = {k: str(v) for k, v in spec.get("environment", {}).items()}
    assert all(k.startswith("STITCHWORK_") for k in environ)
    config = load_config(environ={**environ, "STITCHWORK_STATE_DIR": str(tmp_path)})  # unknown keys would raise
    assert config.messaging.bus == "nats://nats:4222"


def test_dockerignore_keeps_the_venv_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
