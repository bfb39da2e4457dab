"""File-system helpers shared by every layer."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["fsync_dir"]


def fsync_dir(directory: Path, *, best_effort: bool = False) -> None:
    """Makes the entries of ``directory`` durable: files created, renamed or removed in it survive a crash.

    Args:
        directory: The directory to sync.
        best_effort: Ignore errors (some file systems cannot open or sync a directory). Without it they raise.

    Raises:
        OSError: the directory cannot be opened or synced (unless ``best_effort``).
    """
    with contextlib.suppress(OSError) if best_effort else contextlib.nullcontext():
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
