"""The canonical form of audit data: what each kind of value and key becomes (pins audit/canonical.py)."""

from __future__ import annotations

import enum
from typing import Any

import pytest

from stitchwork.audit.canonical import GENESIS_HASH, _clean_key, _clean_str, _is_hash, _sanitise, canonical
from stitchwork.errors import AuditError


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Flag(int):
    """An int subclass (like IntEnum) that is not an enum."""


class Ratio(float):
    pass


def test_the_genesis_hash_is_64_zeros_and_what_counts_as_a_hash() -> None:
    assert GENESIS_HASH == "0" * 64 and _is_hash(GENESIS_HASH) and _is_hash("ab12" * 16)
    assert not _is_hash("0" * 63) and not _is_hash("0" * 65) and not _is_hash("AB12" * 16)
    assert not _is_hash("g" * 64) and not _is_hash(0) and not _is_hash(b"0" * 64)


@pytest.mark.parametrize(("value", "expected"), [
    (Colour.RED, "red"), (Level.HIGH, 3), (Flag(5), 5), (Ratio(0.5), 0.5), (True, True), (None, None),
    ("é", "é"), ("a\ud800b", "a\\ud800b"), (b"x", "b'x'"), ((1, "a"), [1, "a"]), ({3, 1, 2}, [1, 2, 3]),
])
def test_each_kind_of_value_becomes_its_plain_json_form(value: Any, expected: Any) -> None:
    clean = _sanitise(value)
    assert clean == expected and type(clean) is type(expected)


def test_bool_subclass_values_stay_bools_and_floats_are_checked_after_conversion() -> None:
    assert _sanitise({"a": [True, Level.HIGH]}) == {"a": [True, 3]}
    with pytest.raises(AuditError, match=r"data\['x'\] is nan"):
        _sanitise({"x": Ratio("nan")})


@pytest.mark.parametrize(("key", "expected"), [
    ("k", "k"), ("é", "é"), (True, "true"), (False, "false"), (None, "null"), (7, "7"), (Level.HIGH, "3"),
    (2.5, "2.5"), (Colour.RED, "red"),
])
def test_each_kind_of_key_becomes_a_string(key: Any, expected: str) -> None:
    assert _clean_key(key, ()) == expected
    assert list(_sanitise({key: 1})) == [expected]


@pytest.mark.parametrize("key", [float("nan"), float("inf"), (1, 2), b"k"])
def test_keys_with_no_json_form_are_refused_naming_where(key: Any) -> None:
    with pytest.raises(AuditError, match=r"audit data\['outer'\] has a key of type"):
        _sanitise({"outer": {key: 1}})


def test_strings_are_kept_unless_they_cannot_be_utf8() -> None:
    assert _clean_str("plain") == "plain" and _clean_str("naïve ✓") == "naïve ✓"
    assert _clean_str("bad \udcff end") == "bad \\udcff end"
    assert canonical(_sanitise({"b": "é", "a": [1, 2.5, None]})) == '{"a":[1,2.5,null],"b":"é"}'.encode()
