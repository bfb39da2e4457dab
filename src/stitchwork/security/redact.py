"""Replace secret values in text and JSON-like data with ``[secret:<name>]``.

Besides the value itself, a :class:`Redactor` recognises the encodings a tool could use to slip a value past
redaction (all of the value's UTF-8 bytes):

* base64, standard and URL-safe alphabets, with and without ``=`` padding;
* the value embedded in a longer base64 stream at each of the 3 byte alignments (the characters that depend
  only on the value; the 1-2 boundary characters shared with neighbouring data are left in place). Only used
  when that run is at least 8 characters, so short values do not match random base64 data;
* hex, lower and upper case;
* URL percent-encoding as produced by common encoders (``quote``/``quote_plus``, with or without ``/`` kept,
  every byte encoded, upper- or lower-case hex digits);
* the JSON string escaping of the value (``\\"``, ``\\\\``, ``\\uXXXX``);
* the reversed value, and the value with surrounding whitespace stripped.

Values shorter than :data:`MIN_SECRET_LEN` (4) characters are **not** redacted: replacing every ``"1"`` or
``"ab"`` would destroy ordinary text. Anything derived by other means (mixed-case hex, wrapped base64, double
encoding, compression, splitting) is not recognised: redaction is defence in depth, not a guarantee.

Matching is leftmost-longest over all forms of all values (one compiled trie-shaped regular expression), and
overlapping matches are merged, so a value that contains or overlaps another is redacted completely.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["MIN_SECRET_LEN", "Redactor", "encoded_forms"]

MIN_SECRET_LEN = 4
"""Values (and encoded forms) shorter than this are not redacted."""

CONVERSATIONS_KEPT = 256
"""How many conversations :meth:`Redactor.redact_messages` remembers (least recently used dropped)."""

_MIN_CORE_LEN = 8
"""Shortest base64 alignment run used; shorter runs would match random base64 data too often."""

_Trie = dict[str, Any]
_END = ""  # marks the end of a word in a trie node (no real edge has an empty label)


def _lower_percent(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def _base64_cores(data: bytes) -> Iterator[str]:
    """Base64 characters that depend only on ``data`` when it starts at byte offset 0, 1 or 2 mod 3."""
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode("ascii")
        first = -(-8 * offset // 6)  # characters before this one carry bits of the preceding bytes
        last = 8 * (offset + len(data)) // 6  # characters from here on carry bits of the following bytes
        core = encoded[first:last]
        if len(core) >= _MIN_CORE_LEN:
            yield core
            yield core.replace("+", "-").replace("/", "_")


def encoded_forms(value: str) -> set[str]:
    """Every string :class:`Redactor` treats as a leak of ``value``; empty if ``value`` is too short."""
    if len(value) < MIN_SECRET_LEN:
        return set()
    data = value.encode("utf-8", "surrogatepass")
    forms = {value, value.strip(), value[::-1]}
    standard = base64.b64encode(data).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(data).decode("ascii")
    forms.update({standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("=")})
    forms.update(_base64_cores(data))
    forms.update({data.hex(), data.hex().upper()})
    every_byte = "".join(f"%{byte:02X}" for byte in data)
    for percent in (
        quote(data, safe=""),
        quote(data, safe="/"),
        quote_plus(data, safe=""),
        quote_plus(data, safe="/"),
        every_byte,
    ):
        forms.update({percent, _lower_percent(percent)})
    forms.add(json.dumps(value)[1:-1])
    forms.add(json.dumps(value, ensure_ascii=False)[1:-1])
    return {form for form in forms if len(form) >= MIN_SECRET_LEN}


def _trie_regex(words: list[str]) -> str:
    """A regex matching exactly ``words``, preferring the longest word at a position (shared prefixes)."""
    root: _Trie = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[_END] = {}
    return _emit(root)


def _emit(node: _Trie) -> str:
    alternatives = []
    for char in sorted(key for key in node if key != _END):
        chain = [char]
        child: _Trie = node[char]
        while len(child) == 1 and _END not in child:  # compress runs without branches into one literal
            (next_char,) = child
            chain.append(next_char)
            child = child[next_char]
        alternatives.append(re.escape("".join(chain)) + _emit(child))
    if not alternatives:
        return ""
    body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
    if _END in node:  # a word may end here: the rest is optional, tried first (greedy) so longest wins
        return "(?:" + body + ")?"
    return body


class Redactor:
    """Replaces secret values, and common encodings of them, with ``[secret:<name>]``.

    Args:
        secrets: Secret name → value. Values shorter than 4 characters are ignored (see module docstring).
            If two names share a value (or an encoding), the name of the longer value, then the
            alphabetically first name, is shown.
    """

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._owner: dict[str, str] = {}
        ordered = sorted(secrets.items(), key=lambda item: (-len(item[1]), item[0]))
        for name, value in ordered:
            for form in sorted(encoded_forms(value), key=lambda f: (-len(f), f)):
                self._owner.setdefault(form, name)
        self._count = len(set(self._owner.values()))
        words = sorted(self._owner, key=lambda f: (-len(f), f))
        self._pattern: re.Pattern[str] | None = re.compile(_trie_regex(words)) if words else None
        self._conversations: OrderedDict[str, list[tuple[dict[str, Any], Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def redact_messages(self, key: str, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        """``redact([dict(m) for m in messages])``, without redacting again what ``key``'s previous call held.

        A conversation is sent again at every model call with a few messages added, so redacting all of it each
        time makes a run O(steps²). A message equal (``==``) to a copy of the one at the same position in the
        previous call with the same ``key`` (a run id) gets that call's redacted copy back; any other message is
        redacted. The kept copies are shallow: a nested value changed in place after a call is not noticed (the
        run loop never does that); the redacted copies handed out are shared between calls and must not be
        changed. The redactor of changed secrets is a new object, with nothing remembered.
        """
        if not key:
            return [self.redact(dict(m)) for m in messages]
        with self._lock:
            previous = self._conversations.pop(key, [])
        kept: list[tuple[dict[str, Any], Any]] = []
        for index, message in enumerate(messages):
            copy = dict(message)
            if index < len(previous) and previous[index][0] == copy:
                kept.append((copy, previous[index][1]))
            else:
                kept.append((copy, self.redact(copy)))
        with self._lock:
            self._conversations[key] = kept
            while len(self._conversations) > CONVERSATIONS_KEPT:
                self._conversations.popitem(last=False)
        return [safe for _, safe in kept]

    def _spans(self, text: str) -> Iterator[tuple[int, int, str]]:
        """Yields ``(start, end, name)`` of each maximal region covered by overlapping matches."""
        pattern = self._pattern
        if pattern is None:
            return
        match = pattern.search(text)
        while match is not None:
            start, end = match.span()
            longest = match.group()
            following = pattern.search(text, start + 1)
            while following is not None and following.start() < end:
                end = max(end, following.end())
                if len(following.group()) > len(longest):
                    longest = following.group()
                following = pattern.search(text, following.start() + 1)
            yield start, end, self._owner[longest]
            match = following  # the leftmost match starting at or after ``end``

    def redact_text(self, text: str) -> str:
        """Returns ``text`` with every occurrence of a secret (or an encoding of it) replaced.

        Overlapping occurrences are merged into one ``[secret:<name>]`` naming the longest match.
        """
        if self._pattern is None or self._pattern.search(text) is None:
            return text  # the common case, without the generator below
        parts: list[str] = []
        position = 0
        for start, end, name in self._spans(text):
            parts.append(text[position:start])
            parts.append(f"[secret:{name}]")
            position = end
        if not parts:
            return text
        parts.append(text[position:])
        return "".join(parts)

    def redact(self, obj: Any) -> Any:
        """Returns a redacted copy of ``obj``.

        Strings (and ``bytes``, as UTF-8) are redacted; dicts (keys and values), lists, tuples (named tuples
        keep their type), sets and frozensets are copied recursively; any other object is returned as is.
        Redacting dict keys can make two keys equal; the later one wins.
        """
        kind = type(obj)  # exact built-in types first: the ABC checks below cost more than the copy
        if kind is str:
            return self.redact_text(obj)
        if kind is dict:
            return {self.redact(key): self.redact(value) for key, value in obj.items()}
        if kind is list:
            return [self.redact(item) for item in obj]
        if obj is None or kind is int or kind is float or kind is bool:
            return obj
        if isinstance(obj, str):
            return self.redact_text(obj)
        if isinstance(obj, bytes | bytearray):
            text = bytes(obj).decode("utf-8", "surrogateescape")
            return type(obj)(self.redact_text(text).encode("utf-8", "surrogateescape"))
        if isinstance(obj, Mapping):
            return {self.redact(key): self.redact(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [self.redact(item) for item in obj]
        if isinstance(obj, tuple):
            items = [self.redact(item) for item in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if isinstance(obj, set | frozenset):
            return type(obj)(self.redact(item) for item in obj)
        return obj

    def contains_secret(self, text: str) -> str | None:
        """Returns the name of the first secret found in ``text`` (in any recognised form), else ``None``."""
        for _start, _end, name in self._spans(text):
            return name
        return None
