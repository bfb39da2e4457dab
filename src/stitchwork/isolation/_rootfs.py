"""What the namespace sandboxes (``bwrap://``, ``gvisor://``) build their file system from.

Both bind the host's ``/usr`` (with the ``/bin``, ``/lib*``, ``/sbin`` links of :data:`ROOT_LINKS`), the
interpreter's installation prefix when it lives outside ``/usr`` (:func:`python_prefix`, its
:func:`site_packages` hidden), a generated ``/etc/passwd`` and ``/etc/group`` (:func:`generated_etc`), and check
the spec's workdir and mounts the same way (:func:`check_workdir`, :func:`check_mount`).
"""

from __future__ import annotations

import atexit
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

#: Top-level links (or directories) of a merged-``/usr`` host that programs expect.
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@functools.cache
def generated_etc() -> Path:
    """A private directory with a minimal ``passwd`` and ``group`` for the sandbox (created once)."""
    directory = Path(tempfile.mkdtemp(prefix="stitchwork-bwrap-etc-"))
    atexit.register(shutil.rmtree, directory, True)
    (directory / "passwd").write_text(
        "root:x:0:0:sandbox:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (directory / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
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
