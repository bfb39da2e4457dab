"""Edges of policy text handling: the statement splitter, locating parse errors, ids, validation messages."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import cedarpy
import pytest

import stitchwork.security.policy.text as text_module
from stitchwork.errors import PolicyLoadError
from stitchwork.security.policy.text import (
    PolicyInfo,
    _locate_parse_error,
    _parse_error,
    _split_statements,
    load_policy_files,
    validate_against_schema,
)

PERMIT = "permit(principal, action, resource);"


def split(text: str) -> list[tuple[int, str, bool]]:
    return [(s.line, s.text, s.terminated) for s in _split_statements(text)]


@pytest.mark.parametrize(("text", "expected"), [
    ('a "";b;', [(1, 'a "";', True), (1, "b;", True)]),  # an empty string
    ('a "x";b;', [(1, 'a "x";', True), (1, "b;", True)]),  # a ";" right after a string ends the statement
    ('a "x\\"";b;', [(1, 'a "x\\"";', True), (1, "b;", True)]),  # an escaped quote just before the closing one
    ('a "x\\\\";b;', [(1, 'a "x\\\\";', True), (1, "b;", True)]),  # an escaped backslash ends nothing
    ('a "x\\\ny";\nb;', [(1, 'a "x\\\ny";', True), (3, "b;", True)]),  # an escaped newline still counts a line
    ("a / b;c;", [(1, "a / b;", True), (1, "c;", True)]),  # "/" alone is not a comment
    ("a // b;\nc;", [(1, "a // b;\nc;", True)]),  # "//" is
    ('a "abc', [(1, 'a "abc', False)]),  # a string open at the end of the text
    ('a "abc\\', [(1, 'a "abc\\', False)]),  # an escape at the very end of the text
    ('\n\n  x "a\nb" y', [(3, 'x "a\nb" y', False)]),
])
def test_the_statement_splitter_on_strings_comments_and_the_end_of_text(
        text: str, expected: list[tuple[int, str, bool]]) -> None:
    assert split(text) == expected


def test_an_error_without_a_message_reads_syntax_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(text: str) -> None:
        raise ValueError("")

    monkeypatch.setattr(text_module, "cedarpy", SimpleNamespace(PolicySet=SimpleNamespace(from_str=refuse)))
    assert _parse_error("anything") == "syntax error"


def test_parse_errors_are_located_on_the_line_that_fails() -> None:
    # the error on a later line of a multi-line policy: that line, and where the policy starts
    three = "permit(\n  principal,\n  action oops,\n  resource\n);"
    assert _locate_parse_error(PERMIT + "\n" + three, "whole") == (
        4, "unexpected token `oops` (in the policy starting at line 2)")
    # a line ending in a comment: the prefixes are joined with their newlines
    commented = "permit(principal, action, resource) // c\nwhen { # }\n;"
    assert _locate_parse_error(commented, "whole") == (2, "invalid token (in the policy starting at line 1)")
    # the error on the first line of a multi-line policy: that line, no "starting at"
    first = "permit(principal #,\n action, resource);"
    assert _locate_parse_error(first, "whole") == (1, "invalid token")
    # no single statement fails: no line, the message as given
    assert _locate_parse_error(PERMIT + "\n" + PERMIT, "whole") == (None, "whole")


def test_a_multi_line_syntax_error_names_its_line_and_the_policy_start(tmp_path: Path) -> None:
    path = tmp_path / "p.cedar"
    path.write_text(PERMIT + "\n\npermit(\n  principal,\n  action oops,\n  resource\n);\n", encoding="utf-8")
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_files([path])
    assert (caught.value.path, caught.value.line) == (str(path), 5)
    assert str(caught.value) == f"{path}:5: syntax error: unexpected token `oops` (in the policy starting at line 3)"


def test_files_are_joined_on_newlines_and_ids_on_one_line_count_up(tmp_path: Path) -> None:
    first = tmp_path / "a.cedar"
    first.write_text(f"{PERMIT} // no newline at the end", encoding="utf-8")
    second = tmp_path / "b.cedar"
    second.write_text(f"{PERMIT} {PERMIT} {PERMIT}", encoding="utf-8")
    loaded = load_policy_files([first, second])
    assert loaded.text == f"{PERMIT} // no newline at the end\n{PERMIT} {PERMIT} {PERMIT}"
    assert [i.id for i in loaded.infos] == ["a.cedar:1", "b.cedar:1", "b.cedar:1#2", "b.cedar:1#3"]


def test_policies_whose_lines_are_unknown_are_numbered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # if the splitter and Cedar ever disagree on the number of policies, no line is guessed
    path = tmp_path / "p.cedar"
    path.write_text(f"{PERMIT}\n{PERMIT}\n@id(\"n\") {PERMIT}\n", encoding="utf-8")
    monkeypatch.setattr(text_module, "_split_statements", lambda text: [])
    loaded = load_policy_files([path])
    assert [(i.id, i.line) for i in loaded.infos] == [("p.cedar#1", 0), ("p.cedar#2", 0), ("n", 0)]


def info(n: int) -> PolicyInfo:
    return PolicyInfo(f"id{n}", "permit", "f.cedar", "/p/f.cedar", 10 + n, {})


def fake_validation(monkeypatch: pytest.MonkeyPatch, errors: list[tuple[str | None, str]]) -> None:
    result = SimpleNamespace(validation_passed=False,
                             errors=[SimpleNamespace(policy_id=pid, error=error) for pid, error in errors])
    monkeypatch.setattr(cedarpy, "validate_policies", lambda text, schema: result)


def refusal(infos: list[PolicyInfo]) -> PolicyLoadError:
    with pytest.raises(PolicyLoadError) as caught:
        validate_against_schema("text", cast(cedarpy.Schema, None), infos)
    return caught.value


def test_validation_problems_are_ordered_by_policy_and_the_rest_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    infos = [info(n) for n in range(8)]
    errors: list[tuple[str | None, str]] = [(f"policy{n}", f"for policy `policy{n}`, e{n}") for n in (3, 1, 0)]
    errors += [(None, "general"), ("policy7", "e7"), ("policy5", "e5"), ("policy6", "e6")]
    fake_validation(monkeypatch, errors)
    error = refusal(infos)
    assert (error.path, error.line) == ("/p/f.cedar", 10)
    assert str(error) == (
        "/p/f.cedar:10: does not validate against the schema: policy id0: e0 (and 6 more: "
        "/p/f.cedar:11: e1; /p/f.cedar:13: e3; /p/f.cedar:15: e5; /p/f.cedar:16: e6; /p/f.cedar:17: e7)")


def test_validation_problems_without_a_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_validation(monkeypatch, [("policy1", "e1"), (None, "general"), ("policy2", "unknown")])
    error = refusal([info(0), info(1)])
    assert str(error) == ("/p/f.cedar:11: does not validate against the schema: policy id1: e1 "
                          "(and 2 more: general; unknown)")
    fake_validation(monkeypatch, [(None, "general"), ("other", "second")])
    error = refusal([info(0)])
    assert (error.path, error.line) == ("", None)
    assert str(error) == "does not validate against the schema: general (and 1 more: second)"
    line_less = PolicyInfo("x", "permit", "f.cedar", "/p/f.cedar", 0, {})
    fake_validation(monkeypatch, [("policy0", "only")])
    error = refusal([line_less])
    assert (error.path, error.line, str(error)) == ("/p/f.cedar", None,
                                                   "/p/f.cedar: does not validate against the schema: policy x: only")
