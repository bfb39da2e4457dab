"""A CLI that scripts can trust: exit codes, --json everywhere, no hard wrapping, literal help, empty results,
a progress line only on terminals, config errors that name file and key, `runs ls`, the command tree."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from stitchwork.interfaces.cli import _common
from stitchwork.interfaces.cli.app import app
from tests.workers.durable_fixtures import build, call

runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config whose agent ``scribe`` completes (one tool call, then an answer); ``cashier`` waits for approval."""
    build(tmp_path, [{"tool_calls": [call("c1", "x")]}, {"content": "finished"}])
    monkeypatch.setenv("STITCHWORK_CONFIG", str(tmp_path / "stitchwork.toml"))
    monkeypatch.delenv("COLUMNS", raising=False)
    return tmp_path


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def script(root: Path, agent: str, turns: list[dict[str, Any]]) -> None:
    (root / "agents" / f"{agent}.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\n")
    (root / "agents" / f"{agent}.toml").write_text(
        f'name = "{agent}"\nmodel = "scripted://{agent}.jsonl"\ntools = ["append"]\nmax_steps = 5\n')


# -- exit codes ----------------------------------------------------------------------------------------------------

def test_a_completed_run_exits_0(root: Path) -> None:
    result = invoke("run", "scribe", "append x", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "completed"


def test_a_failed_run_exits_1_and_says_why_on_stderr(root: Path) -> None:
    script(root, "broken", [{"tool_calls": [call("c1", "x")]}])  # the model has no second turn
    result = invoke("run", "broken", "append x")
    assert result.exit_code == 1, result.output
    assert "failed" in result.stdout and "only 1 turns" in result.stderr


def test_a_run_whose_model_call_is_denied_exits_3(root: Path) -> None:
    with (root / "stitchwork.toml").open("a") as handle:
        handle.write('[compute.agents.scribe]\nmodels = ["some-other-model"]\n')
    result = invoke("run", "scribe", "append x", "--json")
    assert result.exit_code == 3, result.output
    record = json.loads(result.stdout)
    assert record["status"] == "denied" and "denied" in record["error"]


def test_a_run_waiting_for_approval_exits_4(root: Path) -> None:
    result = invoke("run", "cashier", "pay p1")
    assert result.exit_code == 4, result.output
    assert "waiting for approval" in result.stdout


def test_a_run_out_of_time_exits_5(root: Path) -> None:
    result = invoke("run", "scribe", "append x", "--json", env={"STITCHWORK_AGENTS__MAX_SECONDS": "-1"})
    assert result.exit_code == 5, result.output
    assert json.loads(result.stdout)["status"] == "timed_out"


def test_a_run_that_cannot_start_exits_2(root: Path) -> None:
    result = invoke("run", "nobody", "do things")
    assert result.exit_code == 2 and "unknown agent 'nobody'" in result.stderr
    assert result.stdout == ""


def test_every_run_status_has_an_exit_code() -> None:
    from stitchwork.agents.runs import FINISHED, RunStatus

    assert {s.value for s in RunStatus} <= set(_common.RUN_EXIT)
    assert {s.value for s in FINISHED} == {"completed", "failed", "budget_exhausted", "denied", "timed_out"}
    assert [_common.RUN_EXIT[s] for s in ("completed", "failed", "denied", "waiting_approval", "timed_out")] == \
        [0, 1, 3, 4, 5]


def test_errors_map_to_exit_codes() -> None:
    from stitchwork.errors import ConfigError, MemoryDenied, PolicyDenied, RunTimedOut
    from stitchwork.interfaces.cli.client import RemoteError

    assert _common.exit_code_for(PolicyDenied("no")) == 3
    assert _common.exit_code_for(MemoryDenied("no")) == 3
    assert _common.exit_code_for(RemoteError(403, {"error": "policy_denied", "message": "no"})) == 3
    assert _common.exit_code_for(RunTimedOut("late")) == 5
    assert _common.exit_code_for(ConfigError("bad")) == 2
    assert _common.exit_code_for(RemoteError(404, {"error": "run_error", "message": "unknown run"})) == 2


def test_finished_statuses_are_all_subject_to_retention() -> None:
    from stitchwork.agents.runs import FINISHED
    from stitchwork.audit.retention import DEFAULT_POLICIES

    (runs,) = [p for p in DEFAULT_POLICIES if p.table == "runs"]
    assert set(re.findall(r"'(\w+)'", runs.where)) == {s.value for s in FINISHED}


# -- --json on every read command ----------------------------------------------------------------------------------

ACTIONS = {
    "up", "worker", "demo", "kafka-export", "submit", "secrets set", "secrets rm", "memory grant", "memory revoke",
    "runs resubmit", "sandbox run", "sandbox bench", "eval agentdojo",
}
"""Commands that act rather than read (``submit`` always prints JSON; ``sandbox run`` prints the program's output and
a JSON summary on stderr; ``eval agentdojo --json PATH`` writes a file)."""


def commands(group: Any = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, click command) for every command; Typer builds them with its own copy of Click."""
    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):
            yield from commands(command, f"{path} ")
        else:
            yield path, command


def test_every_read_command_takes_json() -> None:
    missing = [path for path, command in commands() if path not in ACTIONS and not command.hidden
               and not any("--json" in p.opts and getattr(p, "is_flag", False) for p in command.params)]
    assert missing == []
    assert len(list(commands())) > 25


@pytest.mark.parametrize("args", [
    ["approvals", "--json"], ["approvals", "--status", "all", "--json"], ["runs", "ls", "--json"],
    ["audit", "tail", "--json"], ["audit", "query", "SELECT 1 AS one", "--json"], ["audit", "verify", "--json"],
    ["audit", "report", "runs", "--json"], ["secrets", "list", "--json"], ["memory", "ls", "--json"],
    ["memory", "grants", "--json"], ["data", "retention", "--json"], ["doctor", "--json"],
])
def test_json_output_parses(root: Path, args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)


def test_unknown_format_is_a_usage_error(root: Path) -> None:
    result = invoke("approvals", "--format", "yaml")
    assert result.exit_code == 2 and "yaml" in result.output


# -- empty results -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["approvals"], "no approvals pending"),
    (["approvals", "--status", "denied"], "no approvals denied"),
    (["runs", "ls"], "no runs"),
    (["runs", "ls", "--status", "failed"], "no failed runs"),
    (["secrets", "list"], "no secrets stored"),
    (["memory", "ls"], "no agent has memory yet"),
    (["memory", "grants"], "no memory grants"),
    (["audit", "query", "SELECT 1 AS one WHERE false"], "no rows"),
    (["audit", "report", "denied"], "report denied: nothing in this window"),
    (["audit", "query", "SELECT 1 AS one WHERE false", "--format", "csv"], "no rows"),
])
def test_empty_results_say_so_on_stderr_and_print_nothing(root: Path, args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.strip() == message


def test_empty_json_is_an_empty_list(root: Path) -> None:
    result = invoke("approvals", "--json")
    assert json.loads(result.stdout) == [] and result.stderr == ""


# -- no hard wrapping off a terminal -------------------------------------------------------------------------------

def test_long_paths_are_not_broken_across_lines_when_piped(root: Path, tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-directory-name"] * 8, "missing.toml")
    assert len(str(deep)) > 240
    result = invoke("approvals", "--config", str(deep))
    assert result.exit_code == 2
    assert str(deep) in result.stderr.splitlines()[0]


def test_long_values_stay_whole_in_tables_when_piped(root: Path) -> None:
    token = "tok_" + "x9" * 150
    result = invoke("audit", "query", f"SELECT '{token}' AS token, 'a' AS b")
    assert result.exit_code == 0, result.output
    assert any(token in line for line in result.stdout.splitlines())


def test_a_terminal_still_wraps_to_its_width() -> None:
    console = _common.CliConsole(file=io.StringIO(), force_terminal=True, width=40)
    console.print("word " * 30)
    assert max(len(line) for line in console.file.getvalue().splitlines()) <= 40  # type: ignore[attr-defined]


def test_columns_set_by_the_user_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "50")
    console = _common.CliConsole(file=io.StringIO())
    assert console.width == 50
    monkeypatch.delenv("COLUMNS")
    assert console.width == _common.PIPE_WIDTH


def test_the_sandbox_cache_path_under_a_long_home_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              ) -> None:
    """The case that broke: `sandbox prepare` prints the module's path under ``$HOME``, 80 columns when piped."""
    pytest.importorskip("wasmtime")
    from stitchwork.isolation import wasm

    cached = wasm.cwasm_path()
    if not cached.exists():
        pytest.skip("the wasm module is not compiled here (stitchwork sandbox prepare)")
    home = tmp_path.joinpath(*["home-of-a-user-with-a-long-name"] * 5)
    target = wasm.cwasm_path(home / ".cache" / "stitchwork" / "wasm")
    target.parent.mkdir(parents=True)
    target.symlink_to(cached)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    result = invoke("sandbox", "prepare")
    assert result.exit_code == 0, result.output
    assert str(target) in result.stdout.splitlines()[0]


# -- help shows config names literally -----------------------------------------------------------------------------

def _help(*path: str) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.split())


@pytest.mark.parametrize(("path", "literal"), [
    (("data", "retention"), "Apply [data.retention]:"),
    (("worker",), "(default: [messaging] bus, or the one `up` started)"),
    (("sandbox", "run"), "(default: [isolation] default)"),
])
def test_help_shows_config_names_as_written(path: tuple[str, ...], literal: str) -> None:
    assert literal in _help(*path)


def test_every_bracket_in_help_text_survives() -> None:
    checked = 0
    for path, command in commands():
        if command.hidden:
            continue
        shown = _help(*path.split())
        texts = [command.help or ""] + [getattr(p, "help", "") or "" for p in command.params]
        for text in texts:
            for bracketed in re.findall(r"\[[^\]\s]+\]", text):
                assert bracketed in shown, f"{path}: {bracketed} missing from --help"
                checked += 1
    assert checked >= 3


# -- a progress line only on a terminal ----------------------------------------------------------------------------

def test_a_run_shows_a_spinner_on_a_terminal_stderr_only(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(_common, "err", _common.CliConsole(file=screen, force_terminal=True, width=100))
    result = invoke("run", "scribe", "append x")
    assert result.exit_code == 0, result.output
    assert "running scribe" in screen.getvalue()
    assert "running scribe" not in result.stdout


def test_no_spinner_off_a_terminal(root: Path) -> None:
    result = invoke("run", "scribe", "append x")
    assert result.exit_code == 0, result.output
    assert "running scribe" not in result.output and "⠋" not in result.output


def test_working_writes_nothing_off_a_terminal() -> None:
    quiet = io.StringIO()
    original = _common.err
    _common.err = _common.CliConsole(file=quiet)
    try:
        with _common.working("compiling"):
            pass
    finally:
        _common.err = original
    assert quiet.getvalue() == ""


# -- config errors name the file and the key -----------------------------------------------------------------------

def test_a_bad_config_value_names_file_and_key(root: Path) -> None:
    config = root / "stitchwork.toml"
    with config.open("a") as handle:
        handle.write("[server]\nport = 'high'\n")
    result = invoke("approvals")
    assert result.exit_code == 2
    assert f"config file {config}: [server] port: expected int, got 'high'" in result.stderr


def test_a_bad_environment_value_names_the_variable(root: Path) -> None:
    result = invoke("runs", "ls", env={"STITCHWORK_DATA__RETENTION__RUNS_DAYS": "soon"})
    assert result.exit_code == 2
    assert ("environment STITCHWORK_DATA__RETENTION__RUNS_DAYS ([data.retention] runs_days): expected float, got "
            "'soon'") in result.stderr


# -- runs ls / show ------------------------------------------------------------------------------------------------

def test_runs_ls_lists_filters_and_shows(root: Path) -> None:
    done = json.loads(invoke("run", "scribe", "append x", "--json").stdout)
    waiting = json.loads(invoke("run", "cashier", "pay p1", "--json").stdout)
    listed = json.loads(invoke("runs", "ls", "--json").stdout)
    assert [r["id"] for r in listed] == [waiting["id"], done["id"]]  # newest first
    assert "messages" not in listed[0]
    only = json.loads(invoke("runs", "ls", "--status", "completed", "--json").stdout)
    assert [r["id"] for r in only] == [done["id"]]
    assert [r["id"] for r in json.loads(invoke("runs", "ls", "-n", "1", "--json").stdout)] == [waiting["id"]]
    table = invoke("runs", "ls")
    assert done["id"] in table.stdout and "waiting_approval" in table.stdout
    shown = invoke("runs", "show", done["id"], "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["result"] == "finished"
    assert "messages" in json.loads(invoke("runs", "show", done["id"], "--messages", "--json").stdout)
    text = invoke("runs", "show", waiting["id"])
    assert "waiting for approval: " in text.stdout and "task: pay p1" in text.stdout


def test_runs_ls_refuses_an_unknown_status(root: Path) -> None:
    result = invoke("runs", "ls", "--status", "exploded")
    assert result.exit_code == 2 and "unknown run status 'exploded'" in result.stderr
    assert "timed_out" in result.stderr


def test_runs_show_an_unknown_run_exits_2(root: Path) -> None:
    result = invoke("runs", "show", "run_nope")
    assert result.exit_code == 2 and result.stdout == ""


# -- the command tree ----------------------------------------------------------------------------------------------

def test_the_command_tree() -> None:
    tree = {path for path, _ in commands()}
    assert {"runs ls", "runs show", "runs dead", "runs resubmit", "data retention", "data export", "data compact",
            "audit tail", "audit query", "audit verify", "audit report", "sandbox run", "sandbox prepare",
            "memory ls", "memory search"} <= tree
    audit_help = _help("audit")
    assert "export" not in audit_help and "compact" not in audit_help  # old spellings: hidden, still accepted
    assert "export" in _help("data") and "compact" in _help("data")


def test_old_spellings_still_work_with_a_note(root: Path) -> None:
    result = invoke("audit", "compact", "--to", "iceberg+sqlite:///x.db?warehouse=file:///wh")
    assert result.exit_code == 2  # same validation as `data compact`
    assert "`stitchwork audit compact` is now `stitchwork data compact`" in result.stderr
    assert "give --older-than-days or --upto-seq" in result.stderr


def test_remote_mode_settings_are_checked(root: Path) -> None:
    result = invoke("runs", "ls", env={"STITCHWORK_URL": "ftp://example"})
    assert result.exit_code == 2 and "STITCHWORK_URL must be" in result.stderr
    from stitchwork.messaging.server import free_port

    result = invoke("runs", "ls", env={"STITCHWORK_URL": f"http://127.0.0.1:{free_port()}",
                                       "STITCHWORK_TOKEN": "swo_x"})
    assert result.exit_code == 2 and "cannot reach the platform" in result.stderr


def test_help_documents_exit_codes_and_remote_mode() -> None:
    shown = _help()
    assert "Exit codes: 0 done" in shown and "5 timed out" in shown
    assert "STITCHWORK_URL" in shown and "STITCHWORK_TOKEN" in shown


def test_report_names_in_help_match_the_reports() -> None:
    from stitchwork.audit.reports import REPORTS
    from stitchwork.interfaces.cli.audit import REPORT_NAMES

    assert {name: report.title for name, report in REPORTS.items()} == REPORT_NAMES


def test_a_missing_package_anywhere_ends_with_the_extra_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stitchwork.interfaces.cli import app as app_module
    from stitchwork.interfaces.cli import runs

    def missing(config: Any) -> Any:
        raise ModuleNotFoundError("No module named 'duckdb'", name="duckdb")

    monkeypatch.setattr(runs, "client_for", missing)
    monkeypatch.setattr("sys.argv", ["stitchwork", "runs", "ls"])
    with pytest.raises(SystemExit) as exited:
        app_module.main()
    assert exited.value.code == 2
    assert "pip install 'stitchwork[server]'" in capsys.readouterr().err
