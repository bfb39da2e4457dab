"""Provenance labels and taint of tool-call arguments.

Every piece of content that enters a run (the user's task, tool results, channel messages) is recorded with a
:class:`Label`: where it came from and whether it is trusted. When the model proposes a tool call, each argument
value is checked against the run's untrusted content: a value that appears in untrusted text and is not grounded
in trusted text carries the labels of the untrusted content it came from.

Matching, and its limits (stated plainly):

- Normal form, for content and values alike: Unicode NFKC; a small table of Cyrillic and Greek letters that look
  like Latin ones folded to Latin (``раypal`` with Cyrillic ``р`` and ``а`` matches ``paypal``); zero-width,
  bidi-control, soft-hyphen, variation-selector and tag characters removed; case-folded; whitespace collapsed.
  The confusables table is not Unicode's full ``confusables.txt``: rarer look-alikes are not folded.
- URL and e-mail forms: a value's ``mailto:``, ``http(s)://`` and ``www.`` prefixes and trailing ``/`` are
  stripped; percent-encoded values and content are also matched decoded.
- Encodings: a value that looks like base64 (standard or URL-safe) or hex and decodes to text is matched by
  its decoded text too, so ``aHR0cHM6Ly9ldmlsLmV4YW1wbGU=`` carries the taint of ``https://evil.example``.
  Other encodings (ROT13, a model's paraphrase, translation, arithmetic on numbers) are not recognised: that is
  the limit of value matching, and the reason the policy pack also asks a human before irreversible calls.
- Substrings: a value is derived from content when its normal form is a substring of the content's normal form,
  or, with all whitespace removed (re-spaced IBANs, card and phone numbers), for values of ``MIN_COMPACT``
  characters or more. Long values are also searched for the *entities* they contain (URLs, e-mail addresses,
  and runs of six or more digits, e.g. account numbers): a mail body the model wrote around a link from a web
  page carries the page's taint.
- Short values (under ``MIN_MATCH`` characters: ``10``, ``yes``, an id such as ``13``) are too common to
  attribute and are never tainted, except e-mail addresses and URLs. Numbers are matched as their decimal text
  (``98.7`` does not match ``98.70``).
- Unattributed destinations: once a run has read untrusted content, a URL or e-mail address that appears
  *nowhere* in the run's content (neither trusted nor untrusted) is tainted too, with the source
  ``unattributed``: a model does not legitimately invent addresses, and a hijacked one may have read them from
  content the gateway never saw (a refused call, an earlier run).
- Speed: content is normalised once, when it enters the run, into one corpus per run (plus a whitespace-free
  copy) that grows incrementally; each value form is then one C-level substring search over the corpus
  (``str.find``), with the owner of a hit found by bisection over part offsets. There is no per-content Python
  loop at check time. This is a linear scan in C, not an n-gram index: ``bench/taint.py`` measured 2.7 ms
  per value (all its forms, whitespace-free copy included) over 4 MB of content on a loaded 2-core machine,
  1.4 times faster than a per-item Python scan; a run holding hundreds of MB would want a suffix automaton.
- Bad input: binary output is matched as its UTF-8 decoding with replacement characters; nested JSON arguments
  are walked iteratively to ``MAX_DEPTH`` (deeper parts count as tainted when the run holds untrusted content);
  a run whose untrusted content exceeds ``MAX_CORPUS_CHARS`` stops indexing and fails closed: every argument of
  at least ``MIN_MATCH`` characters is then tainted with the source ``overflow``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

MIN_MATCH = 4
MIN_COMPACT = 8
MAX_DEPTH = 32
MAX_CORPUS_CHARS = 64_000_000
"""Untrusted characters one run may hold before the tracker fails closed (``overflow``)."""
MAX_RECORD_CHARS = 100
MAX_RECORD_WORDS = 8
MAX_HITS = 64
"""Occurrences of one value examined to collect its sources."""
_SEP = "\x00"
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f]"
)
_SPACE = re.compile(r"\s+")
_URL_PREFIX = re.compile(r"^(?:mailto:|https?://|www\.)+")
_ENTITY = re.compile(
    r"(?:https?://|www\.)[^\s<>\"']+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}/[^\s<>\"']*"
    r"|\d[\d -]{4,}\d"
)
_ADDRESS = re.compile(
    r"^(?:(?:https?://|www\.|mailto:)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}/\S*)$"
)
"""What counts as an address for the unattributed rule: a URL with a scheme, ``www.`` or a path, or an e-mail."""
_B64 = re.compile(r"^[A-Za-z0-9+/_-]{8,}={0,2}$")
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2}){8,}$")
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Т": "t",
    "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x", "υ": "u", "ε": "e",
    "Α": "a", "Β": "b", "Ε": "e", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p",
    "Τ": "t", "Υ": "y", "Χ": "x", "Ζ": "z",
    # Latin look-alikes NFKC keeps
    "ı": "i", "ȷ": "j", "ℓ": "l",
})


@dataclass(frozen=True)
class Label:
    """Where a piece of content came from."""

    source: str
    """``user``, ``operator``, ``tool:<name>``, ``channel:<name>``, ``agent:<spiffe id>``, ``url:<host>``."""
    trusted: bool

    def __str__(self) -> str:
        return f"{self.source} ({'trusted' if self.trusted else 'untrusted'})"


def normalise(text: str) -> str:
    """Canonical form for matching: NFKC, confusables folded, invisible characters removed, case-folded,
    whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text).translate(_CONFUSABLES).casefold()
    return _SPACE.sub(" ", text).strip()


def _decoded(value: str) -> list[str]:
    """Texts a value may be an encoding of (percent, base64, hex), normalised; empty if none."""
    out: list[str] = []
    if "%" in value:
        out.append(unquote(value))
    compact = value.strip()
    raw: bytes | None = None
    if _HEX.match(compact):
        raw = bytes.fromhex(compact)
    elif _B64.match(compact) and not compact.isalpha() and not compact.isdigit():
        padded = compact + "=" * (-len(compact) % 4)
        try:
            raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if text and sum(ch.isprintable() or ch.isspace() for ch in text) >= 0.9 * len(text):
            out.append(text)
    return [n for n in (normalise(t) for t in out) if n]


def _strip(form: str) -> str:
    stripped = _URL_PREFIX.sub("", form).rstrip("/")
    return stripped or form


def _value_forms(value: str) -> list[str]:
    """The forms of one argument value to look for: itself, stripped of URL prefixes, and decoded."""
    form = normalise(value)
    forms = [_strip(form)]
    forms += [_strip(d) for d in _decoded(value)]
    return list(dict.fromkeys(f for f in forms if f))


def _addressy(form: str) -> bool:
    return "@" in form or "." in form


def _leaves(value: Any) -> Iterable[tuple[str, str | None]]:
    """(top-level argument, leaf text) pairs, iteratively; a leaf deeper than MAX_DEPTH is yielded as None."""
    stack: list[tuple[str, Any, int]] = []
    if isinstance(value, Mapping):
        stack.extend((str(k), v, 1) for k, v in value.items())
    while stack:
        top, item, depth = stack.pop()
        if isinstance(item, bool) or item is None:
            continue
        if depth > MAX_DEPTH:
            yield top, None
        elif isinstance(item, str | int | float):
            yield top, str(item)
        elif isinstance(item, bytes | bytearray):
            yield top, bytes(item).decode("utf-8", "replace")
        elif isinstance(item, Mapping):
            stack.extend((top, v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((top, v, depth + 1) for v in item)


def _split_structured(text: str) -> tuple[list[str] | None, list[str]]:
    """Record and prose leaves of JSON content (normalised), or (None, []) when ``text`` is not JSON.

    A string leaf is a *record* when it is short (``MAX_RECORD_CHARS`` characters, ``MAX_RECORD_WORDS`` words,
    one line): an identifier, a name, an address, a date, a number. Longer strings are *prose*. Keys are schema,
    not content, and are not indexed.
    """
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")) or len(text) > MAX_CORPUS_CHARS:
        return None, []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None, []
    records: list[str] = []
    prose: list[str] = []
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str):
            norm = normalise(item)
            if not norm:
                continue
            short = len(norm) <= MAX_RECORD_CHARS and norm.count(" ") < MAX_RECORD_WORDS and "\n" not in item
            (records if short and depth <= MAX_DEPTH else prose).append(norm)
        elif item is not None and not isinstance(item, bool):
            records.append(str(item))
    return records, prose


@dataclass(frozen=True)
class ArgumentTaint:
    """Taint of one call's arguments."""

    args: frozenset[str] = frozenset()
    """Top-level argument names whose value (or a part of it) came from untrusted content."""
    sources: frozenset[str] = frozenset()
    levels: tuple[tuple[str, str], ...] = ()
    """(argument, level) for tainted arguments: ``prose``, ``unattributed`` or ``record`` (see the module)."""
    by_arg: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(argument, its untrusted sources) for tainted arguments: where each argument's value came from."""

    @property
    def any(self) -> bool:
        return bool(self.args)

    def level(self, arg: str) -> str:
        """How ``arg`` was found in untrusted content; ``""`` when it is not tainted."""
        if arg not in self.args:
            return ""
        return dict(self.levels).get(arg, "prose")

    def provenance(self) -> dict[str, dict[str, Any]]:
        """Per tainted argument, its untrusted sources and level (for the audit log and the dashboard); an
        argument not listed was not found in untrusted content."""
        sources = dict(self.by_arg)
        return {arg: {"sources": list(sources.get(arg, ())), "level": self.level(arg)} for arg in sorted(self.args)}

    def context(self, target_arg: str) -> dict[str, Any]:
        """The ``taint`` record for Cedar's context."""
        target = bool(target_arg) and target_arg in self.args
        return {
            "any": self.any,
            "target": target,
            "target_level": self.level(target_arg) if target else "",
            "args": sorted(self.args),
            "sources": sorted(self.sources),
        }


class _Corpus:
    """Normalised texts joined into one searchable string (and a whitespace-free copy), with the owner of every
    offset; extended incrementally, so a check after an add copies only the new text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.owners: list[int] = []
        self.starts: list[int] = []
        self.size = 0
        self._joined = ""
        self._compact = ""
        self._compact_starts: list[int] = []
        self._built = 0

    def add(self, text: str, owner: int) -> None:
        self.parts.append(text)
        self.owners.append(owner)
        self.starts.append(self.size)
        self.size += len(text) + 1

    def _build(self) -> None:
        if self._built == len(self.parts):
            return
        new = self.parts[self._built:]
        self._joined += _SEP.join(new) + _SEP
        compacts = [p.replace(" ", "") for p in new]
        offset = len(self._compact)
        for c in compacts:
            self._compact_starts.append(offset)
            offset += len(c) + 1
        self._compact += _SEP.join(compacts) + _SEP
        self._built = len(self.parts)

    def _hits(self, haystack: str, starts: list[int], needle: str) -> set[int]:
        found: set[int] = set()
        pos = haystack.find(needle)
        while pos >= 0 and len(found) < MAX_HITS:
            part = bisect.bisect_right(starts, pos) - 1
            found.add(self.owners[part])
            # skip the rest of this part: one hit per part is enough
            pos = haystack.find(needle, starts[part + 1] if part + 1 < len(starts) else len(haystack))
        return found

    def find(self, form: str) -> set[int]:
        """Owners of the texts containing ``form`` (or, for long forms, its whitespace-free version)."""
        if not self.parts:
            return set()
        self._build()
        found = self._hits(self._joined, self.starts, form)
        compact = form.replace(" ", "")
        if len(compact) >= MIN_COMPACT:
            found |= self._hits(self._compact, self._compact_starts, compact)
        return found

    def contains(self, form: str) -> bool:
        if not self.parts:
            return False
        self._build()
        return form in self._joined


@dataclass
class ProvenanceTracker:
    """The content of one run with its labels, and the taint check for tool arguments."""

    trusted_sources: frozenset[str] = frozenset()
    _labels: list[Label] = field(default_factory=list)
    _untrusted: list[tuple[Label, str]] = field(default_factory=list)
    _trusted_text: list[str] = field(default_factory=list)
    _corpus: _Corpus = field(default_factory=lambda: _Corpus())
    _records: _Corpus = field(default_factory=lambda: _Corpus())
    _trusted: _Corpus = field(default_factory=lambda: _Corpus())
    _overflow: bool = False

    def add(self, text: str | bytes, label: Label) -> Label:
        """Records content; a source the operator marked trusted is stored as trusted."""
        if not label.trusted and label.source in self.trusted_sources:
            label = Label(label.source, True)
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8", "replace")
        norm = normalise(text)
        if not norm:
            return label
        forms = [norm]
        if "%" in norm:
            decoded = normalise(unquote(norm))
            if decoded != norm:
                forms.append(decoded)
        if label.trusted:
            self._trusted_text.append(norm)
            for form in forms:
                self._trusted.add(form, -1)
            return label
        self._untrusted.append((label, norm))
        if self._overflow or self._corpus.size + self._records.size + len(norm) > MAX_CORPUS_CHARS:
            self._overflow = True
            return label
        owner = self._owner(label)
        records, prose = _split_structured(text)
        if records is None:
            for form in forms:
                self._corpus.add(form, owner)
            return label
        for leaf in records:
            self._records.add(leaf, owner)
        for leaf in prose:
            self._corpus.add(leaf, owner)
            if "%" in leaf:
                self._corpus.add(normalise(unquote(leaf)), owner)
        return label

    def _owner(self, label: Label) -> int:
        if label not in self._labels:
            self._labels.append(label)
        return self._labels.index(label)

    def _grounded(self, form: str) -> bool:
        return self._trusted.contains(form)

    def _find(self, form: str) -> tuple[set[str], str]:
        prose = {self._labels[o].source for o in self._corpus.find(form)}
        records = {self._labels[o].source for o in self._records.find(form)}
        return prose | records, "prose" if prose else "record" if records else ""

    def _sources_of(self, raw: str) -> tuple[set[str], str]:
        """The untrusted sources ``raw`` derives from (``unattributed`` for an invented address), and the
        strongest level found: ``prose`` > ``unattributed`` > ``record``."""
        forms = _value_forms(raw)
        if not forms:
            return set(), ""
        whole = forms[0]
        if len(whole) < MIN_MATCH and not _addressy(whole):
            return set(), ""
        if self._overflow:
            return (set(), "") if any(self._grounded(f) for f in forms) else ({"overflow"}, "prose")
        sources: set[str] = set()
        levels: set[str] = set()
        for form in forms:
            if self._grounded(form):
                continue
            hits, level = self._find(form)
            sources |= hits
            levels.add(level)
        entities = [e for e in _ENTITY.findall(whole) if e != whole] if len(whole) > 12 else []
        for entity in entities:
            form = _strip(entity.strip(".,;:!?)]}"))
            if len(form) < MIN_MATCH or self._grounded(form):
                continue
            hits, level = self._find(form)
            if not hits and _ADDRESS.match(normalise(entity)):
                hits, level = {"unattributed"}, "unattributed"
            sources |= hits
            levels.add(level)
        if not sources and _ADDRESS.match(normalise(raw)) and not any(map(self._grounded, forms)):
            sources.add("unattributed")
            levels.add("unattributed")
        level = next((lv for lv in ("prose", "unattributed", "record") if lv in levels), "")
        return sources, level if sources else ""

    def check(self, arguments: Mapping[str, Any]) -> ArgumentTaint:
        """Which arguments carry values derived from untrusted content."""
        if not self._untrusted:
            return ArgumentTaint()
        tainted: set[str] = set()
        sources: set[str] = set()
        per_arg: dict[str, set[str]] = {}
        levels: dict[str, str] = {}
        rank = {"prose": 3, "unattributed": 2, "record": 1}
        for top, raw in _leaves(arguments):
            hits, level = ({"too-deep"}, "prose") if raw is None else self._sources_of(raw)
            if hits:
                tainted.add(top)
                sources |= hits
                per_arg.setdefault(top, set()).update(hits)
                if rank.get(level, 0) > rank.get(levels.get(top, ""), 0):
                    levels[top] = level
        by_arg = tuple((arg, tuple(sorted(found))) for arg, found in sorted(per_arg.items()))
        return ArgumentTaint(frozenset(tainted), frozenset(sources), tuple(sorted(levels.items())), by_arg)

    def untrusted_labels(self) -> tuple[Label, ...]:
        """The distinct labels of the untrusted content recorded so far, in first-seen order."""
        return tuple(dict.fromkeys(label for label, _ in self._untrusted))

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state, for run checkpoints."""
        return {
            "untrusted": [[label.source, text] for label, text in self._untrusted],
            "trusted": list(self._trusted_text),
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], *, trusted_sources: frozenset[str] = frozenset()) -> ProvenanceTracker:
        tracker = cls(trusted_sources=trusted_sources)
        for text in data.get("trusted", ()):
            tracker.add(str(text), Label("restored", True))
        for source, text in data.get("untrusted", ()):
            tracker.add(str(text), Label(str(source), False))
        return tracker
