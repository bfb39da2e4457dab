"""The interpreters of one ``wasm://`` sandbox: a warm pool of parked ones, cold ones on demand, one shutdown.

CPython's start-up inside the module costs ~60 ms; instantiation costs well under 1 ms. So the pool keeps
``size`` interpreters started ahead of time, each in its own thread, parked in the runner reading its request
from stdin; a background thread (the filler) starts a replacement for each one taken. Every interpreter this
pool starts, parked or cold, is tracked so that :meth:`InterpreterPool.close` (also run at exit) stops them all.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import wasmtime

from stitchwork.errors import SandboxError
from stitchwork.isolation._wasm_instance import RUNNER_ARGV, START_DEADLINE_S, Instance
from stitchwork.isolation._wasm_runtime import Runtime, runtime

log = logging.getLogger("stitchwork.isolation.wasm")


class InterpreterPool:
    """Starts, parks and stops the interpreters of one sandbox.

    Args:
        cache: Compiled-module cache directory (None: the default).
        staging_base: Where the pool's staging directory (interpreter homes, scratch ``/work``) is made.
        size: Parked interpreters to keep ready (0: every call starts cold).
        mem_mb: Memory limit of a parked interpreter until its call sets the call's own.
    """

    def __init__(self, *, cache: Path | None, staging_base: Path, size: int, mem_mb: int) -> None:
        self.cache = cache
        self.size = size
        self.mem_mb = mem_mb
        self._staging_base = staging_base
        self.staging: Path | None = None
        self.rt: Runtime | None = None
        self._parked: deque[Instance] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._filler: threading.Thread | None = None
        self._live: set[Instance] = set()
        self._prepare_lock = threading.Lock()

    @property
    def needs_prepare(self) -> bool:
        """Whether :meth:`prepare` has yet to load the runtime or start the filler."""
        return self.rt is None or (self.size > 0 and self._filler is None)

    def prepare(self) -> Runtime:
        """Loads (compiling and caching on first use) the module and starts filling the pool."""
        with self._prepare_lock:
            if self.rt is None:
                self.rt = runtime(self.cache)
                self.staging = Path(tempfile.mkdtemp(prefix="stitchwork-wasm-", dir=self._staging_base))
                atexit.register(self.close)
            if self.size and self._filler is None and not self._closed:
                self._filler = threading.Thread(target=self._fill, name="stitchwork-wasm-pool", daemon=True)
                self._filler.start()
            return self.rt

    def warm_up(self) -> None:
        """:meth:`prepare`, logging rather than raising a failure (the first call raises it again)."""
        try:
            self.prepare()
        except Exception as exc:  # reported again (raised) by the first run
            log.debug("wasm: warm-up failed: %s", exc)

    def new_instance(self, argv: tuple[str, ...], **kwargs: Any) -> Instance:
        """Starts an interpreter (``kwargs`` as for :class:`Instance`), tracked until it finishes.

        Raises:
            SandboxError: It cannot be started.
        """
        assert self.rt is not None and self.staging is not None
        try:
            instance = Instance(self.rt, self.staging, argv, **kwargs)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise SandboxError(f"wasm://: cannot start an interpreter: {exc}") from exc
        with self._cond:
            self._live = {i for i in self._live if not i.finished.is_set()}
            self._live.add(instance)
        return instance

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._parked) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                instance = self.new_instance(RUNNER_ARGV, workdir=None, mem_mb=self.mem_mb)
            except SandboxError as exc:
                if self._closed:
                    return
                log.warning("wasm pool: %s", exc)
                time.sleep(1.0)
                continue
            instance.ready.wait(START_DEADLINE_S)
            with self._cond:
                if self._closed or instance.finished.is_set():
                    instance.discard()
                    continue
                self._parked.append(instance)
                self._cond.notify_all()

    def take(self) -> Instance | None:
        """A parked interpreter, out of the pool (None when none is ready)."""
        with self._cond:
            while self._parked:
                instance = self._parked.popleft()
                self._cond.notify_all()
                if not instance.finished.is_set():
                    return instance
        return None

    def ready(self) -> int:
        """How many parked interpreters are ready now."""
        with self._cond:
            return len(self._parked)

    def wait_full(self, timeout: float = 30.0) -> bool:
        """Blocks until the pool is full or ``timeout`` passes; whether it is full."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._parked) < self.size and time.monotonic() < deadline:
                self._cond.wait(0.05)
            return len(self._parked) >= self.size

    def close(self) -> None:
        """Stops the filler, discards every interpreter and removes the staging directory."""
        with self._cond:
            self._closed = True
            self._parked.clear()
            live, self._live = list(self._live), set()
            self._cond.notify_all()
        for instance in live:
            instance.discard()
        deadline = time.monotonic() + 2.0  # an instance blocked in a long host call is left to its daemon thread
        for instance in live:
            instance.finished.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ValueError):
            atexit.unregister(self.close)
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
