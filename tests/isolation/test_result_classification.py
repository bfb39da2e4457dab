"""How a supervised program's outcome becomes a sandbox result: ok, or ``killed`` timeout / memory / pids / disk /
cpu / signal / output, with the error text the agent sees and the usage figures reported. Pure and fast: outcomes
are built by hand, nothing is spawned (the hostile suites check the same classes with real programs)."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest

from stitchwork.isolation._base import Command, Limits, PythonCall
from stitchwork.isolation._cgroup import Stats
from stitchwork.isolation._process import Exit, Outcome, _mentions, cpu_rlimit, sandbox_result, why_stopped

CALL = PythonCall(Path("/tools/t.py"), "run")
CMD = Command(("prog",))
LIMITS = Limits(mem_mb=64, cpu_s=2.0, timeout_s=3.0, max_output_bytes=100, max_pids=8, disk_mb=16)


def usage(utime: float = 0.0, stime: float = 0.0, maxrss: int = 0) -> resource.struct_rusage:
    return resource.struct_rusage((utime, stime, maxrss) + (0,) * 13)


def exited(code: int) -> Exit:
    return Exit(code << 8, usage(0.25, 0.5, 9000))


def signalled(signum: int, utime: float = 0.0) -> Exit:
    return Exit(signum, usage(utime, 0.0, 9000))


def outcome(exit: Exit, *, stdout: bytes = b"", stderr: bytes = b"", killed: str | None = None,
            **kw: Any) -> Outcome:
    return Outcome(stdout, stderr, exit, killed, duration_s=1.5, spawner_rss_kb=4000, **kw)


def answer(**message: Any) -> bytes:
    return b"log line\n" + json.dumps(message).encode() + b"\n\n"


def test_an_answer_is_the_result_with_the_runners_own_usage() -> None:
    result = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=[1, 2],
                                                                   usage={"cpu_s": 0.125, "max_rss_kb": 777})), LIMITS)
    assert (result.ok, result.value, result.error, result.killed, result.truncated) == (True, [1, 2], None, None,
                                                                                        False)
    assert (result.exit_code, result.cpu_s, result.max_rss_kb, result.duration_s) == (0, 0.125, 777, 1.5)
    assert result.stdout.startswith(b"log line") and result.stderr == b""


def test_without_the_runners_usage_the_kernels_is_reported() -> None:
    result = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=1)), LIMITS)
    assert (result.cpu_s, result.max_rss_kb) == (0.75, 9000)
    partial = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=1, usage={"cpu_s": 3})), LIMITS)
    assert (partial.cpu_s, partial.max_rss_kb) == (3.0, 9000)


def test_a_peak_rss_no_larger_than_the_spawners_own_is_not_the_sandboxs() -> None:
    for maxrss, reported in ((4000, 0), (4001, 4001), (100, 0)):
        out = outcome(Exit(0, usage(maxrss=maxrss)), stdout=answer(ok=True, value=1))
        assert sandbox_result(CALL, out, LIMITS).max_rss_kb == reported
    assert sandbox_result(CMD, outcome(Exit(0, None)), LIMITS).max_rss_kb == 0  # reaped elsewhere: no usage
    assert sandbox_result(CMD, outcome(Exit(0, None)), LIMITS).cpu_s == 0.0


def test_cgroup_figures_win_over_the_processes() -> None:
    stats = Stats(cpu_s=1.25, memory_peak_bytes=8 << 20)
    result = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=1, usage={"cpu_s": 0.1}),
                                          stats=stats), LIMITS)
    assert (result.cpu_s, result.max_rss_kb, result.killed) == (1.25, 8192, None)
    clamped = sandbox_result(CMD, outcome(exited(0), stats=Stats(cpu_s=-0.5, memory_peak_bytes=1000)), LIMITS)
    assert (clamped.cpu_s, clamped.max_rss_kb) == (0.0, 9000)  # no negative CPU; < 1 KiB peak: the process's


def test_a_tool_that_raised_is_an_error_not_a_kill() -> None:
    result = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=False, error="ValueError: bad")), LIMITS)
    assert (result.ok, result.error, result.killed, result.value) == (False, "ValueError: bad", None, None)


def test_a_python_call_without_an_answer_says_how_it_ended() -> None:
    result = sandbox_result(CALL, outcome(exited(3), stdout=b"not json\n"), LIMITS)
    assert (result.exit_code, result.killed) == (3, None)
    assert result.error == "the tool process exited with code 3 without a result"
    result = sandbox_result(CALL, outcome(exited(0)), LIMITS)
    assert result.error == "the tool process exited with code 0 without a result" and not result.ok


def test_a_command_that_failed_by_itself_has_no_error_text() -> None:
    result = sandbox_result(CMD, outcome(exited(1), stdout=answer(ok=False, error="x")), LIMITS)
    assert (result.exit_code, result.error, result.killed, result.value) == (1, None, None, None)
    assert sandbox_result(CMD, outcome(exited(0)), LIMITS).ok


@pytest.mark.parametrize(("killed", "error"), [
    ("timeout", "timed out after 3 s"),
    ("output", "output exceeded 100 bytes"),
    ("cancelled", "cancelled"),
])
def test_what_the_supervisor_stopped_is_reported_and_any_answer_ignored(killed: str, error: str) -> None:
    out = outcome(signalled(signal.SIGKILL), stdout=answer(ok=True, value=1), killed=killed)
    result = sandbox_result(CALL, out, LIMITS)
    assert (result.killed, result.error, result.value, result.truncated) == (killed, error, None, killed == "output")
    assert sandbox_result(CMD, out, LIMITS).error == error


def test_memory() -> None:
    oom = sandbox_result(CALL, outcome(signalled(signal.SIGKILL), stats=Stats(oom_kills=1)), LIMITS)
    assert (oom.killed, oom.error) == ("memory", "memory limit of 64 MB exceeded")
    other = sandbox_result(CALL, outcome(exited(1), stdout=answer(ok=False, error="ValueError: x"),
                                         stats=Stats(oom_kills=2)), LIMITS)
    assert (other.killed, other.error) == ("memory", "memory limit of 64 MB exceeded: ValueError: x")
    raised = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=False, error="MemoryError: big")), LIMITS)
    assert (raised.killed, raised.error) == ("memory", "MemoryError: big")
    said = sandbox_result(CMD, outcome(exited(1), stderr=b"x" * 5000 + b"std::bad_alloc\n"), LIMITS)
    assert (said.killed, said.error) == ("memory", "memory limit of 64 MB exceeded")
    early = sandbox_result(CMD, outcome(exited(1), stderr=b"out of memory" + b"x" * 5000), LIMITS)
    assert early.killed is None  # only the end of the output is read
    fine = sandbox_result(CMD, outcome(exited(0), stderr=b"MemoryError"), LIMITS)
    assert fine.killed is None and fine.ok  # a program that succeeded was not stopped
    answered = sandbox_result(CALL, outcome(exited(1), stdout=answer(ok=False, error="OSError: x"),
                                            stderr=b"Cannot allocate memory"), LIMITS)
    assert (answered.killed, answered.error) == (None, "OSError: x")  # the runner's answer says what happened


def test_refused_forks_are_a_process_limit_only_when_the_program_failed() -> None:
    failed = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=False, error="BlockingIOError: fork"),
                                          refused_forks=2), LIMITS)
    assert (failed.killed, failed.error) == ("pids", "process limit of 8 reached: BlockingIOError: fork")
    assert sandbox_result(CMD, outcome(exited(1), refused_forks=1), LIMITS).error == "process limit of 8 reached"
    assert sandbox_result(CMD, outcome(exited(0), refused_forks=3), LIMITS).killed is None
    fine = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=1), refused_forks=3), LIMITS)
    assert fine.ok and fine.killed is None
    silent = sandbox_result(CALL, outcome(exited(0), refused_forks=1), LIMITS)  # no answer: it failed
    assert (silent.killed, silent.error) == ("pids", "process limit of 8 reached")


def test_a_full_disk_only_when_the_program_failed() -> None:
    full = {"disk": {"full": True}}
    failed = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=False, error="OSError: [Errno 28] No space"),
                                          report=full), LIMITS)
    assert (failed.killed, failed.error) == ("disk", "disk quota of 16 MB exceeded: OSError: [Errno 28] No space")
    named = sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=False, error="OSError: disk quota"),
                                         report=full), LIMITS)
    assert named.error == "OSError: disk quota"  # already says so
    assert sandbox_result(CMD, outcome(exited(0), report=full), LIMITS).killed is None
    assert sandbox_result(CALL, outcome(exited(0), stdout=answer(ok=True, value=1), report=full), LIMITS).ok
    assert sandbox_result(CMD, outcome(exited(1), report={"disk": {"full": False}}), LIMITS).killed is None
    assert sandbox_result(CMD, outcome(exited(1), report={"disk": True}), LIMITS).killed is None


def test_cpu() -> None:
    assert cpu_rlimit(LIMITS) == 2 and cpu_rlimit(Limits(cpu_s=0.2)) == 1 and cpu_rlimit(Limits(cpu_s=2.1)) == 3
    assert cpu_rlimit(Limits(cpu_s=0)) == 1
    xcpu = sandbox_result(CMD, outcome(signalled(signal.SIGXCPU)), LIMITS)
    assert (xcpu.exit_code, xcpu.killed, xcpu.error) == (128 + signal.SIGXCPU, "cpu", "CPU time limit of 2 s exceeded")
    at_limit = sandbox_result(CMD, outcome(signalled(signal.SIGKILL, utime=1.6)), LIMITS)  # 0.8 x 2 s
    assert at_limit.killed == "cpu"
    below = sandbox_result(CMD, outcome(signalled(signal.SIGKILL, utime=1.5)), LIMITS)
    assert (below.killed, below.error) == ("signal", "killed by signal SIGKILL")


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                                    signal.SIGKILL, signal.SIGSYS])
def test_fatal_signals(signum: signal.Signals) -> None:
    result = sandbox_result(CALL, outcome(signalled(signum)), LIMITS)
    assert (result.exit_code, result.killed, result.error) == (128 + signum, "signal",
                                                               f"killed by signal {signum.name}")


def test_other_signals_and_answers_are_not_a_kill() -> None:
    term = sandbox_result(CMD, outcome(signalled(signal.SIGTERM)), LIMITS)
    assert (term.exit_code, term.killed, term.error) == (128 + signal.SIGTERM, None, None)
    answered = sandbox_result(CALL, outcome(signalled(signal.SIGSEGV), stdout=answer(ok=True, value=1)), LIMITS)
    assert answered.killed is None and answered.value == 1 and not answered.ok  # crashed after answering
    relayed = sandbox_result(CMD, outcome(exited(0), report={"code": 128 + signal.SIGSEGV}), LIMITS)
    assert (relayed.exit_code, relayed.killed) == (128 + signal.SIGSEGV, "signal")  # the guard's code counts


def test_the_guard_relays_the_exit_code_and_the_disk_state() -> None:
    out = outcome(exited(0), report={"code": 7, "disk": {"full": True}})
    assert (out.code, out.disk_full) == (7, True)
    assert (outcome(exited(5), report={"code": "7"}).code, outcome(exited(5)).disk_full) == (5, False)
    assert Exit(signal.SIGKILL, None).code == 128 + signal.SIGKILL and Exit(3 << 8, None).code == 3
    assert os.WIFEXITED(exited(3).status)


def test_why_stopped_names_each_reason() -> None:
    assert why_stopped("pids", 1, LIMITS) == "process limit of 8 reached"
    assert why_stopped("disk", 1, LIMITS) == "disk quota of 16 MB exceeded"
    assert why_stopped("cpu", 1, LIMITS) == "CPU time limit of 2 s exceeded"
    assert why_stopped("signal", 128 + 9, LIMITS) == "killed by signal SIGKILL"
    assert why_stopped("signal", 129, LIMITS) == "killed by signal SIGHUP"
    assert why_stopped("signal", 128 + 64, LIMITS) == f"killed by signal {signal.Signals(64).name}"
    assert why_stopped("signal", 128, LIMITS) == "the tool process exited with code 128 without a result"
    assert why_stopped("signal", 128 + 65, LIMITS) == "the tool process exited with code 193 without a result"
    assert why_stopped(None, 2, LIMITS) == "the tool process exited with code 2 without a result"


def test_mentions_reads_only_the_end() -> None:
    assert _mentions(b"a MemoryError", (b"nothing", b"MemoryError"))
    assert not _mentions(b"MemoryError" + b"." * 4096, (b"MemoryError",))
    assert _mentions(b"MemoryError" + b"." * 4085, (b"MemoryError",))
    assert not _mentions(b"MemoryError" + b"." * 4086, (b"MemoryError",))
