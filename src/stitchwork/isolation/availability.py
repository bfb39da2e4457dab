"""Which sandbox backends this host can run, and why not the others (``stitchwork doctor``, the dashboard)."""

from __future__ import annotations

from stitchwork.errors import StitchworkError
from stitchwork.isolation._base import SANDBOXES

__all__ = ["BACKENDS", "backend_status"]

#: Every backend scheme, in the order ``doctor`` lists them.
BACKENDS = ("wasm", "bwrap", "gvisor", "firecracker", "nanos", "inline")


def backend_status() -> list[tuple[str, bool, str]]:
    """(scheme, usable here, why not) for every backend."""
    rows = []
    for name in BACKENDS:
        try:
            cls = SANDBOXES.load(f"{name}://")
            ok, reason = cls.available()
        except StitchworkError as exc:
            ok, reason = False, str(exc)
        rows.append((name, bool(ok), reason))
    return rows
