"""A sandbox's writable space: one size-limited tmpfs (the disk quota), filled from the host and written back.

Used by the process guard (:mod:`stitchwork.isolation._guard`, for ``bwrap://`` and ``gvisor://``) and by the
``wasm://`` host process (:mod:`stitchwork.isolation._wasm_host`); standard library only (the guard runs it with
``python -I -S``).

* :func:`private_mounts` gives the calling (single-threaded) process its own mount namespace (a slave of the
  host's: host mounts still appear in it, its own never leave it), inside a user namespace mapping the caller's
  own ids when it is not root; :func:`mount_tmpfs` mounts the quota there (``size``, ``nr_inodes``,
  ``nosuid,nodev``), :func:`bind_read_only` makes a host path visible in it read-only, ``nosuid,nodev``. Everything
  disappears with the namespace when its last process exits, also when the process is killed.
* :func:`copy_in` copies a granted host directory into the tmpfs (owned by the sandbox's uid there);
  :func:`commit` makes the host directory equal to the staged copy afterwards: files, directories and symlinks
  created, replaced or deleted, with setuid, setgid and sticky bits stripped, special files (devices, FIFOs,
  sockets) skipped, never following a symlink on the host side (every step is relative to an ``O_NOFOLLOW``
  directory descriptor), files replaced by an atomic rename. Unchanged files (same size and modification time
  as the copy made) are not rewritten.
"""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 2, 4, 32, 4096, 16384, 1 << 19
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
#: Mode bits never written back to the host (setuid, setgid, sticky).
SPECIAL_BITS = 0o7000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
#: Directories nested deeper than this are not copied or written back (they are reported as skipped).
MAX_DEPTH = 128


class StageError(Exception):
    """Staging or committing failed; the message says what and where."""


# -- namespaces and mounts (ctypes, imported only when used) ----------------------------------------------


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def unshare(flags: int) -> None:
    """``unshare(2)``.

    Raises:
        OSError: The kernel refused.
    """
    _check(_libc().unshare(flags), "unshare")


def private_mounts() -> None:
    """Gives this single-threaded process its own mount namespace (see the module docs).

    Raises:
        OSError: Neither root nor an unprivileged user namespace is available.
    """
    if os.geteuid() == 0:
        unshare(CLONE_NEWNS)
    else:
        uid, gid = os.geteuid(), os.getegid()
        unshare(CLONE_NEWUSER | CLONE_NEWNS)
        with open("/proc/self/setgroups", "w") as handle:
            handle.write("deny")
        with open("/proc/self/uid_map", "w") as handle:
            handle.write(f"{uid} {uid} 1\n")
        with open("/proc/self/gid_map", "w") as handle:
            handle.write(f"{gid} {gid} 1\n")
    _check(_libc().mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")


def mount_proc() -> None:
    """A fresh ``/proc`` for this process's pid namespace, in a mount namespace of its own.

    Raises:
        OSError: A mount failed.
    """
    unshare(CLONE_NEWNS)
    libc = _libc()
    _check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")
    flags = MS_NOSUID | MS_NODEV | 8  # MS_NOEXEC
    _check(libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")


def mount_tmpfs(path: str, size_bytes: int, *, mode: int = 0o711) -> None:
    """A ``nosuid,nodev`` tmpfs of ``size_bytes`` (and an inode cap to match) at ``path``.

    Raises:
        OSError: The mount failed.
    """
    inodes = max(4096, size_bytes // 4096)
    options = f"size={size_bytes},nr_inodes={inodes},mode={mode:o}".encode()
    _check(_libc().mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"tmpfs at {path}")


def resize_tmpfs(path: str, size_bytes: int) -> None:
    """Gives the tmpfs at ``path`` a new size (and inode cap).

    Raises:
        OSError: The remount failed (e.g. more is in use than the new size).
    """
    inodes = max(4096, size_bytes // 4096)
    options = f"size={size_bytes},nr_inodes={inodes}".encode()
    flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
    _check(_libc().mount(None, path.encode(), None, flags, options), f"resize the tmpfs at {path}")


def bind_read_only(source: str, target: str) -> None:
    """Binds ``source`` at ``target`` (which must exist) read-only, ``nosuid,nodev``.

    Raises:
        OSError: A mount failed.
    """
    libc = _libc()
    _check(libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {source}")
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    _check(libc.mount(None, target.encode(), None, flags, None), f"read-only {target}")


def usage(path: str) -> tuple[int, int]:
    """``(size, used)`` in bytes of the file system at ``path``."""
    info = os.statvfs(path)
    return info.f_blocks * info.f_frsize, (info.f_blocks - info.f_bfree) * info.f_frsize


def full(path: str, margin: int = 256 * 1024) -> bool:
    """Whether the file system at ``path`` has (nearly) no space or inodes left."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize < margin or (info.f_files > 0 and info.f_favail < 8)


# -- copy in ----------------------------------------------------------------------------------------------


def copy_in(host: str, dest: str, *, uid: int, gid: int) -> None:
    """Copies the host directory ``host`` into ``dest`` (created unless it is an empty directory already), owned by
    ``uid:gid``; symlinks stay symlinks.

    Raises:
        StageError: A file cannot be read or does not fit (``ENOSPC``: the quota).
    """
    try:
        info = os.stat(host)
        if not os.path.isdir(dest):
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            os.mkdir(dest, 0o700)
        os.chmod(dest, stat.S_IMODE(info.st_mode) & ~SPECIAL_BITS | 0o700)
        src = os.open(host, _DIR_FLAGS)
    except OSError as exc:
        raise StageError(f"cannot stage {host}: {exc}") from exc
    try:
        dst = os.open(dest, _DIR_FLAGS)
        try:
            os.fchown(dst, uid, gid)
            _copy_dir(src, dst, uid, gid, 0)
        finally:
            os.close(dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StageError(f"{host} does not fit the sandbox's disk quota") from exc
        raise StageError(f"cannot stage {host}: {exc}") from exc
    finally:
        os.close(src)


def _copy_dir(src: int, dst: int, uid: int, gid: int, depth: int) -> None:
    for entry in os.scandir(src):
        name = entry.name
        info = entry.stat(follow_symlinks=False)
        mode = stat.S_IMODE(info.st_mode) & ~SPECIAL_BITS
        if stat.S_ISDIR(info.st_mode):
            if depth >= MAX_DEPTH:
                continue
            os.mkdir(name, 0o700, dir_fd=dst)
            child_src = os.open(name, _DIR_FLAGS, dir_fd=src)
            try:
                child_dst = os.open(name, _DIR_FLAGS, dir_fd=dst)
                try:
                    _copy_dir(child_src, child_dst, uid, gid, depth + 1)
                    os.fchown(child_dst, uid, gid)
                    os.fchmod(child_dst, mode | 0o700)
                    os.utime(child_dst, ns=(info.st_atime_ns, info.st_mtime_ns))
                finally:
                    os.close(child_dst)
            finally:
                os.close(child_src)
        elif stat.S_ISREG(info.st_mode):
            _copy_file(src, dst, name, name, mode, info)
            os.chown(name, uid, gid, dir_fd=dst, follow_symlinks=False)
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            os.chown(name, uid, gid, dir_fd=dst, follow_symlinks=False)
        # devices, FIFOs and sockets are not copied


def _copy_file(src: int, dst: int, name: str, target: str, mode: int, info: os.stat_result) -> None:
    """Copies ``name`` (in ``src``) to a new file ``target`` (in ``dst``) with ``mode`` and ``info``'s times."""
    fd_in = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
    try:
        fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst)
        try:
            _pump(fd_in, fd_out)
            os.fchmod(fd_out, mode)
            os.utime(fd_out, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _pump(fd_in: int, fd_out: int) -> None:
    while True:
        try:
            sent = os.copy_file_range(fd_in, fd_out, _CHUNK)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if sent == 0:
            return
    while True:  # copy_file_range refused (across file systems on older kernels): plain reads and writes
        data = os.read(fd_in, _CHUNK)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd_out, view) :]


# -- commit -----------------------------------------------------------------------------------------------


class Report:
    """What :func:`commit` did."""

    def __init__(self) -> None:
        self.written = 0
        self.bytes = 0
        self.removed = 0
        self.skipped: list[str] = []

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "bytes": self.bytes, "removed": self.removed, "skipped": self.skipped[:20]}


def commit(staged: str, host: str) -> Report:
    """Makes the host directory ``host`` equal to ``staged`` (see the module docs).

    Raises:
        StageError: The host directory cannot be written (the message names the path).
    """
    report = Report()
    try:
        src = os.open(staged, _DIR_FLAGS)
    except OSError as exc:
        raise StageError(f"cannot read the staged copy of {host}: {exc}") from exc
    try:
        try:
            dst = os.open(host, _DIR_FLAGS)
        except OSError as exc:
            raise StageError(f"cannot write back {host}: {exc}") from exc
        try:
            _sync(src, dst, host, report, 0)
            os.fchmod(dst, stat.S_IMODE(os.fstat(src).st_mode) & ~SPECIAL_BITS)
        except OSError as exc:
            raise StageError(f"cannot write back into {host}: {exc}") from exc
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return report


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(name: str, dir_fd: int, info: os.stat_result) -> None:
    """Removes ``name`` (a whole tree for a directory) without following symlinks."""
    if stat.S_ISDIR(info.st_mode):  # depth is bounded: the trees removed were written by commit (MAX_DEPTH)
        child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            for entry in os.scandir(child):
                _remove(entry.name, child, entry.stat(follow_symlinks=False))
        finally:
            os.close(child)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _sync(src: int, dst: int, where: str, report: Report, depth: int) -> None:
    staged = {entry.name: entry.stat(follow_symlinks=False) for entry in os.scandir(src)}
    for entry in os.scandir(dst):
        if entry.name not in staged:
            _remove(entry.name, dst, entry.stat(follow_symlinks=False))
            report.removed += 1
    for name, info in staged.items():
        current = _lstat(name, dst)
        mode = stat.S_IMODE(info.st_mode) & ~SPECIAL_BITS
        if stat.S_ISDIR(info.st_mode):
            if depth >= MAX_DEPTH:
                report.skipped.append(f"{where}/{name} (nested too deep)")
                continue
            if current is not None and not stat.S_ISDIR(current.st_mode):
                _remove(name, dst, current)
                current = None
            if current is None:
                os.mkdir(name, 0o700, dir_fd=dst)
            child_src = os.open(name, _DIR_FLAGS, dir_fd=src)
            try:
                child_dst = os.open(name, _DIR_FLAGS, dir_fd=dst)
                try:
                    _sync(child_src, child_dst, f"{where}/{name}", report, depth + 1)
                    os.fchmod(child_dst, mode)
                finally:
                    os.close(child_dst)
            finally:
                os.close(child_src)
        elif stat.S_ISREG(info.st_mode):
            if (
                current is not None
                and stat.S_ISREG(current.st_mode)
                and (current.st_size, current.st_mtime_ns) == (info.st_size, info.st_mtime_ns)
            ):
                if stat.S_IMODE(current.st_mode) != mode:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dst)
                    try:
                        os.fchmod(fd, mode)
                    finally:
                        os.close(fd)
                continue
            temporary = f".stitchwork-commit-{os.urandom(8).hex()}"
            _copy_file(src, dst, name, temporary, mode, info)
            if current is not None and stat.S_ISDIR(current.st_mode):
                _remove(name, dst, current)
            os.rename(temporary, name, src_dir_fd=dst, dst_dir_fd=dst)
            report.written += 1
            report.bytes += info.st_size
        elif stat.S_ISLNK(info.st_mode):
            target = os.readlink(name, dir_fd=src)
            if current is not None and stat.S_ISLNK(current.st_mode) and os.readlink(name, dir_fd=dst) == target:
                continue
            if current is not None:
                _remove(name, dst, current)
            os.symlink(target, name, dir_fd=dst)
            report.written += 1
        else:
            report.skipped.append(f"{where}/{name}")
