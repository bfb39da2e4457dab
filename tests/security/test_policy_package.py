"""The public face of the policy package, and where it finds the default policy pack."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import stitchwork
import stitchwork.security.policy as policy
from stitchwork.security.policy import PolicyEngine, ToolAction, builtin_policy_dir

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_PACK = {"budget.cedar", "external.cedar", "irreversible.cedar", "model.cedar", "read.cedar", "write.cedar"}


def imported_from_the_package() -> set[str]:
    """Every name that code outside the package (src, tests, bench) imports from ``stitchwork.security.policy``."""
    names: set[str] = set()
    for directory in ("src", "tests", "bench"):
        for path in (ROOT / directory).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == "stitchwork.security.policy":
                    names |= {alias.name for alias in node.names}
    return names


def test_every_name_imported_from_the_package_is_public() -> None:
    used = imported_from_the_package()

    assert {"Decision", "Effect", "PolicyEngine", "Request", "ToolAction", "builtin_policy_dir"} <= used
    assert set(policy.__all__) >= used


def test_every_public_name_is_importable_from_the_package() -> None:
    assert len(policy.__all__) == len(set(policy.__all__))
    namespace: dict[str, object] = {}
    exec("from stitchwork.security.policy import *", namespace)
    for name in policy.__all__:
        assert namespace[name] is getattr(policy, name), name
        assert getattr(policy, name) is not None, name


def test_public_names_are_defined_in_the_package_modules() -> None:
    for name in policy.__all__:
        value = getattr(policy, name)
        home = getattr(value, "__module__", None)
        if home is not None:  # classes and functions: defined in a module of the package, importable from it
            assert home.startswith("stitchwork.security.policy."), (name, home)
            assert getattr(importlib.import_module(home), name) is value


def test_builtin_policy_dir_is_the_default_pack_shipped_with_stitchwork() -> None:
    directory = builtin_policy_dir()

    assert directory == Path(stitchwork.__file__).resolve().parent / "policies"
    assert directory.is_absolute() and directory.is_dir()
    assert {f.name for f in directory.glob("*.cedar")} == DEFAULT_PACK
    assert any((directory / "strict").glob("*.cedar"))


def test_the_default_pack_loads_under_its_default_label() -> None:
    engine = PolicyEngine.load([builtin_policy_dir()], [ToolAction("read_file", "read")])

    assert engine.policies
    for info in engine.policies:
        assert info.file.startswith("default/") and info.file.removeprefix("default/") in DEFAULT_PACK, info
        assert Path(info.path).parent == builtin_policy_dir(), info
