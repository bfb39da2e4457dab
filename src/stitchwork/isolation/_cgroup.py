"""One cgroup per sandbox, covering every process of it: memory (swap off), CPU quota and usage, process count.

:func:`support` finds, once per process, where this process may create cgroups: for cgroup v1 one hierarchy per
controller (``memory``, ``cpu``, ``cpuacct``, ``pids``; ``cpu,cpuacct`` may share one), for v2 the unified
hierarchy. Each is a child of this process's own cgroup named ``stitchwork-<pid>``, removed at exit; those of
processes killed before their exit handler ran are swept when the next process looks. A :class:`SandboxCgroup`
is one directory per hierarchy under it (``sbx-<n>``) with the sandbox's limits:

==========  ===================================================  ===============================================
limit       v1                                                   v2
==========  ===================================================  ===============================================
memory      ``memory.limit_in_bytes`` = ``memory.memsw.limit``   ``memory.max``, ``memory.swap.max`` = 0
            (memory + swap = memory: no swap), swappiness 0
CPU quota   ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``         ``cpu.max``
CPU usage   ``cpuacct.usage``                                    ``cpu.stat`` ``usage_usec``
processes   ``pids.max`` (threads count)                         ``pids.max``
==========  ===================================================  ===============================================

A process joins by writing its pid into :attr:`SandboxCgroup.procs` files before it executes anything of the
sandbox's (the process guard does it: :mod:`stitchwork.isolation._guard`). The CPU *budget* (``cpu_s``, CPU time
accumulated by every process of the sandbox) is enforced by the supervisor polling :meth:`SandboxCgroup.cpu_s`;
the kernel enforces the rest. After the run :meth:`SandboxCgroup.stats` tells what the kernel saw: CPU seconds,
peak memory, out-of-memory kills and refused forks.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from stitchwork.config import Limits

#: The v1 controllers a sandbox cgroup uses (v2: ``memory``, ``cpu``, ``pids``; usage comes with every v2 cgroup).
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
#: ``cpu.cfs_period_us`` / the period of ``cpu.max``.
CPU_PERIOD_US = 100_000
_MOUNTINFO = Path("/proc/self/mountinfo")
_OWN = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Hierarchy:
    """A place where this process creates sandbox cgroups: ``base`` (``.../stitchwork-<pid>``) and what it controls."""

    version: int
    base: Path
    controllers: frozenset[str]


@dataclass(frozen=True)
class Support:
    """What this host lets this process do with cgroups (see :func:`support`)."""

    hierarchies: tuple[Hierarchy, ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    """``(controller, why)`` for every controller of :data:`CONTROLLERS` that no hierarchy provides."""
    swap_accounting: bool = False
    """Whether memory + swap can be limited (v1 ``memsw``, v2 ``memory.swap.max``); without it no swap is
    only guaranteed where the host has no swap (:attr:`no_swap_on_host`)."""
    no_swap_on_host: bool = True
    _counter: itertools.count[int] = field(default_factory=itertools.count, compare=False, repr=False)

    @property
    def version(self) -> int:
        """1 or 2 (0: none usable). A mixed host (some v1, some v2) reports 1."""
        versions = {h.version for h in self.hierarchies}
        return 0 if not versions else min(versions)

    def controls(self, controller: str) -> bool:
        """Whether sandboxes get ``controller`` (v2 counts CPU usage without a ``cpuacct``)."""
        return any(controller in h.controllers for h in self.hierarchies)

    @property
    def complete(self) -> bool:
        """Memory, CPU quota, CPU usage and process limits are all available."""
        return not self.missing

    def describe(self) -> str:
        """One line for ``stitchwork doctor``."""
        if not self.hierarchies:
            return "none: " + "; ".join(sorted({why for _, why in self.missing})) if self.missing else "none"
        parts = [f"v{h.version} {'+'.join(sorted(h.controllers))} at {h.base}" for h in self.hierarchies]
        text = ", ".join(parts)
        if self.missing:
            text += "; missing " + ", ".join(f"{c} ({why})" for c, why in self.missing)
        if not self.swap_accounting and not self.no_swap_on_host:
            text += "; swap cannot be limited (no memsw accounting) and the host has swap"
        return text

    def create(self, limits: Limits, *, overhead_pids: int = 0) -> SandboxCgroup:
        """A fresh cgroup in every hierarchy, with ``limits`` applied.

        Args:
            limits: ``mem_mb`` (memory, swap off), ``cpus`` (quota), ``max_pids`` (+ ``overhead_pids`` for the
                sandbox's own machinery, e.g. bwrap's monitor).

        Raises:
            OSError: A directory or a limit cannot be written (the partial cgroup is removed).
        """
        name = f"sbx-{next(self._counter)}"
        cgroup = SandboxCgroup(tuple((h, h.base / name) for h in self.hierarchies))
        try:
            for _, path in cgroup.dirs:
                path.mkdir()
            cgroup.apply(limits, overhead_pids=overhead_pids, swap=self.swap_accounting)
        except OSError:
            cgroup.remove()
            raise
        return cgroup


@dataclass(frozen=True)
class Stats:
    """What the kernel counted for one sandbox cgroup."""

    cpu_s: float = 0.0
    memory_peak_bytes: int = 0
    oom_kills: int = 0
    refused_forks: int = 0


@dataclass(frozen=True)
class SandboxCgroup:
    """One sandbox's cgroup: a directory per hierarchy."""

    dirs: tuple[tuple[Hierarchy, Path], ...]

    @property
    def procs(self) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files a process writes its pid into to join."""
        return tuple(path / "cgroup.procs" for _, path in self.dirs)

    def _dir(self, controller: str) -> Path | None:
        for hierarchy, path in self.dirs:
            if controller in hierarchy.controllers:
                return path
        return None

    def _v2(self) -> Path | None:
        return next((path for h, path in self.dirs if h.version == 2), None)

    def apply(self, limits: Limits, *, overhead_pids: int = 0, swap: bool = False) -> None:
        """Writes the limits (callable again to change them, e.g. for a pre-started process).

        Raises:
            OSError: A limit cannot be written.
        """
        memory = limits.mem_mb * 1024 * 1024
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        pids = limits.max_pids + overhead_pids
        for hierarchy, path in self.dirs:
            if hierarchy.version == 2:
                _write(path / "memory.max", memory, "memory" in hierarchy.controllers)
                _write(path / "memory.swap.max", 0, swap and "memory" in hierarchy.controllers)
                _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}", "cpu" in hierarchy.controllers)
                _write(path / "pids.max", pids, "pids" in hierarchy.controllers)
                continue
            if "memory" in hierarchy.controllers:
                _set_v1_memory(path, memory, swap)
            if "cpu" in hierarchy.controllers:
                _write(path / "cpu.cfs_period_us", CPU_PERIOD_US)
                _write(path / "cpu.cfs_quota_us", quota)
            if "pids" in hierarchy.controllers:
                _write(path / "pids.max", pids)

    def cpu_s(self) -> float:
        """CPU time used by every process of the sandbox so far (0.0 when not measured)."""
        v2 = self._v2()
        if v2 is not None:
            return _keyed(v2 / "cpu.stat", "usage_usec") / 1e6
        path = self._dir("cpuacct")
        if path is None:
            return 0.0
        try:
            return int((path / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return 0.0

    def oom_kills(self) -> int:
        """Processes of the sandbox the kernel has killed for memory so far."""
        memory = self._dir("memory")
        if memory is None:
            return 0
        if memory == self._v2():
            return _keyed(memory / "memory.events", "oom_kill")
        return _keyed(memory / "memory.oom_control", "oom_kill")

    def stats(self) -> Stats:
        """CPU seconds, peak memory, out-of-memory kills and refused forks."""
        memory, pids = self._dir("memory"), self._dir("pids")
        v2 = self._v2()
        peak = oom = refused = 0
        if memory is not None:
            peak = _int(memory / ("memory.peak" if v2 == memory else "memory.max_usage_in_bytes"))
            oom = self.oom_kills()
        if pids is not None:
            refused = _keyed(pids / "pids.events", "max")
        return Stats(cpu_s=self.cpu_s(), memory_peak_bytes=peak, oom_kills=oom, refused_forks=refused)

    def reset_peak(self) -> None:
        """Starts the peak memory figure afresh (a pre-started process's own start-up is not the call's)."""
        memory = self._dir("memory")
        if memory is None:
            return
        name = "memory.peak" if memory == self._v2() else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError):
            (memory / name).write_text("0\n")

    def pids(self) -> list[int]:
        """Every process in the sandbox cgroup now."""
        found: set[int] = set()
        for path in self.procs:
            with contextlib.suppress(OSError, ValueError):
                found.update(int(pid) for pid in path.read_text().split())
        return sorted(found)

    def kill(self, rounds: int = 50) -> bool:
        """SIGKILLs every process in the cgroup until it is empty (or ``rounds`` passes); whether it is empty."""
        v2 = self._v2()
        if v2 is not None and (v2 / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (v2 / "cgroup.kill").write_text("1\n")
        for attempt in range(rounds):
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if attempt:
                time.sleep(0.002)
        return not self.pids()

    def remove(self) -> bool:
        """Kills what is left and removes the directories; False while tasks are still exiting."""
        done = True
        if self.pids():
            self.kill(rounds=3)
        for _, path in self.dirs:
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                done = False
        return done


def _write(path: Path, value: object, wanted: bool = True) -> None:
    if wanted:
        path.write_text(f"{value}\n")


def _set_v1_memory(path: Path, memory: int, swap: bool) -> None:
    limit, memsw = path / "memory.limit_in_bytes", path / "memory.memsw.limit_in_bytes"
    with contextlib.suppress(OSError):
        (path / "memory.swappiness").write_text("0\n")
    if not swap:
        limit.write_text(f"{memory}\n")
        return
    # memory + swap must stay >= memory: order the writes so that each holds when it is made.
    current = _int(limit)
    if memory <= current:
        limit.write_text(f"{memory}\n")
        memsw.write_text(f"{memory}\n")
    else:
        memsw.write_text(f"{memory}\n")
        limit.write_text(f"{memory}\n")


def _int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _keyed(path: Path, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``oom_kill 3``)."""
    try:
        text = path.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


# -- finding the hierarchies ------------------------------------------------------------------------------


def _own_paths() -> dict[str, str]:
    """``controller → path`` from ``/proc/self/cgroup`` (``""``: the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in _OWN.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _mounts() -> list[tuple[Path, str, frozenset[str]]]:
    """``(mount point, root, controllers)`` of every cgroup mount (v2: controllers empty, ``root`` its root)."""
    found = []
    with contextlib.suppress(OSError):
        for line in _MOUNTINFO.read_text().splitlines():
            fields = line.split()
            try:
                dash = fields.index("-")
            except ValueError:
                continue
            fstype, options = fields[dash + 1], fields[dash + 3] if len(fields) > dash + 3 else ""
            if fstype == "cgroup":
                names = frozenset(o for o in options.split(",") if o in CONTROLLERS)
                found.append((Path(fields[4]), fields[3], names))
            elif fstype == "cgroup2":
                found.append((Path(fields[4]), fields[3], frozenset()))
    return found


def _under(mount_root: str, own: str) -> str | None:
    """``own`` relative to a mount whose root is ``mount_root`` (None when the mount does not contain it)."""
    if mount_root == "/":
        return own.lstrip("/")
    if own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
        return own[len(mount_root) :].lstrip("/")
    return None


def _try_v1(mount: Path, root: str, own: str, controllers: frozenset[str]) -> Hierarchy | str:
    relative = _under(root, own)
    if relative is None:
        return f"this process's cgroup is outside the {'+'.join(sorted(controllers))} mount"
    base = mount / relative / f"stitchwork-{os.getpid()}"
    probe = base / "probe"
    try:
        base.mkdir(exist_ok=True)
        probe.mkdir()
    except OSError as exc:
        return f"{base.parent} is not writable ({exc.strerror})"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return Hierarchy(1, base, controllers)


def _try_v2(mount: Path, root: str, own: str) -> Hierarchy | str:
    relative = _under(root, own)
    if relative is None:
        return "this process's cgroup is outside the v2 mount"
    parent = mount / relative
    try:
        available = set((parent / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return f"cannot read {parent}/cgroup.controllers ({exc.strerror})"
    wanted = {"memory", "cpu", "pids"} & available
    if not wanted:
        return f"the v2 hierarchy at {parent} delegates none of memory, cpu, pids"
    base = parent / f"stitchwork-{os.getpid()}"
    try:
        base.mkdir(exist_ok=True)
        enabled = set((base / "cgroup.controllers").read_text().split())
        if not wanted <= enabled:  # our parent must pass them down to us: enable in its subtree_control
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)) + "\n")
        (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)) + "\n")
        probe = base / "probe"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        with contextlib.suppress(OSError):
            base.rmdir()
        return f"cannot delegate {'+'.join(sorted(wanted))} under {parent} ({exc.strerror})"
    return Hierarchy(2, base, frozenset(wanted | {"cpuacct"}))


@functools.cache
def support() -> Support:
    """The cgroup hierarchies this process may use for sandboxes (found once; swept and cleaned at exit)."""
    own = _own_paths()
    hierarchies: list[Hierarchy] = []
    why: dict[str, str] = {}
    mounts = _mounts()
    v1 = [m for m in mounts if m[2]]
    for mount, root, controllers in v1:
        wanted = controllers & set(CONTROLLERS)
        key = next(iter(sorted(wanted)))
        if key not in own:
            continue
        _sweep(mount / (_under(root, own[key]) or ""))
        found = _try_v1(mount, root, own[key], frozenset(wanted))
        if isinstance(found, Hierarchy):
            hierarchies.append(found)
        else:
            why.update({c: found for c in wanted})
    covered = {c for h in hierarchies for c in h.controllers}
    if not covered >= {"memory", "cpu", "pids"} and "" in own:
        for mount, root, controllers in mounts:
            if controllers or mount == Path("/sys/fs/cgroup/systemd"):
                continue
            parent = mount / (_under(root, own[""]) or "")
            _sweep(parent)
            found2 = _try_v2(mount, root, own[""])
            if isinstance(found2, Hierarchy):
                # Use v2 only for what v1 does not already give (a hybrid host), never both for one controller.
                if not (found2.controllers - {"cpuacct"}) & covered:
                    hierarchies.append(found2)
                    covered |= found2.controllers
                break
            why.update({c: found2 for c in ("memory", "cpu", "pids") if c not in covered})
    if not mounts:
        why.update({c: "no cgroup file system is mounted" for c in CONTROLLERS})
    missing = tuple((c, why.get(c, "not mounted for this process")) for c in CONTROLLERS if c not in covered)
    for hierarchy in hierarchies:
        atexit.register(_remove_tree, hierarchy.base)
    swap = _swap_accounting(hierarchies)
    return Support(tuple(hierarchies), missing, swap_accounting=swap, no_swap_on_host=_no_swap())


def _swap_accounting(hierarchies: Iterable[Hierarchy]) -> bool:
    for hierarchy in hierarchies:
        if "memory" not in hierarchy.controllers:
            continue
        name = "memory.swap.max" if hierarchy.version == 2 else "memory.memsw.limit_in_bytes"
        probe = hierarchy.base / "swap-probe"
        try:
            probe.mkdir()
            return (probe / name).exists()
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
    return False


def _no_swap() -> bool:
    try:
        return len(Path("/proc/swaps").read_text().splitlines()) <= 1
    except OSError:
        return False


def _remove_tree(base: Path) -> None:
    """Removes a process's ``stitchwork-<pid>`` cgroup and what is left under it."""
    with contextlib.suppress(OSError):
        for child in base.iterdir():
            if child.is_dir():
                SandboxCgroup(((Hierarchy(1, base, frozenset()), child),)).remove()
    with contextlib.suppress(OSError):
        base.rmdir()


def _sweep(parent: Path) -> None:
    """Removes ``stitchwork-<pid>`` cgroups of processes that are gone (killed before their atexit ran)."""
    with contextlib.suppress(OSError):
        for stale in parent.glob("stitchwork-*"):
            try:
                os.kill(int(stale.name.removeprefix("stitchwork-")), 0)
            except ValueError:
                continue
            except ProcessLookupError:
                _remove_tree(stale)
            except PermissionError:  # alive, someone else's
                continue


def remove_later(cgroup: SandboxCgroup, attempt: int = 0) -> None:
    """Removes a finished sandbox's cgroup; retries from a timer thread while its tasks are being reaped."""
    if cgroup.remove() or attempt >= 50:
        return
    timer = threading.Timer(0.05 * (attempt + 1), remove_later, (cgroup, attempt + 1))
    timer.daemon = True
    timer.start()
