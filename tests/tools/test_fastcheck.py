"""The quick argument check may only ever say "valid" where jsonschema says so too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from stitchwork.errors import InvalidArguments
from stitchwork.tools._fastcheck import compile_check
from stitchwork.tools.manifest import FORMATS, SideEffect, ToolManifest, ToolRegistry

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object", "required": ["key"], "additionalProperties": False,
        "properties": {"key": {"type": "string", "maxLength": 3}, "limit": {"type": "integer", "minimum": 0}},
    },
    {
        "type": "object",
        "properties": {
            "mode": {"enum": ["a", "b", 1, True, None]},
            "ratio": {"type": ["number", "null"], "exclusiveMaximum": 1, "exclusiveMinimum": -1},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2},
            "nested": {"type": "object", "required": ["x"], "properties": {"x": {"type": "boolean"}}},
            "anything": True,
        },
    },
    {"type": "object", "properties": {"n": {"type": "number", "maximum": 2.5, "minimum": -2}}, "description": "d"},
]

SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=4)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["key", "limit", "mode", "ratio", "tags", "nested", "x", "n", "z"]), inner,
                      max_size=4),
    max_leaves=8,
)


def near(schema: Any) -> st.SearchStrategy[Any]:
    """Values of about the schema's shape, on both sides of its bounds, or anything."""
    if not isinstance(schema, dict):
        return VALUES
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    options: list[st.SearchStrategy[Any]] = [SCALARS, VALUES]
    if "enum" in schema:
        options.append(st.sampled_from([*schema["enum"], 1.0, 0, False, "c"]))
    if "string" in kinds:
        options.append(st.text(max_size=int(schema.get("maxLength", 3)) + 1))
    if "integer" in kinds or "number" in kinds:
        options.append(st.integers(-4, 4) | st.sampled_from([-2.5, -1.0, -0.5, 0.5, 1.0, 2.5, 3.0, True]))
    if "array" in kinds:
        options.append(st.lists(near(schema.get("items", {})), max_size=3))
    if "object" in kinds:
        inner = {name: near(sub) for name, sub in schema.get("properties", {}).items()}
        options.append(st.fixed_dictionaries({}, optional={**inner, "y": SCALARS}))
    return st.one_of(options)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["lookup", "mixed", "numbers"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_quick_valid_implies_jsonschema_valid(schema: dict[str, Any], data: st.DataObject) -> None:
    optional = {name: near(sub) for name, sub in schema["properties"].items()}
    value = data.draw(st.fixed_dictionaries({}, optional={**optional, "z": VALUES}))  # z: never declared
    quick = compile_check(schema)
    assert quick is not None
    if quick(value):
        assert Draft202012Validator(schema, format_checker=FORMATS).is_valid(value), value


def test_quick_check_accepts_the_common_valid_calls() -> None:
    lookup, mixed, _ = (compile_check(s) for s in SCHEMAS)
    assert lookup is not None and mixed is not None
    assert lookup({"key": "k1", "limit": 3}) and not lookup({"key": "k1", "other": 1})
    assert not lookup({"key": "k1", "limit": True}) and not lookup({"limit": 1})
    assert mixed({"mode": 1, "ratio": 0.5, "tags": ["x"], "nested": {"x": False}, "anything": [1]})
    assert not mixed({"mode": 1.0}) and not mixed({"mode": False}) and not mixed({"tags": []})
    assert mixed({"ratio": 0.99}) and not mixed({"ratio": 1}) and not mixed({"ratio": -1.0})
    assert not mixed({"tags": ["a", "b", "c"]}) and not mixed({"tags": [""]}) and not mixed({"nested": {}})


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}},
        {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"anyOf": [{"type": "string"}]},
        {"type": "object", "properties": {"a": False}},
        {"type": "widget"},
    ],
)
def test_schemas_with_other_keywords_get_no_quick_check(schema: dict[str, Any]) -> None:
    assert compile_check(schema) is None


def test_parse_arguments_still_reports_jsonschema_errors(tmp_path: Path) -> None:
    manifest = ToolManifest("lookup", "", SideEffect.READ, tmp_path / "kv.py", "lookup", SCHEMAS[0])
    registry = ToolRegistry([manifest])
    assert registry.parse_arguments(manifest, '{"key": "abc"}') == {"key": "abc"}
    with pytest.raises(InvalidArguments, match="too long"):
        registry.parse_arguments(manifest, '{"key": "abcd"}')
    with pytest.raises(InvalidArguments, match="limit"):
        registry.parse_arguments(manifest, '{"key": "a", "limit": -1}')
