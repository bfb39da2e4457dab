"""Isolation port: run one program in a sandbox with limits.

A program is either a :class:`PythonCall` (a function in a tool's Python file, called with a JSON payload) or a
:class:`Command` (argv of a native program). Backends: ``inline://`` (in-process test double, no isolation),
``bwrap://`` (bubblewrap + seccomp); more in later issues.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from stitchwork._registry import Registry
from stitchwork.config import Limits as Limits  # the port's limits; defined below us so config can derive from it
from stitchwork.errors import ConfigError


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox at ``target`` (read-only unless ``writable``)."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class PythonCall:
    """Call ``function(**payload["args"])`` from the Python file ``file`` (a host path)."""

    file: Path
    function: str
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """Run ``argv`` with ``stdin``."""

    argv: tuple[str, ...]
    stdin: bytes = b""


@dataclass(frozen=True)
class SandboxSpec:
    """What to run and with what.

    ``workdir`` is the only writable host directory (mounted at ``/work`` inside and used as the cwd);
    ``env`` is the whole environment the program sees (secrets are injected here by the gateway, nowhere else);
    ``egress`` lists hosts the program may reach (empty: no network at all).
    """

    program: PythonCall | Command
    workdir: Path | None = None
    mounts: tuple[Mount, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    egress: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed program.

    ``killed`` names why the sandbox stopped the program (``"timeout"``, ``"memory"``, ``"cpu"``,
    ``"output"``, ``"pids"``, ``"disk"``, ``"signal"``) or is ``None`` when it exited by itself. For a
    :class:`PythonCall`, ``value`` is the function's JSON result and ``error`` the exception text if it raised.
    """

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    value: Any = None
    error: str | None = None
    killed: str | None = None
    truncated: bool = False
    duration_s: float = 0.0
    cpu_s: float = 0.0
    max_rss_kb: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None and self.error is None


class Sandbox(ABC):
    """One backend. ``run`` never raises for what the program does; it raises :class:`SandboxError` only when
    the sandbox itself cannot start."""

    uri: str
    #: Whether :class:`Command` may name any program of the host (``False``: only what the backend documents,
    #: e.g. ``wasm://`` runs the Python interpreter only).
    native_commands: ClassVar[bool] = True
    #: ``False`` only for ``inline://``, which runs tools inside the caller's process: no isolation at all.
    isolated: ClassVar[bool] = True

    @abstractmethod
    async def run(self, spec: SandboxSpec) -> SandboxResult:
        """Runs ``spec.program`` to completion or until a limit stops it."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Whether this host can run the backend, and why not."""
        return True, ""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Releases pooled resources."""

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


SANDBOXES = Registry(
    "sandbox",
    {
        "inline": ("stitchwork.isolation.inline:InlineSandbox", None),
        "bwrap": ("stitchwork.isolation.bwrap:BwrapSandbox", "bwrap"),
        "wasm": ("stitchwork.isolation.wasm:WasmSandbox", "wasm"),
        "gvisor": ("stitchwork.isolation.gvisor:GvisorSandbox", "bwrap"),
        "firecracker": ("stitchwork.isolation.firecracker:FirecrackerSandbox", None),
        "nanos": ("stitchwork.isolation.nanos:NanosSandbox", None),
    },
)


#: Why ``inline://`` is refused by default (and where to enable it).
INLINE_REFUSED = (
    "inline:// runs tools inside this process with NO isolation (it is the test double); it is refused unless "
    "the operator enables it: [isolation] allow_inline = true (or STITCHWORK_ISOLATION__ALLOW_INLINE=1)"
)


def is_inline(uri: str) -> bool:
    """Whether ``uri`` names ``inline://`` (no isolation)."""
    return uri.split(":", 1)[0].strip().lower() == "inline"


def isolation_label(uri: str) -> str:
    """``"none"`` for ``inline://``, else ``"sandbox"`` (for audit events and summaries)."""
    return "none" if is_inline(uri) else "sandbox"


def open_sandbox(uri: str, *, allow_inline: bool = False, **options: Any) -> Sandbox:
    """Opens the sandbox backend named by ``uri``.

    Args:
        uri: The backend's URI.
        allow_inline: Whether ``inline://`` (no isolation) may be opened: the operator's ``[isolation]
            allow_inline``. Tests that use the double pass ``True`` explicitly.
        **options: The backend's options.

    Raises:
        ConfigError: ``inline://`` without ``allow_inline``, an unknown scheme or bad options.
        BackendUnavailable: The backend cannot run here.
    """
    if is_inline(uri) and not allow_inline:
        raise ConfigError(INLINE_REFUSED)
    sandbox: Sandbox = SANDBOXES.load(uri)(uri, **options)
    return sandbox
