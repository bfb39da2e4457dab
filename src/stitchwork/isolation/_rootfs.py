"""What the namespace sandboxes (``bwrap://``, ``gvisor://``) build their file system from.

Both bind the host's ``/usr`` (with the ``/bin``, ``/lib*``, ``/sbin`` links of :data:`ROOT_LINKS`), the
interpreter's installation prefix when it lives outside ``/usr`` (:func:`python_prefix`, its
:func:`site_packages` hidden), a generated ``/etc/passwd`` and ``/etc/group`` (:func:`generated_etc`), and check
the spec's workdir and mounts the same way (:func:`check_workdir`, :func:`check_mount`).

Everything writable, and what the sandbox's unprivileged user could not reach on the host (a root-only tool
directory, an interpreter under ``/root``), is laid out in the sandbox's stage by a :class:`Layout`: one
size-limited tmpfs per sandbox (its disk quota) that the process guard mounts privately and fills
(:class:`~stitchwork.isolation._process.Stage`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

from stitchwork.errors import ConfigError, SandboxError
from stitchwork.isolation._base import Mount
from stitchwork.isolation._process import Stage

#: Top-level links (or directories) of a merged-``/usr`` host that programs expect.
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@functools.cache
def generated_etc(uid: int = 0, gid: int = 0) -> Path:
    """A private directory with a minimal ``passwd`` and ``group`` naming ``uid``/``gid`` ``sandbox`` (created
    once per pair)."""
    directory = Path(tempfile.mkdtemp(prefix="stitchwork-bwrap-etc-"))
    atexit.register(shutil.rmtree, directory, True)
    passwd = ["root:x:0:0:root:/root:/usr/sbin/nologin" if uid else "root:x:0:0:sandbox:/work:/bin/sh"]
    group = ["root:x:0:"]
    if uid:
        passwd.append(f"sandbox:x:{uid}:{gid}:sandbox:/work:/bin/sh")
    if gid:
        group.append(f"sandbox:x:{gid}:")
    if uid != 65534:
        passwd.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
    if gid != 65534:
        group.append("nogroup:x:65534:")
    (directory / "passwd").write_text("\n".join(passwd) + "\n")
    (directory / "group").write_text("\n".join(group) + "\n")
    for entry in directory.iterdir():
        entry.chmod(0o444)
    return directory


def python_prefix(python: str) -> str | None:
    """The installation prefix to bind for ``python`` (None when it is under ``/usr``).

    Raises:
        ConfigError: The prefix cannot be told (the interpreter sits in ``/`` or a top-level directory).
    """
    if python.startswith("/usr/"):
        return None
    if python == os.path.realpath(sys.executable) and not sys.base_prefix.startswith("/usr"):
        return sys.base_prefix
    prefix = os.path.dirname(os.path.dirname(python))
    if prefix in ("/", ""):
        raise ConfigError(f"bwrap sandbox: cannot tell the installation prefix of {python}")
    return prefix


def site_packages(prefix: str) -> list[str]:
    """The ``site-packages`` directories under an interpreter prefix (hidden from tools), sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(prefix), "lib", "python3*", "site-packages")))


def check_workdir(workdir: Path | None) -> None:
    """Raises :class:`SandboxError` when a spec's workdir is given but is not a directory."""
    if workdir is not None and not workdir.is_dir():
        raise SandboxError(f"workdir {workdir} is not a directory")


def check_mount(mount: Mount, *, reserved: Collection[str], reserved_trees: Collection[str]) -> None:
    """Checks one of a spec's mounts: an absolute, normalised target that is not reserved, and a source that exists.

    Args:
        mount: The mount.
        reserved: Targets refused as such (``/`` always is).
        reserved_trees: Targets refused together with everything under them.

    Raises:
        SandboxError: The mount is not allowed.
    """
    target = mount.target
    if (
        not target.startswith("/")
        or posixpath.normpath(target) != target
        or target == "/"
        or target in reserved
        or any(target == r or target.startswith(r + "/") for r in reserved_trees)
    ):
        raise SandboxError(f"mount target {target!r} is not allowed (absolute, normalised, not reserved)")
    if not mount.source.exists():
        raise SandboxError(f"mount source {mount.source} does not exist")


# -- the stage ------------------------------------------------------------------------------------------------


class Layout:
    """Collects what goes into one sandbox's stage (see :class:`~stitchwork.isolation._process.Stage`).

    Args:
        size_bytes: The disk quota.
        uid: Owner of the staged copies of granted directories (the sandbox's user).
        gid: Its group.
        base: Where the (empty) mount point is made on the host (default: the temp directory).
    """

    def __init__(self, size_bytes: int, *, uid: int, gid: int, base: str | None = None) -> None:
        _sweep_stages(base or tempfile.gettempdir())
        self.root = Path(tempfile.mkdtemp(prefix=f"stitchwork-stage-{os.getpid()}-", dir=base))
        self.size_bytes, self.uid, self.gid = size_bytes, uid, gid
        self._copy: list[tuple[str, str]] = []
        self._commit: list[tuple[str, str]] = []
        self._files: list[tuple[str, str, int]] = []
        self._binds: list[tuple[str, str]] = []
        self._scratch: list[str] = []

    def _path(self, name: str) -> str:
        return str(self.root / name)

    def scratch(self, name: str) -> str:
        """An empty world-writable (sticky) directory ``name``; returns its path."""
        self._scratch.append(name)
        return self._path(name)

    def copy(self, host: Path, name: str, *, commit: bool = True) -> str:
        """The host directory copied in (owned by the sandbox's user), and written back after the run."""
        self._copy.append((str(host), name))
        if commit:
            self._commit.append((str(host), name))
        return self._path(name)

    def file(self, host: Path | str, name: str, mode: int = 0o444) -> str:
        """A copy of a host file (readable by the sandbox's user whatever its mode on the host)."""
        self._files.append((str(host), name, mode))
        return self._path(name)

    def bind(self, host: Path | str, name: str) -> str:
        """The host path bound read-only, ``nosuid,nodev`` (reachable even below a directory the sandbox's user
        cannot search)."""
        self._binds.append((str(host), name))
        return self._path(name)

    def stage(self) -> Stage:
        """What the guard is to set up."""
        return Stage(self.root, self.size_bytes, self.uid, self.gid, copy=tuple(self._copy),
                     commit=tuple(self._commit), files=tuple(self._files), binds=tuple(self._binds),
                     scratch=tuple(self._scratch))  # fmt: skip

    def remove(self) -> None:
        """Removes the (empty) mount point after the run."""
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _sweep_stages(base: str) -> None:
    """Removes stage mount points left by processes that are gone (they are empty directories)."""
    if _SWEPT.get(base):
        return
    _SWEPT[base] = True
    for stale in glob.glob(os.path.join(glob.escape(base), "stitchwork-stage-*-*")):
        try:
            pid = int(os.path.basename(stale).split("-")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.rmdir(stale)
        except PermissionError:
            continue


_SWEPT: dict[str, bool] = {}
