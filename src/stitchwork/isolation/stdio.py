"""Long-running stdio processes in a sandbox: the command line that starts an upstream MCP server under bubblewrap.

The sandbox port (:mod:`stitchwork.isolation._base`) runs a program to completion; an MCP server is a process the
gateway keeps talking to over its stdin and stdout. :func:`bwrap_argv` wraps its command: new namespaces (user,
pid, ipc, uts, mount, cgroup, and network unless egress is granted), the host's ``/usr``, ``/etc`` and the
interpreter's prefix read-only, a private ``/tmp``, only the granted directories writable, no capabilities, uid and
gid ``nobody`` (never host root), killed with its parent.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from stitchwork.errors import SandboxError

ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
NOBODY = "65534"


def bwrap_available() -> str:
    """The path of ``bwrap``, or ``""`` when it is not installed."""
    return shutil.which("bwrap") or ""


def _prefixes(command: str) -> list[str]:
    """Read-only trees the command needs beyond ``/usr``: the Python prefixes and the executable's own prefix."""
    out: list[str] = []
    for path in (sys.prefix, sys.base_prefix, sys.exec_prefix):
        if path and not path.startswith("/usr"):
            out.append(path)
    found = shutil.which(command)
    if found:
        for candidate in (found, os.path.realpath(found)):
            prefix = str(Path(candidate).resolve().parent.parent)
            if prefix not in ("/", "/usr") and not prefix.startswith("/usr/"):
                out.append(prefix)
    unique: list[str] = []
    for path in out:
        if os.path.isdir(path) and path not in unique:
            unique.append(path)
    return unique


def bwrap_argv(command: Sequence[str], *, dirs: Sequence[str] = (), network: bool = False,
               bwrap: str = "") -> list[str]:
    """The argv that runs ``command`` in a bubblewrap sandbox (see the module docstring).

    Args:
        command: The server's command and arguments.
        dirs: Host directories the process may read and write (mounted at the same paths).
        network: Share the host's network (an upstream server granted egress); otherwise it has none.
        bwrap: The ``bwrap`` binary (default: from ``PATH``).

    Raises:
        SandboxError: bwrap is missing, the command is empty, or a granted directory does not exist.
    """
    binary = bwrap or bwrap_available()
    if not binary:
        raise SandboxError("bwrap is not installed (apt-get install bubblewrap); or set [mcp] sandbox = \"inline://\" "
                           "to run upstream MCP servers without isolation")
    if not command:
        raise SandboxError("the MCP server's command is empty")
    args = [binary, "--unshare-all", "--unshare-user", "--uid", NOBODY, "--gid", NOBODY, "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
    if network:
        args.append("--share-net")
    args += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ROOT_LINKS:
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    # The private /tmp first: binds below it (a virtual environment or a granted directory under /tmp) go on top
    # of it instead of being hidden by it.
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for prefix in _prefixes(command[0]):
        args += ["--ro-bind", prefix, prefix]
    for directory in dirs:
        path = os.path.realpath(directory)
        if not os.path.isdir(path):
            raise SandboxError(f"granted directory {directory} does not exist")
        args += ["--bind", path, path]
    args += ["--chdir", os.path.realpath(dirs[0]) if dirs else "/tmp", "--setenv", "HOME", "/tmp", "--"]
    return [*args, *command]


__all__ = ["bwrap_argv", "bwrap_available"]
