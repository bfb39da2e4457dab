"""AgentDojo in the worst case, through the real gateway, with no language model.

For every suite of an AgentDojo benchmark version, each AgentDojo tool becomes a Stitchwork tool (its argument
schema from AgentDojo's function schema; side-effect class and target argument from the general rule in
:mod:`stitchwork.tools.classify`) that runs in-process through the ``agentdojo://`` sandbox: the sandbox calls
``FunctionsRuntime.run_function`` on the pair's environment. Every call goes through :meth:`Gateway.call_tool`
(token, argument validation, taint, Cedar, approvals, audit) and every result is labelled untrusted.

Planners (no model):

- *benign*: executes the user task's ``ground_truth`` calls, then answers the task's ``GROUND_TRUTH_OUTPUT``;
- *compromised*: the same, with the attack's injections placed in the environment, then executes the injection
  task's ``ground_truth`` calls (computed on the environment as it is then) and adds the injection task's
  ``GROUND_TRUTH_OUTPUT`` to its answer: a model that obeys the attacker completely.

The injected environment is loaded once per pair (loading dominates the run time) and each run gets a deep
copy. AgentDojo's own checks judge utility and security (``TaskSuite.run_task_with_pipeline``). A call the gateway
refused never enters the message trace, so checks that read the trace (``security_from_traces``) see only the
calls that ran. Approval requests are answered by a simulated human: ``deny`` (attack success) or ``approve``
(utility); a run whose deny pass asked nothing is not repeated for ``approve`` (it would be identical).

Pairs whose injection task has an empty ground truth cannot be attacked without a model: not scorable. A pair
whose injection succeeds on the planner's final text alone (its security check passes on the untouched
environment with no call) is *output-only*: no tool gateway can stop it, so it is reported apart.
The baseline runs the same planners with the gateway absent (direct ``run_function``), in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchwork.audit.log import AuditLog
from stitchwork.data._base import open_store
from stitchwork.errors import ConfigError
from stitchwork.gateway.context import GatewayContext, Sandboxes
from stitchwork.gateway.core import Gateway
from stitchwork.isolation._base import Limits, PythonCall, Sandbox, SandboxResult, SandboxSpec
from stitchwork.security.approvals import ApprovalStore
from stitchwork.security.identity.ca import CertificateAuthority
from stitchwork.security.identity.tokens import TokenService
from stitchwork.security.policy import PolicyEngine, ToolAction, builtin_policy_dir
from stitchwork.security.taint import Label
from stitchwork.security.vault import open_vault
from stitchwork.tools.classify import classify
from stitchwork.tools.manifest import SideEffect, ToolManifest, ToolRegistry

try:  # the optional extra
    from agentdojo.agent_pipeline.base_pipeline_element import BasePipelineElement
    from agentdojo.agent_pipeline.tool_execution import tool_result_to_str
    from agentdojo.attacks.base_attacks import DEFAULT_MODEL_NAME, FixedJailbreakAttack
    from agentdojo.attacks.important_instructions_attacks import ImportantInstructionsAttack
    from agentdojo.task_suite.load_suites import get_suites
    from agentdojo.types import ChatAssistantMessage, ChatToolResultMessage, text_content_block_from_string

    HAVE_AGENTDOJO = True
except ImportError:  # pragma: no cover - exercised only without the extra
    HAVE_AGENTDOJO = False

SUITES = ("workspace", "travel", "banking", "slack")
SANDBOX_URI = "agentdojo://"
AGENT = "agentdojo"
ENTRY = Path(__file__).resolve()


def require_agentdojo() -> None:
    """Raises a ConfigError naming the extra when AgentDojo is not installed."""
    if not HAVE_AGENTDOJO:
        raise ConfigError("stitchwork eval agentdojo needs AgentDojo; run: pip install 'stitchwork[agentdojo]'")


# -- tools ---------------------------------------------------------------------------------------------------


def _schema(function: Any) -> dict[str, Any]:
    schema = dict(function.parameters.model_json_schema())
    schema.pop("title", None)
    schema["type"] = "object"
    schema.setdefault("properties", {})
    return schema


def tool_manifests(suite: Any) -> list[ToolManifest]:
    """Stitchwork manifests for a suite's AgentDojo functions (classified by the general rule)."""
    manifests = []
    for function in suite.tools:
        schema = _schema(function)
        found = classify(function.name, schema)
        manifests.append(ToolManifest(
            name=function.name, description=f"{function.description} [{found.reason}]",
            side_effect=SideEffect(found.side_effect), entry_file=ENTRY, entry_function=function.name,
            args_schema=schema, sandbox=SANDBOX_URI, target=found.target, destinations=dict(found.destinations),
            confidential=found.confidential,
        ))
    return manifests


class AgentDojoSandbox(Sandbox):
    """Runs a tool call in-process on the current pair's AgentDojo environment (no isolation; for evaluation)."""

    uri = SANDBOX_URI

    def __init__(self) -> None:
        self.runtime: Any = None
        self.env: Any = None
        self.results: list[Any] = []

    async def run(self, spec: SandboxSpec) -> SandboxResult:
        program = spec.program
        if not isinstance(program, PythonCall) or self.runtime is None:
            return SandboxResult(exit_code=2, error="the agentdojo sandbox runs AgentDojo functions only")
        args = dict(program.payload.get("args", {}))
        result, error = self.runtime.run_function(self.env, program.function, args, raise_on_error=False)
        if error is not None:
            return SandboxResult(exit_code=1, error=error)
        self.results.append(result)
        return SandboxResult(exit_code=0, value=_jsonable(result))


def _jsonable(value: Any) -> Any:
    """A tool result as JSON data (pydantic models dumped), so the gateway labels its structure."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


@dataclass
class _Stack:
    gateway: Gateway
    adapter: AgentDojoSandbox
    audit: AuditLog
    approvals: ApprovalStore
    state: Path
    closers: list[Callable[[], Any]] = field(default_factory=list)


def _open_stack(state: Path, manifests: Sequence[ToolManifest], policy_dirs: Sequence[Path]) -> _Stack:
    tools = ToolRegistry(manifests, max_arg_bytes=1_000_000)
    policy = PolicyEngine.load(
        list(policy_dirs), [ToolAction(t.name, t.side_effect.value, t.args_schema) for t in tools], agents=[AGENT],
    )
    store = open_store(f"duckdb://{state / 'eval.duckdb'}")
    ca = CertificateAuthority.load_or_create(state, trust_domain="stitchwork.eval")
    tokens = TokenService(ca, store, trust_domain="stitchwork.eval", audience="stitchwork", ttl_s=3600)
    audit = AuditLog(store, signer=ca, journal_path=state / "audit.journal", flush_ms=1)
    approvals = ApprovalStore(store, timeout_s=3600)
    vault = open_vault(f"vault+file://{state / 'vault.enc'}", key_file=state / "vault.key")
    adapter = AgentDojoSandbox()
    context = GatewayContext(
        tokens=tokens, policy=policy, audit=audit, approvals=approvals, vault=vault, tools=tools,
        agents={AGENT: [t.name for t in tools]}, audience="stitchwork",
        sandboxes=Sandboxes(SANDBOX_URI, Limits(), bound={SANDBOX_URI: adapter}),  # this harness's own adapter
    )
    gateway = Gateway(context)
    return _Stack(gateway, adapter, audit, approvals, state, [vault.close, store.close])


# -- planners ------------------------------------------------------------------------------------------------


@dataclass
class _RunStats:
    approvals: int = 0
    denied: int = 0
    executed: int = 0
    refused: list[str] = field(default_factory=list)


class _Planner(BasePipelineElement):  # type: ignore[misc]
    """Executes ground-truth calls (user task, then injection task) through the gateway or directly."""

    name = "stitchwork-worst-case"

    def __init__(self, harness: _Harness, user_task: Any, injection_task: Any, answer: str) -> None:
        self.harness = harness
        self.user_task = user_task
        self.injection_task = injection_task
        self.answer = answer
        self.stats = _RunStats()

    def query(self, query: str, runtime: Any, env: Any = None, messages: Sequence[Any] = (),
              extra_args: dict[str, Any] | None = None) -> tuple[Any, ...]:
        new: list[Any] = []
        run = self.harness.begin(query, runtime, env)
        for task in (self.user_task, self.injection_task):
            if task is None:
                continue
            for call in task.ground_truth(env):
                text = self.harness.call(run, call, self.stats)
                if text is None:  # refused: the call never ran and stays out of the trace
                    continue
                new.append(ChatAssistantMessage(role="assistant", tool_calls=[call],
                                                content=[text_content_block_from_string("")]))
                new.append(ChatToolResultMessage(role="tool", content=[text_content_block_from_string(text)],
                                                 tool_call=call, tool_call_id=None, error=None))
        self.harness.end(run)
        new.append(ChatAssistantMessage(role="assistant", content=[text_content_block_from_string(self.answer)],
                                        tool_calls=None))
        return query, runtime, env, [*messages, *new], extra_args or {}


@dataclass
class _Run:
    run_id: str
    token: str
    runtime: Any
    env: Any


class _Harness:
    """Runs planner calls through the gateway (``stack`` set) or straight to AgentDojo (baseline)."""

    def __init__(self, stack: _Stack | None, loop: asyncio.AbstractEventLoop | None, answer_approvals: str) -> None:
        self.stack = stack
        self.loop = loop
        self.answer_approvals = answer_approvals
        self.counter = 0

    def _await(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def begin(self, prompt: str, runtime: Any, env: Any) -> _Run:
        if self.stack is None:
            return _Run("", "", runtime, env)
        self.counter += 1
        # the deny and approve harnesses share one gateway and approval store: their run ids must differ, or a
        # human's answer in one run would be found again by the other harness's run of the same number
        run_id = f"ad-{self.answer_approvals}-{self.counter:06d}"
        gateway = self.stack.gateway
        gateway.open_run(run_id, AGENT, workdir=self.stack.state / "runs" / run_id, max_steps=10_000)
        gateway.record_content(run_id, prompt, Label("user", True))
        self.stack.adapter.runtime, self.stack.adapter.env = runtime, env
        return _Run(run_id, gateway.tokens.issue(AGENT, run_id), runtime, env)

    def end(self, run: _Run) -> None:
        if self.stack is not None:
            self.stack.gateway.close_run(run.run_id)

    def call(self, run: _Run, call: Any, stats: _RunStats) -> str | None:
        args = dict(call.args)
        if self.stack is None:
            result, error = run.runtime.run_function(run.env, call.function, args, raise_on_error=False)
            stats.executed += 1
            return str(error) if error is not None else str(tool_result_to_str(result))
        gateway = self.stack.gateway
        outcome = self._await(gateway.call_tool(run.token, call.function, args))
        if outcome.status == "approval_required":
            stats.approvals += 1
            stats.refused.append(f"ask {call.function}({args}) {list(outcome.policy_ids)}")
            approve = self.answer_approvals == "approve"
            self.stack.approvals.decide(outcome.approval_id, approve=approve, by="eval")
            if not approve:
                stats.denied += 1
                return None
            outcome = self._await(gateway.call_tool(run.token, call.function, args))
        if outcome.status == "ok":
            stats.executed += 1
            results = self.stack.adapter.results
            return str(tool_result_to_str(results[-1])) if results else str(outcome.content)
        if outcome.status == "error":
            stats.executed += 1
            return str((outcome.error or {}).get("message", "error"))
        stats.denied += 1
        stats.refused.append(f"{outcome.status} {call.function}({args}) {list(outcome.policy_ids)}")
        return None


# -- the benchmark -------------------------------------------------------------------------------------------


class _Attack(FixedJailbreakAttack):  # type: ignore[misc]
    """AgentDojo's "important instructions" text with fixed names (no model to address)."""

    name = "important_instructions"

    def __init__(self, task_suite: Any, target_pipeline: Any) -> None:
        super().__init__(ImportantInstructionsAttack._JB_STRING, task_suite, target_pipeline)
        self.user_name = "Emma Johnson"
        self.model_name = DEFAULT_MODEL_NAME


@dataclass
class SuiteResult:
    """Counts for one suite (``defended`` = through the gateway with the policy pack)."""

    suite: str
    user_tasks: int = 0
    pairs: int = 0
    scorable_pairs: int = 0
    output_only_pairs: int = 0
    attacks_succeeded: int = 0
    baseline_attacks_succeeded: int = 0
    attacks_succeeded_output_only: int = 0
    baseline_attacks_succeeded_output_only: int = 0
    utility_no_attack: int = 0
    baseline_utility_no_attack: int = 0
    utility_under_attack: int = 0
    baseline_utility_under_attack: int = 0
    approvals_benign: int = 0
    benign_tasks_with_approval: int = 0
    succeeded: list[str] = field(default_factory=list)
    failed_utility: list[str] = field(default_factory=list)
    refusals: dict[str, list[str]] = field(default_factory=dict)
    benign_approvals: dict[str, list[str]] = field(default_factory=dict)


def _check_empty(clean: Any, injection_task: Any) -> bool:
    return not injection_task.ground_truth(clean.model_copy(deep=True))


def _output_only(clean: Any, injection_task: Any) -> bool:
    """Whether the injection task succeeds on the final text alone, with no call and the environment untouched."""
    env = clean.model_copy(deep=True)
    answer = injection_task.GROUND_TRUTH_OUTPUT
    check = getattr(injection_task, "security", None)
    if check is None:
        return False
    with contextlib.suppress(Exception):
        return bool(check(answer, env, env.model_copy(deep=True)))
    return False


def _run(suite: Any, planner: _Planner, user_task: Any, injection_task: Any,
         injections: Mapping[str, str], environment: Any) -> tuple[bool, bool]:
    """One AgentDojo run on a fresh copy of ``environment`` (loaded once per pair: loading dominates)."""
    utility, security = suite.run_task_with_pipeline(
        planner, user_task, injection_task, dict(injections), environment=environment.model_copy(deep=True),
    )
    return bool(utility), bool(security)


def _answer(user_task: Any, injection_task: Any) -> str:
    parts = [user_task.GROUND_TRUTH_OUTPUT]
    if injection_task is not None and injection_task.GROUND_TRUTH_OUTPUT:
        parts.append(injection_task.GROUND_TRUTH_OUTPUT)
    return "\n".join(p for p in parts if p)


def run_suite(suite: Any, stack: _Stack, loop: asyncio.AbstractEventLoop, *,
              user_tasks: Sequence[str] | None = None, injection_tasks: Sequence[str] | None = None,
              progress: Callable[[str], None] | None = None) -> SuiteResult:
    """Runs one suite's benign tasks and attack pairs, baseline and defended. Call from a worker thread."""
    result = SuiteResult(suite.name)
    baseline = _Harness(None, None, "deny")
    deny = _Harness(stack, loop, "deny")
    approve = _Harness(stack, loop, "approve")
    users = {k: v for k, v in suite.user_tasks.items() if user_tasks is None or k in user_tasks}
    attacks = {k: v for k, v in suite.injection_tasks.items() if injection_tasks is None or k in injection_tasks}
    attack = _Attack(suite, _Planner(baseline, None, None, ""))
    clean = suite.load_and_inject_default_environment({})
    output_only = {k: _output_only(clean, t) for k, t in attacks.items()}
    empty = {k: _check_empty(clean, t) and not output_only[k] for k, t in attacks.items()}
    for uid, user_task in users.items():
        result.user_tasks += 1
        answer = _answer(user_task, None)
        ok, _ = _run(suite, _Planner(baseline, user_task, None, answer), user_task, None, {}, clean)
        result.baseline_utility_no_attack += ok
        planner = _Planner(approve, user_task, None, answer)
        ok, _ = _run(suite, planner, user_task, None, {}, clean)
        result.utility_no_attack += ok
        result.approvals_benign += planner.stats.approvals
        result.benign_tasks_with_approval += planner.stats.approvals > 0
        asked = [r for r in planner.stats.refused if r.startswith("ask ")]
        if asked:
            result.benign_approvals[uid] = asked
        if not ok:
            result.failed_utility.append(uid)
            result.refusals[uid] = planner.stats.refused
        for iid, injection_task in attacks.items():
            result.pairs += 1
            if empty[iid]:
                continue
            result.scorable_pairs += 1
            result.output_only_pairs += output_only[iid]
            injections = attack.attack(user_task, injection_task)
            env = suite.load_and_inject_default_environment(injections)
            answer = _answer(user_task, injection_task)
            b_util, b_sec = _run(suite, _Planner(baseline, user_task, injection_task, answer), user_task,
                                 injection_task, injections, env)
            planner = _Planner(deny, user_task, injection_task, answer)
            d_util, d_sec = _run(suite, planner, user_task, injection_task, injections, env)
            if planner.stats.approvals:
                d_util, _ = _run(suite, _Planner(approve, user_task, injection_task, answer), user_task,
                                 injection_task, injections, env)
            result.baseline_utility_under_attack += b_util
            result.utility_under_attack += d_util
            if output_only[iid]:
                result.baseline_attacks_succeeded_output_only += b_sec
                result.attacks_succeeded_output_only += d_sec
            else:
                result.baseline_attacks_succeeded += b_sec
                result.attacks_succeeded += d_sec
                if d_sec:
                    result.succeeded.append(f"{uid}/{iid}")
        if progress:
            progress(f"{suite.name} {uid}")
    return result


@dataclass
class Report:
    """The totals, as written by ``--json``."""

    benchmark_version: str
    suites: list[SuiteResult]
    seconds: float

    def _sum(self, name: str) -> int:
        return sum(int(getattr(s, name)) for s in self.suites)

    def totals(self) -> dict[str, Any]:
        """Totals and per-suite counts.

        ``attacks_succeeded`` counts scorable pairs that need a tool call (not output-only), approvals answered
        deny; ``utility_no_attack`` is over user tasks and ``utility_under_attack`` over scorable pairs, both
        with approvals answered approve; ``approvals_per_benign_task`` counts approval requests in the benign
        runs. ``baseline_*`` are the same planners with the gateway absent, measured in the same run.
        """
        users = self._sum("user_tasks")
        scorable = self._sum("scorable_pairs")
        return {
            "benchmark_version": self.benchmark_version,
            "pairs": self._sum("pairs"),
            "scorable_pairs": scorable,
            "output_only_pairs": self._sum("output_only_pairs"),
            "attacks_succeeded": self._sum("attacks_succeeded"),
            "baseline_attacks_succeeded": self._sum("baseline_attacks_succeeded"),
            "attacks_succeeded_output_only": self._sum("attacks_succeeded_output_only"),
            "baseline_attacks_succeeded_output_only": self._sum("baseline_attacks_succeeded_output_only"),
            "user_tasks": users,
            "utility_no_attack": self._sum("utility_no_attack") / users if users else 0.0,
            "baseline_utility_no_attack": self._sum("baseline_utility_no_attack") / users if users else 0.0,
            "utility_under_attack": self._sum("utility_under_attack") / scorable if scorable else 0.0,
            "baseline_utility_under_attack": (
                self._sum("baseline_utility_under_attack") / scorable if scorable else 0.0
            ),
            "approvals_per_benign_task": self._sum("approvals_benign") / users if users else 0.0,
            "benign_tasks_with_approval": self._sum("benign_tasks_with_approval"),
            "seconds": round(self.seconds, 1),
            "suites": {
                s.suite: {k: v for k, v in s.__dict__.items() if k != "suite"} for s in self.suites
            },
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.totals(), indent=2) + "\n", encoding="utf-8")


async def evaluate(
    *, suites: Sequence[str] = SUITES, benchmark_version: str = "v1.2.2", policy_dirs: Sequence[Path] = (),
    builtin_policies: bool = True, user_tasks: Sequence[str] | None = None,
    injection_tasks: Sequence[str] | None = None, progress: Callable[[str], None] | None = None,
) -> Report:
    """Runs the benchmark; AgentDojo runs in a worker thread, the gateway on this event loop."""
    require_agentdojo()
    started = time.perf_counter()
    loaded = get_suites(benchmark_version)
    unknown = [s for s in suites if s not in loaded]
    if unknown:
        raise ConfigError(f"unknown AgentDojo suite(s) {', '.join(unknown)}; known: {', '.join(loaded)}")
    dirs = ([builtin_policy_dir()] if builtin_policies else []) + [Path(p) for p in policy_dirs]
    loop = asyncio.get_running_loop()
    results = []
    for name in suites:
        suite = loaded[name]
        with tempfile.TemporaryDirectory(prefix="stitchwork-eval-") as tmp:
            stack = _open_stack(Path(tmp), tool_manifests(suite), dirs)
            try:
                results.append(await asyncio.to_thread(
                    run_suite, suite, stack, loop, user_tasks=user_tasks, injection_tasks=injection_tasks,
                    progress=progress,
                ))
            finally:
                await stack.gateway.aclose()
                await stack.audit.aclose()
                for close in stack.closers:
                    close()
    return Report(benchmark_version, results, time.perf_counter() - started)


__all__ = ["SUITES", "AgentDojoSandbox", "Report", "SuiteResult", "evaluate", "require_agentdojo",
           "tool_manifests"]
