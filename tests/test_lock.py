"""requirements.lock pins every dependency the scripts, the Dockerfile and CI install; the scripts use a venv."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, tuple[str, Marker | None]]:
    """name → (version, marker) of every line of the lock."""
    found: dict[str, tuple[str, Marker | None]] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?", line)
        assert match, f"not an exact pin: {line!r}"
        found[canonicalize_name(match.group(1))] = (match.group(2), Marker(match.group(3)) if match.group(3) else None)
    return found


def declared() -> list[Requirement]:
    """Every requirement pyproject.toml declares: dependencies, every extra, the build backend."""
    texts = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for group in PYPROJECT["project"]["optional-dependencies"].values():
        texts += group
    return [Requirement(t) for t in texts if not t.startswith("stitchwork[")]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    locked = pins()
    stale = []
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name not in locked:
            stale.append(f"{requirement} is not in requirements.lock")
        elif not requirement.specifier.contains(locked[name][0], prereleases=True):
            stale.append(f"{requirement} but the lock pins {locked[name][0]}")
    assert not stale, "run `bash scripts/lock.sh`: " + "; ".join(stale)


def test_self_referencing_extras_name_real_extras() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for group in PYPROJECT["project"]["optional-dependencies"].values():
        for text in group:
            if text.startswith("stitchwork["):
                assert set(Requirement(text).extras) <= extras, text


def test_the_light_install_has_no_server_side_dependency() -> None:
    base = {canonicalize_name(Requirement(t).name) for t in PYPROJECT["project"]["dependencies"]}
    assert base >= {"typer", "rich", "httpx"}
    assert not base & {"duckdb", "cedarpy", "wasmtime", "fastapi", "uvicorn", "jsonschema", "cryptography", "pyjwt"}
    server = {canonicalize_name(Requirement(t).name) for t in PYPROJECT["project"]["optional-dependencies"]["server"]}
    assert server >= {"duckdb", "cedarpy", "wasmtime", "fastapi", "uvicorn"}


def test_the_lock_says_how_to_regenerate_it() -> None:
    assert "bash scripts/lock.sh" in (ROOT / "requirements.lock").read_text().splitlines()[1]
    assert "uv pip compile" in (ROOT / "scripts" / "lock.sh").read_text()


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only inside the project's .venv (scripts/test.sh), which is installed from the lock")
def test_the_venv_holds_exactly_the_locked_versions() -> None:
    wrong = []
    for name, (version, marker) in pins().items():
        if marker is not None and not marker.evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra the scripts do not install (every one they do is checked by name below)
        if installed != version:
            wrong.append(f"{name} {installed} (lock: {version})")
    assert not wrong
    for name in ("duckdb", "cedarpy", "wasmtime", "pytest", "mypy", "ruff", "typer"):
        assert metadata.version(name) == pins()[canonicalize_name(name)][0]


def test_scripts_install_only_into_the_project_venv() -> None:
    for script in [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]:
        for number, line in enumerate(script.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpip3? install\b", code) and not re.search(r"[\"'`]pip install", code):  # not a message
                assert re.search(r'("?\$VENV/bin/python"?|"\$light"|\buv) .*pip install', code), \
                    f"{script.name}:{number}: pip outside a virtual environment: {line.strip()}"
    shared = (ROOT / "scripts" / "_venv.sh").read_text()
    assert 'PY="${PYTHON:-python3}"' in shared and "-m venv" in shared and "uv venv" in shared
    for name in ("demo.sh", "test.sh"):
        text = (ROOT / "scripts" / name).read_text()
        assert "sw_venv" in text and "sw_install" in text and 'export PATH="$VENV/bin:$PATH"' in text
