from pathlib import Path

import pytest

from stitchwork.errors import ConfigError, InvalidArguments, UnknownTool
from stitchwork.tools.manifest import SideEffect, ToolRegistry, load_tools


def write_tool(directory: Path, name: str, extra: str = "", args: str = "") -> None:
    (directory / "impl.py").write_text("def fn(**kw):\n    return kw\n")
    (directory / f"{name}.toml").write_text(
        f'name = "{name}"\ndescription = "d"\nside_effect = "write"\nentry = "impl.py:fn"\n{extra}\n'
        + (args or '[args]\ntype = "object"\nrequired = ["path", "n"]\nadditionalProperties = false\n'
           'properties.path = { type = "string", format = "relative-path" }\n'
           'properties.n = { type = "integer", maximum = 10 }\n'
           'properties.to = { type = "string", format = "email" }\n')
    )


@pytest.fixture
def registry(tmp_path: Path) -> ToolRegistry:
    write_tool(tmp_path, "write_file")
    return load_tools([tmp_path], max_arg_bytes=200)


def test_loads_manifest(registry: ToolRegistry) -> None:
    tool = registry.get("write_file")
    assert tool.side_effect is SideEffect.WRITE
    assert tool.entry_function == "fn"
    assert tool.openai_schema()["function"]["name"] == "write_file"


def test_valid_arguments(registry: ToolRegistry) -> None:
    tool = registry.get("write_file")
    assert registry.parse_arguments(tool, '{"path": "a/b.txt", "n": 3}') == {"path": "a/b.txt", "n": 3}
    assert registry.parse_arguments(tool, b'{"path": "x", "n": 1}') == {"path": "x", "n": 1}
    assert registry.parse_arguments(tool, {"path": "x", "n": 1}) == {"path": "x", "n": 1}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"path": "a", "n": ', "not valid JSON"),
        (b'{"path": "\xff\xfe", "n": 1}', "not valid UTF-8"),
        ("[1, 2]", "must be a JSON object"),
        ('{"path": "a", "n": "three"}', "argument 'n': 'three' is not of type 'integer'"),
        ('{"path": "a", "n": 99}', "argument 'n': 99 is greater than the maximum of 10"),
        ('{"path": "a"}', "'n' is a required property"),
        ('{"path": "a", "n": 1, "x": 1}', "Additional properties are not allowed"),
        ('{"path": "../../etc/passwd", "n": 1}', "contains '..'"),
        ('{"path": "/etc/passwd", "n": 1}', "absolute path"),
        ('{"path": "a\\u0000b", "n": 1}', "NUL byte"),
        ('{"path": "a", "n": 1, "to": "not-an-address"}', "is not a valid email"),
        ('{"path": "' + "x" * 300 + '", "n": 1}', "limit of 200 bytes"),
        ("[" * 100_000 + "]" * 100_000, "limit of 200 bytes"),
        ('{"path": "\\ud800", "n": 1}', "invalid unicode"),
    ],
)
def test_invalid_arguments_are_precise(registry: ToolRegistry, raw: str | bytes, message: str) -> None:
    with pytest.raises(InvalidArguments, match=message.replace("(", r"\(").replace(")", r"\)")):
        registry.parse_arguments(registry.get("write_file"), raw)


def test_deep_nesting_within_size_limit(tmp_path: Path) -> None:
    write_tool(tmp_path, "deep", args='[args]\ntype = "object"\n')
    registry = load_tools([tmp_path], max_arg_bytes=10_000_000)
    with pytest.raises(InvalidArguments, match="nested too deeply"):
        registry.parse_arguments(registry.get("deep"), '{"a": ' + "[" * 1_000_000 + "]" * 1_000_000 + "}")


def test_unknown_tool_names_the_available_ones(registry: ToolRegistry) -> None:
    with pytest.raises(UnknownTool, match="unknown tool 'rm_rf'; available: write_file"):
        registry.get("rm_rf")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('target = "nope"', "target 'nope' is not one of"),
        ('undo = "missing_tool"', "undo tool 'missing_tool' is not declared"),
        ("bogus = 1", "unknown key"),
        ('[limits]\nfoo = 1', "unknown limit"),
    ],
)
def test_bad_manifests(tmp_path: Path, extra: str, message: str) -> None:
    write_tool(tmp_path, "t", extra=extra)
    with pytest.raises(ConfigError, match=message):
        load_tools([tmp_path])


def test_bad_side_effect_and_entry(tmp_path: Path) -> None:
    (tmp_path / "impl.py").write_text("def fn(): pass\n")
    (tmp_path / "t.toml").write_text('name = "t"\nside_effect = "explode"\nentry = "impl.py:fn"\n')
    with pytest.raises(ConfigError, match="side_effect must be one of"):
        load_tools([tmp_path])
    (tmp_path / "t.toml").write_text('name = "t"\nside_effect = "read"\nentry = "missing.py:fn"\n')
    with pytest.raises(ConfigError, match="does not exist"):
        load_tools([tmp_path])


UNDO_TARGET = ('[args]\ntype = "object"\nrequired = ["id"]\nadditionalProperties = false\n'
               'properties.id = { type = "string" }\nproperties.force = { type = "boolean" }\n')


@pytest.mark.parametrize(
    ("undo", "message"),
    [
        ('{ tool = "undo_it", args = { id = "result..id" } }', "undo.args.id = 'result..id' must be a path"),
        ('{ tool = "undo_it", args = { id = "os.system(1)" } }', "undo.args.id = 'os.system\\(1\\)' must be a path"),
        ('{ tool = "undo_it", args = { id = "result.id", force = "yes" } }', "constants must not be strings"),
        ('{ tool = "undo_it", args = { id = "args.nope" } }',
         "undo.args.id = 'args.nope': 't' has no argument 'nope'; its arguments: n, path, to"),
        ('{ tool = "undo_it", args = { id = "args" } }', "undo.args.id = 'args': 't' has no argument 'args'"),
        ('{ tool = "undo_it", args = { id = "result.id", other = "result.x" } }',
         "undo.args.other: the undo tool 'undo_it' has no argument 'other'; its arguments: force, id"),
        ('{ tool = "undo_it", args = { force = true } }', "undo.args does not map 'id', required by the undo tool"),
        ('{ tool = "undo_it", args = { id = "result.id" }, code = "x" }', "undo: unknown key\\(s\\) code"),
        ('{ tool = "Undo It" }', "undo.tool must name a tool"),
        ('{ tool = "undo_it", args = { id = { nested = "result.id" } } }', "must be a path or a constant"),
        ('3', "undo must be a tool name or a table"),
    ],
)
def test_bad_undo_mappings_are_refused_at_load_naming_the_path(tmp_path: Path, undo: str, message: str) -> None:
    write_tool(tmp_path, "undo_it", args=UNDO_TARGET)
    (tmp_path / "t.toml").write_text(
        'name = "t"\ndescription = "d"\nside_effect = "write"\nentry = "impl.py:fn"\n'
        f'undo = {undo}\n[args]\ntype = "object"\nadditionalProperties = false\n'
        'properties.path = { type = "string" }\nproperties.n = { type = "integer" }\n'
        'properties.to = { type = "string" }\n')
    with pytest.raises(ConfigError, match=message):
        load_tools([tmp_path])


def test_undo_mappings_take_paths_into_args_and_result_and_report_the_missing_one(tmp_path: Path) -> None:
    from stitchwork.tools.manifest import undo_call

    write_tool(tmp_path, "undo_it", args=UNDO_TARGET)
    (tmp_path / "t.toml").write_text(
        'name = "t"\ndescription = "d"\nside_effect = "write"\nentry = "impl.py:fn"\n'
        'undo = { tool = "undo_it", args = { id = "result.items[1].id", force = true } }\n'
        '[args]\ntype = "object"\nproperties.path = { type = "string" }\n')
    (tmp_path / "p.toml").write_text(
        'name = "p"\ndescription = "d"\nside_effect = "write"\nentry = "impl.py:fn"\nundo = "undo_it"\n'
        '[args]\ntype = "object"\nproperties.id = { type = "string" }\n')
    registry = load_tools([tmp_path])
    tool = registry.get("t")
    assert undo_call(tool, {"path": "a"}, {"items": [{"id": "x"}, {"id": "y"}]}) == ({"id": "y", "force": True}, "")
    assert undo_call(tool, {}, {"items": [{"id": "x"}]}) == (
        None, "undo.args.id = 'result.items[1].id': the call's result has no value there")
    assert undo_call(tool, {}, "text") == (None, "undo.args.id = 'result.items[1].id': the call's result has no "
                                                 "value there")
    assert undo_call(registry.get("p"), {"id": "k"}, None) == ({"id": "k"}, "")  # no mapping: the same arguments
    assert undo_call(registry.get("undo_it"), {"id": "k"}, None) == (None, "")  # no undo declared


def test_a_tool_cannot_take_the_name_of_the_undo_action(make_config, tools_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from stitchwork.platform import Platform

    write_tool(tools_dir, "undo")
    with pytest.raises(ConfigError, match="a tool cannot be named 'undo': it is the Cedar action of undo calls"):
        Platform.open(make_config([{"content": "ok"}], sandbox="inline://"))
