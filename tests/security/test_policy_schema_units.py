"""The generated Cedar schema and the tool descriptions (security/policy/schema.py) on their edges: the comments
operators read, hostile names and side effects kept inside their comment, and immutable tool descriptions."""

from __future__ import annotations

import dataclasses

import cedarpy
import pytest

from stitchwork.security.policy.schema import SIDE_EFFECTS, ToolAction, arg_specs, build_schema, cedar_tools


def test_each_side_effect_has_a_documented_placeholder_action() -> None:
    text = build_schema([])
    for effect in SIDE_EFFECTS:
        assert (
            f"\n  // Stands for any {effect} tool, so that policies about the class are type-checked even when no "
            f"such tool is\n  // registered (and cannot assume arguments); never requested.\n"
            f'  action "<any {effect} tool>" in ["{effect}"] appliesTo {{\n'
        ) in text
    cedarpy.Schema.from_str(text)


def test_a_line_break_in_a_side_effect_stays_inside_its_comment() -> None:
    # build_schema is public and does not check side effects (cedar_tools does): a line break must not end the
    # comment and turn the rest into schema text
    text = build_schema([ToolAction("t", "read\nentity Evil;")])
    assert "  // 't' (read entity Evil;)\n" in text
    assert "\nentity Evil;" not in text


def test_tool_descriptions_are_immutable() -> None:
    tool = cedar_tools([ToolAction("mail", "external", {"properties": {"to": {"type": "string"}}})])["mail"]
    spec = arg_specs({"properties": {"to": {"type": "string"}}})[0]
    for value in (tool, spec, ToolAction("t", "read")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.name = "other"  # type: ignore[misc]
    assert tool.name == "mail" and spec.name == "to"
