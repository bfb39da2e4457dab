"""``stitchwork eval agentdojo``: the worst-case AgentDojo evaluation through the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.table import Table

from stitchwork.errors import StitchworkError
from stitchwork.interfaces.cli._common import console, err, escape, server_side

eval_app = typer.Typer(help="Evaluate the gateway against public benchmarks.", no_args_is_help=True)


def _pct(part: float) -> str:
    return f"{100 * part:.1f}%"


@eval_app.command("agentdojo")
def agentdojo(
    suite: list[str] = typer.Option(None, "--suite", help="Suite(s) to run (default: all four)."),
    benchmark_version: str = typer.Option("v1.2.2", "--benchmark-version", help="AgentDojo benchmark version."),
    json_path: Path = typer.Option(None, "--json", help="Also write the totals as one JSON object here."),
    policy_dir: list[Path] = typer.Option(None, "--policy-dir", help="Extra Cedar policy directories."),
    show_tools: bool = typer.Option(False, "--show-tools", help="Print how each tool was classified and exit."),
) -> None:
    """Runs AgentDojo's suites in the worst case (the planner obeys the attacker) through the real gateway."""
    harness = server_side("stitchwork.eval.agentdojo", "stitchwork eval agentdojo")
    SUITES, evaluate, require_agentdojo, tool_manifests = (
        harness.SUITES, harness.evaluate, harness.require_agentdojo, harness.tool_manifests)
    try:
        require_agentdojo()
        suites = tuple(suite) if suite else SUITES
        if show_tools:
            from agentdojo.task_suite.load_suites import get_suites

            loaded = get_suites(benchmark_version)
            for name in suites:
                for tool in tool_manifests(loaded[name]):
                    line = f"{name:10} {tool.name:40} {tool.side_effect.value:12} target={tool.target!r}"
                    console.print(line, soft_wrap=True)
            return
        report = asyncio.run(evaluate(suites=suites, benchmark_version=benchmark_version,
                                      policy_dirs=tuple(policy_dir or ()),
                                      progress=lambda m: err.print(f"[dim]{escape(m)}[/dim]", highlight=False)))
    except StitchworkError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    totals = report.totals()
    table = Table(title=f"AgentDojo {benchmark_version}, worst case (no model), gateway vs no gateway")
    for column in ("suite", "pairs", "scorable", "attacks ok (policy, deny)", "attacks ok (no gateway)",
                   "output-only ok (policy / none)", "utility no attack (policy / none)",
                   "utility under attack (policy / none)", "approvals / benign task"):
        table.add_column(column)
    rows = [(name, data) for name, data in totals["suites"].items()]
    for name, d in rows:
        users = max(d["user_tasks"], 1)
        scorable = max(d["scorable_pairs"], 1)
        needs_call = d["scorable_pairs"] - d["output_only_pairs"]
        table.add_row(
            name, str(d["pairs"]), str(d["scorable_pairs"]),
            f"{d['attacks_succeeded']}/{needs_call}", f"{d['baseline_attacks_succeeded']}/{needs_call}",
            f"{d['attacks_succeeded_output_only']} / {d['baseline_attacks_succeeded_output_only']}"
            f" of {d['output_only_pairs']}",
            f"{_pct(d['utility_no_attack'] / users)} / {_pct(d['baseline_utility_no_attack'] / users)}",
            f"{_pct(d['utility_under_attack'] / scorable)} / {_pct(d['baseline_utility_under_attack'] / scorable)}",
            f"{d['approvals_benign'] / users:.2f}",
        )
    needs_call = totals["scorable_pairs"] - totals["output_only_pairs"]
    table.add_row(
        "total", str(totals["pairs"]), str(totals["scorable_pairs"]),
        f"{totals['attacks_succeeded']}/{needs_call}", f"{totals['baseline_attacks_succeeded']}/{needs_call}",
        f"{totals['attacks_succeeded_output_only']} / {totals['baseline_attacks_succeeded_output_only']}"
        f" of {totals['output_only_pairs']}",
        f"{_pct(totals['utility_no_attack'])} / {_pct(totals['baseline_utility_no_attack'])}",
        f"{_pct(totals['utility_under_attack'])} / {_pct(totals['baseline_utility_under_attack'])}",
        f"{totals['approvals_per_benign_task']:.2f}",
        style="bold",
    )
    console.print(table)
    console.print(f"{totals['seconds']} s; attacks ok = AgentDojo's security check passed (approvals answered deny); "
                  "utility with approvals answered approve.")
    if json_path:
        report.write_json(json_path)
        console.print(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    """Adds ``stitchwork eval`` to the CLI."""
    app.add_typer(eval_app, name="eval")
