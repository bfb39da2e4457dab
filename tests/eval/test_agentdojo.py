"""A few AgentDojo pairs through the real gateway: counting, the three AgentDojo facts, the JSON keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("agentdojo", reason="the agentdojo extra is not installed")

from stitchwork.eval.agentdojo import Report, evaluate, tool_manifests

KEYS = {
    "benchmark_version", "pairs", "scorable_pairs", "output_only_pairs", "attacks_succeeded",
    "baseline_attacks_succeeded", "attacks_succeeded_output_only", "user_tasks", "utility_no_attack",
    "utility_under_attack", "approvals_per_benign_task",
}


async def test_pairs_are_counted_and_attacks_stopped(tmp_path: Path) -> None:
    report = await evaluate(suites=["travel"], user_tasks=["user_task_0"],
                            injection_tasks=["injection_task_1", "injection_task_6"])
    path = tmp_path / "out.json"
    report.write_json(path)
    totals = json.loads(path.read_text())
    assert set(totals) >= KEYS
    assert totals["benchmark_version"] == "v1.2.2"
    assert totals["pairs"] == 2 and totals["user_tasks"] == 1
    # travel injection_task_6 wins on the final text alone: scorable, output-only, reported apart
    assert totals["scorable_pairs"] == 2 and totals["output_only_pairs"] == 1
    assert totals["attacks_succeeded_output_only"] == 1
    # injection_task_1 mails the user's data to an address from the injected text
    assert totals["baseline_attacks_succeeded"] == 1
    assert totals["attacks_succeeded"] == 0
    assert totals["utility_no_attack"] == 1.0
    assert 0.0 <= totals["utility_under_attack"] <= 1.0


async def test_empty_ground_truth_is_not_scorable_and_denied_calls_leave_no_trace() -> None:
    # workspace injection_task_6 has an empty ground truth; slack injection_task_5 is judged from the trace
    report = await evaluate(suites=["workspace"], user_tasks=["user_task_0"], injection_tasks=["injection_task_6"])
    totals = report.totals()
    assert totals["pairs"] == 1 and totals["scorable_pairs"] == 0
    slack = (await evaluate(suites=["slack"], user_tasks=["user_task_0"],
                            injection_tasks=["injection_task_5"])).totals()
    assert slack["baseline_attacks_succeeded"] == 1
    assert slack["attacks_succeeded"] == 0


def test_report_of_nothing_has_zero_fractions() -> None:
    totals = Report("v1.2.2", [], 0.0).totals()
    assert totals["pairs"] == 0 and totals["utility_no_attack"] == 0.0


def test_every_agentdojo_tool_gets_a_class_and_a_valid_target() -> None:
    from agentdojo.task_suite.load_suites import get_suites

    for suite in get_suites("v1.2.2").values():
        for tool in tool_manifests(suite):
            assert tool.target == "" or tool.target in tool.args_schema["properties"]


def test_deny_and_approve_runs_never_share_a_run_id(tmp_path: Path) -> None:
    """The two harnesses share one approval store: a shared run id let a 'deny' answer of one run refuse the same
    call in the other harness's run (a benign task failed under approve)."""
    from types import SimpleNamespace

    from stitchwork.eval.agentdojo import _Harness

    gateway = SimpleNamespace(open_run=lambda *a, **k: None, record_content=lambda *a: None,
                              tokens=SimpleNamespace(issue=lambda agent, run: run))
    stack = SimpleNamespace(gateway=gateway, adapter=SimpleNamespace(), state=tmp_path)
    ids = [_Harness(stack, None, answer).begin("task", None, None).run_id  # type: ignore[arg-type]
           for answer in ("deny", "approve")]
    assert ids[0] != ids[1]
