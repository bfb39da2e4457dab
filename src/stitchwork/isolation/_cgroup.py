"""A cgroup per sandbox: the writable ``pids`` hierarchy of this host, found once per process.

The kernel does not apply ``RLIMIT_NPROC`` to processes whose real uid is host root, which is what a sandbox runs
as when this process is root. ``max_pids`` is then enforced by a ``pids`` cgroup per sandbox, in a delegated v2
subtree or the v1 hierarchy, whichever is writable. This process's sandboxes live under
``stitchwork-<pid>``, removed at exit; those of processes killed before their exit handler ran are swept when the
next process looks for the hierarchy. The process supervisor (:mod:`stitchwork.isolation._process`) creates,
joins and removes them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import itertools
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

#: A ``/bin/sh`` prefix that writes the shell's pid into ``cgroup.procs`` (its first argument) and then
#: execs the real command: the program joins the cgroup before it starts, without a ``preexec_fn``.
_JOIN_SCRIPT = 'unset PWD; echo $$ > "$0" && exec "$@"'


@dataclass(frozen=True)
class PidsCgroup:
    """A writable ``pids`` cgroup directory under which each sandbox gets its own child cgroup."""

    base: Path
    version: int
    _counter: itertools.count[int] = field(default_factory=itertools.count, compare=False)

    def create(self, max_pids: int) -> Path:
        """A fresh child cgroup allowing ``max_pids`` tasks (threads count)."""
        path = self.base / f"sbx-{next(self._counter)}"
        path.mkdir()
        (path / "pids.max").write_text(f"{max_pids}\n")
        return path

    @staticmethod
    def refused_forks(path: Path) -> int:
        """How often the cgroup refused a fork (``max`` in ``pids.events``)."""
        try:
            text = (path / "pids.events").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
        return 0

    @staticmethod
    def remove(path: Path) -> bool:
        """Kills what is left in the cgroup and removes it; False while tasks are still exiting."""
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def join_argv(path: Path, argv: list[str]) -> list[str]:
    """``argv`` run through a one-line ``/bin/sh`` wrapper that first moves itself into the cgroup ``path``."""
    return ["/bin/sh", "-c", _JOIN_SCRIPT, str(path / "cgroup.procs"), *argv]


def remove_later(path: Path, attempt: int = 0) -> None:
    """Removes a finished sandbox's cgroup; retries for a while if its tasks are still being reaped."""
    if PidsCgroup.remove(path) or attempt >= 50:
        return
    with contextlib.suppress(RuntimeError):  # no running loop (interpreter shutdown): leave it
        asyncio.get_running_loop().call_later(0.05, remove_later, path, attempt + 1)


def _own_cgroup_paths() -> dict[str, str]:
    """``controller → path`` from ``/proc/self/cgroup`` (``""`` is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _try_cgroup_dir(base: Path, version: int) -> PidsCgroup | None:
    probe = base / f"probe-{os.getpid()}"
    try:
        base.mkdir(exist_ok=True)
        if version == 2:
            controllers = (base / "cgroup.subtree_control").read_text().split()
            if "pids" not in controllers:
                (base / "cgroup.subtree_control").write_text("+pids\n")
        probe.mkdir()
        (probe / "pids.max").write_text("1\n")
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return PidsCgroup(base, version)


@functools.cache
def pids_cgroup() -> PidsCgroup | None:
    """The first writable pids cgroup hierarchy for this process, or None."""
    own = _own_cgroup_paths()
    name = f"stitchwork-{os.getpid()}"
    candidates: list[tuple[Path, int]] = []
    if "" in own:  # v2: a child of our own cgroup (works when the cgroup is delegated to us, or is the root)
        for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            if (mount / "cgroup.controllers").exists() and "pids" in (mount / "cgroup.controllers").read_text():
                candidates.append((mount / own[""].lstrip("/") / name, 2))
    if "pids" in own:
        candidates.append((Path("/sys/fs/cgroup/pids") / own["pids"].lstrip("/") / name, 1))
    for base, version in candidates:
        _sweep_stale_cgroups(base.parent)
        found = _try_cgroup_dir(base, version)
        if found is not None:
            atexit.register(_remove_cgroup_tree, base)
            return found
    return None


def _remove_cgroup_tree(base: Path) -> None:
    """Removes a process's ``stitchwork-<pid>`` cgroup and what is left under it."""
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            if child.is_dir():
                PidsCgroup.remove(child)
    with contextlib.suppress(OSError):
        base.rmdir()


def _sweep_stale_cgroups(parent: Path) -> None:
    """Removes ``stitchwork-<pid>`` cgroups of processes that are gone (killed before their atexit ran)."""
    with contextlib.suppress(OSError):
        for stale in parent.glob("stitchwork-*"):
            try:
                os.kill(int(stale.name.removeprefix("stitchwork-")), 0)
            except ValueError:
                continue
            except ProcessLookupError:
                _remove_cgroup_tree(stale)
            except PermissionError:  # alive, someone else's
                continue
