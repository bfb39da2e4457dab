"""The canonical form of audit data: what each kind of value and key becomes (pins audit/canonical.py)."""

from __future__ import annotations

import enum
from typing import Any

import pytest

from stitchwork.audit.canonical import (
    GENESIS_HASH,
    _clean_key,
    _clean_str,
    _fast_canonical,
    _is_hash,
    _is_plain,
    _sanitise,
    canonical,
)
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


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_refusals_name_where_and_why() -> None:
    with pytest.raises(AuditError) as caught:
        _sanitise({"a": [1, float("inf")]})
    assert str(caught.value) == "audit data['a'][1] is inf: NaN and infinities are not valid JSON"
    with pytest.raises(AuditError) as caught:
        _sanitise({"a": {(1, 2): 1}})
    assert str(caught.value) == "audit data['a'] has a key of type tuple ((1, 2)); keys must be strings"
    with pytest.raises(AuditError) as caught:
        _sanitise({"s": {float("nan")}})
    assert str(caught.value) == "audit data['s']{…} is nan: NaN and infinities are not valid JSON"
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(AuditError) as caught:
        _sanitise({"l": loop})
    assert str(caught.value) == "audit data['l'][0] contains itself (a reference cycle)"
    assert _sanitise(_nested(63)) == _nested(63)
    with pytest.raises(AuditError) as caught:
        _sanitise(_nested(65))
    assert str(caught.value) == "audit data" + "[0]" * 64 + " is nested more than 64 levels deep"


@pytest.mark.parametrize("data", [
    {"a": 1, "b": [1.5, "x", None, True, (1, 2)], "c": {"d": "é"}},
    {"small": 0.00001}, {"tiny": 1e-7}, {"k": "1e-5 as text"}, {1: "int key"}, {"n": float("nan")},
    {"e": Colour.RED}, {"i": Level.HIGH}, {"s": {1, 2}}, {"deep": _nested(40)}, {"deep": _nested(70)},
    {"big": 2**70}, {"sur": "a\ud800"},
])
def test_the_fast_path_gives_exactly_the_slow_paths_bytes_or_steps_aside(data: dict[Any, Any]) -> None:
    fast = _fast_canonical(data)
    try:
        slow = canonical(_sanitise(data)).decode()
    except AuditError:
        assert fast is None
        return
    assert fast is None or fast == slow


def test_which_data_the_fast_path_takes() -> None:
    assert _fast_canonical({"a": [1, 2.5, "x", None, True], "b": {"c": (1,)}}) == (
        '{"a":[1,2.5,"x",null,true],"b":{"c":[1]}}')
    for data in ({"small": 0.00001}, {1: "x"}, {"e": Colour.RED}, {"n": float("nan")}, {"d": _nested(64)}):
        assert _fast_canonical(data) is None, data
    assert _fast_canonical({"d": _nested(63)}) is not None  # 64 brackets in all: at the limit
    assert _fast_canonical({"t": "see e-mail"}) == '{"t":"see e-mail"}'  # "e-" after no digit: still fast
    assert _fast_canonical({"t": "2e-5 in a string"}) is None  # a look-alike in a string merely takes the slow path
    assert _is_plain({"a": [1, {"b": 2.0}]}) and not _is_plain({"a": [{1: 2}]})
    assert not _is_plain({"a": [float("inf")]}) and not _is_plain({"a": Flag(1)})


def test_more_refusals_name_where_and_why() -> None:
    with pytest.raises(AuditError) as caught:
        _sanitise({"a": {1: "x", "1": "y"}})
    assert str(caught.value) == "audit data['a'] has two keys that both become '1' in JSON"
    with pytest.raises(AuditError) as caught:
        _sanitise({"a": [object]})
    assert str(caught.value) == ("audit data['a'][0] is a type, which has no JSON form; "
                                 "convert it to str, int, float, bool, None, list or dict first")
    with pytest.raises(AuditError) as caught:
        canonical({"n": float("nan")})
    assert str(caught.value).startswith("cannot encode audit value as canonical JSON: ")


def test_only_plain_data_is_plain() -> None:
    assert _is_plain({}) and _is_plain({"a": ("x", [None, True, 1, 2.0])})
    for data in ({"a": [b"x"]}, {"a": {"b": {1, 2}}}, {"a": [Colour.RED]}, {"a": [float("nan")]}, {"a": [{2: 1}]}):
        assert not _is_plain(data), data
