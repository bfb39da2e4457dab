"""The process guard: the first process of every process sandbox, bound to the process that started it.

``bwrap://`` and ``gvisor://`` (through :func:`stitchwork.isolation._process.supervise`) start
``python -I -S -B _guard.py FD`` instead of their command; ``FD`` is a sealed memory file holding the plan in
:mod:`marshal` format (never on the command line: it may hold the program's environment). The guard uses the
standard library only, and only what starts fast (:mod:`marshal`, ``_signal``, :mod:`select`; ``ctypes`` and
:mod:`._stage` when a step needs them): it runs at every sandbox start.

1. **binds itself to its parent** (the worker): it opens a pidfd of ``getppid()`` and checks that the parent is
   still the one named in the plan; if the parent is already gone it exits before anything else happens. A
   pidfd signals when the whole parent process ends (unlike ``PR_SET_PDEATHSIG``, which fires when the parent
   *thread* that forked ends), and nothing can inherit it away from us;
2. stages the sandbox's writable space when the plan asks (its own mount namespace, a size-limited tmpfs, the
   granted directories copied in, read-only binds of what the sandbox's user could not reach: :mod:`._stage`);
3. creates the sandbox's user namespace when asked (root only): a fresh one mapping the sandbox uid and gid to the
   same unprivileged host ids, handed to the command as a descriptor (``bwrap --userns``);
4. ``unshare(CLONE_NEWPID)`` and forks the **init** of a new pid namespace. Every process of the sandbox is
   started inside it, so when the init dies the kernel kills all of them, nested namespaces included. The init
   watches pidfds of the worker and of the guard: if either ends, it exits at once;
5. (with ``mount_proc``) the init mounts a ``/proc`` of its pid namespace in a mount namespace of its own (runsc
   needs it) and forks the command: the child joins the sandbox's cgroups (before it executes anything), keeps only
   the descriptors the plan names, applies the plan's rlimits and executes the command with the plan's
   environment. The init reaps and relays the command's exit status;
6. when the command has ended (``SIGTERM`` to the guard ends it early: the guard SIGKILLs the init), the guard
   writes the staged directories back to the host (:func:`._stage.commit`) unless the worker is gone, and writes
   one status frame (:func:`write_frame`) to the plan's status descriptor::

       {"code": 0, "disk": {"size": ..., "used": ..., "full": False}, "commit": {...}, "error": None}

   then exits with the command's shell-style code (``128 + signal`` for a death by signal; 125 when the guard
   itself could not set up).

No window: the command cannot run before step 1 held, and from then on the death of the worker ends the init,
which ends every process of the sandbox; none of them is ever reparented outside the namespace.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` would import enum (~2.5 ms at every sandbox start)
import marshal
import os
import select
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Exit code of the guard when it could not set the sandbox up (the status line says why).
SETUP_FAILED = 125
#: Exit code of the init and the guard when the worker (or the guard) went away.
ORPHANED = 137
CLONE_NEWUSER, CLONE_NEWPID = 0x10000000, 0x20000000


def write_frame(fd: int, message: dict[str, Any]) -> None:
    """One status frame: a 4-byte little-endian length, then the message in :mod:`marshal` format."""
    body = marshal.dumps(message)
    data = len(body).to_bytes(4, "little") + body
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass


def read_frames(data: bytes) -> list[dict[str, Any]]:
    """The messages in ``data`` (whole frames; a torn last frame is dropped)."""
    messages = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "little")
        body, data = data[4 : 4 + size], data[4 + size :]
        if len(body) < size:
            break
        try:
            message = marshal.loads(body)
        except (ValueError, EOFError, TypeError):
            break
        if isinstance(message, dict):
            messages.append(message)
    return messages


def read_plan(fd: int) -> dict[str, Any]:
    """The plan in the sealed memory file ``fd`` (:mod:`marshal` format), which is then closed."""
    chunks = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    plan = marshal.loads(b"".join(chunks))
    if not isinstance(plan, dict):
        raise ValueError("the plan is not a dictionary")
    return plan


def _unshare(flags: int) -> None:
    import ctypes  # ~3 ms: only here

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare: {os.strerror(code)}")


def bind_to_parent(expected: int) -> int:
    """A pidfd of the parent process, which must be ``expected``; exits (:data:`ORPHANED`) when it is gone."""
    parent = os.getppid()
    if parent != expected:
        os._exit(ORPHANED)
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        os._exit(ORPHANED)
    if os.getppid() != expected:  # died (and we were reparented) between the two calls: fd may be another's
        os._exit(ORPHANED)
    if _gone(fd):
        os._exit(ORPHANED)
    return fd


def _gone(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _stage_module() -> Any:
    if __package__:
        from stitchwork.isolation import _stage
    else:  # run as a script under ``python -I -S``: the package is not importable, its sibling modules are
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _stage  # type: ignore[no-redef]
    return _stage


def _stage_space(stage: dict[str, Any]) -> None:
    _stage = _stage_module()
    root = stage["root"]
    uid, gid = int(stage.get("uid", os.getuid())), int(stage.get("gid", os.getgid()))
    _stage.private_mounts()
    _stage.mount_tmpfs(root, int(stage["size"]))
    for name in stage.get("scratch", ()):
        path = os.path.join(root, name)
        os.mkdir(path, 0o1777)
        os.chmod(path, 0o1777)
    for host, name in stage.get("copy", ()):
        _stage.copy_in(host, os.path.join(root, name), uid=uid, gid=gid)
    for host, name, mode in stage.get("files", ()):
        target = os.path.join(root, name)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(host, "rb") as source, open(target, "xb") as copy:
            copy.write(source.read())
        os.chmod(target, int(mode))
    for host, name in stage.get("binds", ()):
        target = os.path.join(root, name)
        if os.path.isdir(host):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            open(target, "xb").close()
        _stage.bind_read_only(host, target)


def make_userns(uid: int, gid: int) -> int:
    """A descriptor of a new user namespace mapping ``uid`` and ``gid`` inside to the same ids outside."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the namespace's first member, just long enough for its maps to be written
        os.close(ready_r)
        os.close(done_w)
        try:
            _unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
        except OSError:
            os.write(ready_w, b"0")
        os.read(done_r, 1)
        os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError("cannot create a user namespace")
        with open(f"/proc/{pid}/uid_map", "w") as handle:
            handle.write(f"{uid} {uid} 1\n")
        with open(f"/proc/{pid}/gid_map", "w") as handle:
            handle.write(f"{gid} {gid} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    finally:
        os.write(done_w, b"1")
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def shell_code(status: int) -> int:
    """A wait status as a shell exit code (``128 + signal`` for a death by signal)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _exec(plan: dict[str, Any], keep: list[int], status_fd: int) -> None:
    """In the command's process: join the cgroups, keep only ``keep`` (and stdio), apply rlimits, execute."""
    try:
        for procs in plan.get("cgroups", ()):
            with open(procs, "w") as handle:
                handle.write("0\n")
        limits = plan.get("rlimits") or {}
        if limits:
            import resource

            for name, value in limits.items():
                resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (int(value), int(value)))
        for fd in keep:
            os.set_inheritable(fd, True)
        kept = sorted({0, 1, 2, *keep})
        for low, high in zip(kept, [*kept[1:], 65536], strict=True):
            os.closerange(low + 1, high)
        argv = [str(a) for a in plan["argv"]]
        os.execve(argv[0], argv, {str(k): str(v) for k, v in plan.get("env", {}).items()})
    except BaseException as exc:
        write_frame(status_fd, {"exec_error": f"{type(exc).__name__}: {exc}"})
    os._exit(127)


def _init(plan: dict[str, Any], watched: list[int], keep: list[int], status_fd: int) -> None:
    """Pid 1 of the sandbox's pid namespace: runs the command, relays its status; exits when a watched fd fires."""
    if plan.get("mount_proc"):
        try:
            _stage_module().mount_proc()
        except OSError as exc:
            write_frame(status_fd, {"error": f"cannot mount /proc for the sandbox: {exc}"})
            os._exit(SETUP_FAILED)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    child = os.fork()
    if child == 0:
        os.close(wake_r)
        os.close(wake_w)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _exec(plan, keep, status_fd)
    poller = select.poll()
    for fd in watched:
        poller.register(fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd in watched:
                os._exit(ORPHANED)  # the namespace, and every process in it, ends with us
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
        while True:  # reap the command and any orphan that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                os._exit(ORPHANED)
            if pid == 0:
                break
            if pid == child:
                os._exit(shell_code(status))


def main() -> int:
    """Runs the plan read from the descriptor named by ``argv[1]``; returns the exit code."""
    plan = read_plan(int(sys.argv[1]))
    status_fd = int(plan["status_fd"])
    worker = bind_to_parent(int(plan["ppid"]))
    init_pid = [0]
    stopping = [False]

    def stop(*_: object) -> None:
        stopping[0] = True
        if init_pid[0]:
            try:  # noqa: SIM105 - contextlib would cost an import at every sandbox start
                os.kill(init_pid[0], signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    stage = plan.get("stage")
    keep = [int(fd) for fd in plan.get("keep_fds", ())]
    try:
        if stage:
            _stage_space(stage)
        userns = plan.get("userns")
        if userns:
            fd = make_userns(int(userns["uid"]), int(userns["gid"]))
            keep.append(fd)
            plan["argv"] = [str(fd) if a == "{userns}" else a for a in plan["argv"]]
        if _gone(worker):
            return ORPHANED
        _unshare(CLONE_NEWPID)
        guard = os.pidfd_open(os.getpid())
    except Exception as exc:  # OSError, a StageError, a bad plan: nothing of the sandbox has run
        write_frame(status_fd, {"code": SETUP_FAILED, "error": f"{type(exc).__name__}: {exc}"})
        return SETUP_FAILED
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _init(plan, [worker, guard], keep, status_fd)
    init_pid[0] = pid
    if stopping[0]:
        stop()
    init_fd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(worker, select.POLLIN)
    poller.register(init_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if worker in ready:
            stop()
            return ORPHANED  # nobody to report to: no write-back either
        if init_fd in ready:
            break
    code = shell_code(os.waitpid(pid, 0)[1])
    status: dict[str, Any] = {"code": code, "error": None}
    if stage:
        _stage = _stage_module()
        root = stage["root"]
        size, used = _stage.usage(root)
        status["disk"] = {"size": size, "used": used, "full": _stage.full(root)}
        reports = {}
        try:
            for host, name in stage.get("commit", ()):
                reports[host] = _stage.commit(os.path.join(root, name), host).to_json()
        except (_stage.StageError, OSError, RecursionError) as exc:
            status["error"] = f"write-back failed: {exc}"
        status["commit"] = reports
    write_frame(status_fd, status)
    return code


if __name__ == "__main__":
    sys.exit(main())
