"""Provenance and secrecy labels, and the taint of tool-call arguments.

Every piece of content that enters a run (the user's task, tool results, channel messages, memory) is recorded
with a :class:`Label`: where it came from, whether it is trusted (integrity), and whether it is confidential
(secrecy). When the model proposes a tool call, each argument value is checked (:meth:`ProvenanceTracker.check`):

- **Exact trust.** A value is user-named (never tainted) only when its whole tokens equal a contiguous run of whole
  tokens of trusted text, compared in a lossless canonical form (:func:`~stitchwork.security.matching.tokens`):
  a substring of a longer trusted token, or a value equal to trusted text only after folding, is not user-named.
- **Folded suspicion.** Otherwise the value is looked for, folded (look-alikes, case, width, invisible
  characters) and decoded, in the run's untrusted content. A value that equals a user-named value only after
  folding is a *look-alike*: tainted at the strongest level (``prose``) with the source ``lookalike`` and the note
  "look-alike of a user-named value", whether or not it appears in untrusted content.
- **Levels**, strongest first: ``prose`` (inside free text of untrusted content, or a look-alike),
  ``unattributed`` (an address, i.e. a URL or e-mail address, found in no content at all once the run has read
  untrusted content), ``record`` (only as a whole short field of a tool's structured output, e.g. a listed user;
  and always when the value is the structured *sender or author* of content the run read, such as a mail's
  ``sender``, even if the same value also occurs in prose: replying to whoever wrote is a decision a human can
  make).
- **Secrecy.** Content recorded under a confidential label has its values indexed (:class:`SecretIndex`); an
  argument carrying one of them (whole or a window of it, after case, spacing, reversal, ROT13 and the common
  encodings; values the user typed excepted) is *confidential*, whether the confidential content is trusted (a
  tool with ``trusted_output``, the agent's own confidential memory) or not: its values are never "typed by the user".

Matching limits (stated plainly): values under ``MIN_MATCH`` characters (``10``, ``yes``, an id such as ``13``)
are too common to attribute and never tainted, except addresses; the look-alike table is not Unicode's full
``confusables.txt``; a paraphrase, a translation, arithmetic on a number or an encoding not listed in
:mod:`~stitchwork.security.matching` is not recognised; confidential values under ``MIN_SECRET`` alphanumeric
characters (a first name, a short number) are not tracked. Content is normalised once, when it enters the run,
into one corpus per run searched with C-level ``str.find`` (``bench/taint.py``); a run whose untrusted content
exceeds ``MAX_CORPUS_CHARS`` fails closed: every argument of ``MIN_MATCH`` characters or more is then tainted with
the source ``overflow``. Nested arguments are walked to ``MAX_DEPTH`` (deeper parts count as tainted).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

from stitchwork.security.matching import (
    MIN_COMPACT,
    MIN_MATCH,
    SecretIndex,
    decodings,
    embedded,
    folded_tokens,
    normalise,
    skeleton,
    strip_address,
    tokens,
    transforms,
)

__all__ = [
    "CODE_ROLES", "LEVELS", "MIN_COMPACT", "MIN_MATCH", "OUTWARD_ROLES", "ArgumentTaint", "Finding", "Label",
    "ProvenanceTracker", "normalise", "strongest",
]

MAX_DEPTH = 32
MAX_CORPUS_CHARS = 64_000_000
"""Untrusted characters one run may hold before the tracker fails closed (``overflow``)."""
MAX_RECORD_CHARS = 100
MAX_RECORD_WORDS = 8
MAX_HITS = 64
"""Occurrences of one value examined to collect its sources."""
COPIED_WORDS = 4
"""Words from which a whole value copied from untrusted free text counts as ``copied`` (attacker-written text)."""
MAX_FINDINGS = 32
"""Findings kept per call (for the audit event and the approval's provenance)."""
LEVELS = ("prose", "unattributed", "record")
"""Taint levels, strongest first."""
OUTWARD_ROLES = frozenset({"recipient", "url", "account"})
"""Destination roles through which data leaves or a third party is engaged."""
CODE_ROLES = frozenset({"command", "code"})
"""Destination roles whose value is run as a command or a program."""
SENDER_FIELDS = frozenset({
    "sender", "from", "from_", "from_address", "author", "reply_to", "replyto", "created_by", "creator",
    "posted_by", "submitter", "reporter", "organizer", "organiser", "owner",
})
"""Keys of structured output that name who wrote the content (the "record" destinations a human may approve)."""
LOOKALIKE_NOTE = "look-alike of a user-named value"
_SEP = "\x00"
_ENTITY = re.compile(
    r"(?:https?://|www\.)[^\s<>\"']+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}/[^\s<>\"']*"
    r"|\d[\d -]{4,}\d"
)
_ENTITY_RAW = re.compile(_ENTITY.pattern, re.IGNORECASE)
"""Entities as written (case kept), to tell which are user-named."""
_ADDRESS = re.compile(
    r"^(?:(?:https?://|www\.|mailto:)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}/\S*)$"
)
"""What counts as an address for the unattributed rule: a URL with a scheme, ``www.`` or a path, or an e-mail."""
_PLACEHOLDER = re.compile(r"\[secret:[^\]]{0,128}\]")
_WHEN = re.compile(
    r"^(?:[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2})?)?|[0-9]{1,2}:[0-9]{2}(?::[0-9]{2})?)$"
)
"""A date or a time of day: it says when, not what, so a dictated call may hold one whoever computed it."""
_RANK = {"prose": 3, "unattributed": 2, "record": 1, "": 0}


def strongest(levels: Iterable[str]) -> str:
    """The strongest of taint levels (``""`` when none)."""
    return max(levels, key=lambda lv: _RANK.get(lv, 3), default="")


@dataclass(frozen=True)
class Label:
    """Where a piece of content came from, and whether it is confidential."""

    source: str
    """``user``, ``operator``, ``tool:<name>``, ``channel:<name>``, ``agent:<spiffe id>``, ``memory:<owner>``."""
    trusted: bool
    secrecy: str = ""
    """``"confidential"``: its values must not leave without a human's approval; ``""``: public."""

    @property
    def confidential(self) -> bool:
        return self.secrecy == "confidential"

    def __str__(self) -> str:
        secret = ", confidential" if self.confidential else ""
        return f"{self.source} ({'trusted' if self.trusted else 'untrusted'}{secret})"


@dataclass(frozen=True)
class Finding:
    """One reason an argument is tainted or confidential: what was found, where it came from."""

    arg: str
    level: str
    """A taint level, or ``confidential``."""
    sources: tuple[str, ...]
    value: str = ""
    """An excerpt of the value (empty for confidential findings: the excerpt would be the secret)."""
    field: str = ""
    """For a record: the key of the structured output it was found under (``sender``...)."""
    note: str = ""

    def describe(self) -> str:
        where = ", ".join(self.sources)
        what = f"{self.arg}={self.value!r}" if self.value else self.arg
        if self.level == "confidential":
            return f"{self.arg} carries confidential content from {where}"
        if self.note:
            return f"{what}: {self.note} ({where})"
        if self.field:
            return f"{what} is the {self.field!r} field of {where} (record)"
        return f"{what} from {where} ({self.level})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arg": self.arg, "level": self.level, "sources": list(self.sources)}
        for key in ("value", "field", "note"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class ArgumentTaint:
    """Taint and secrecy of one call's arguments."""

    args: frozenset[str] = frozenset()
    """Top-level argument names whose value (or a part of it) came from untrusted content."""
    sources: frozenset[str] = frozenset()
    levels: tuple[tuple[str, str], ...] = ()
    """(argument, level) for tainted arguments: ``prose``, ``unattributed`` or ``record``."""
    embedded: tuple[tuple[str, str], ...] = ()
    """(argument, level) of addresses and hidden texts found *inside* a longer value (a link in a mail body)."""
    lookalike: frozenset[str] = frozenset()
    """Arguments holding a look-alike of a user-named value."""
    secret_args: frozenset[str] = frozenset()
    """Arguments carrying confidential content."""
    secret_sources: frozenset[str] = frozenset()
    by_arg: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(argument, its untrusted sources) for tainted arguments: where each argument's value came from."""
    copied: frozenset[str] = frozenset()
    """Arguments whose whole value, of ``COPIED_WORDS`` words or more, is copied from untrusted free text."""
    findings: tuple[Finding, ...] = ()
    undictated: frozenset[str] | None = None
    """Arguments holding a value the user or operator did not write word for word (up to letter case; dates and
    times excepted); ``None`` when unknown (no call counts as dictated then)."""

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

    def explain(self) -> str:
        """Where the tainted and confidential values came from, in words, for a human deciding an approval."""
        return "; ".join(f.describe() for f in self.findings)

    def context(self, target_arg: str, destinations: Mapping[str, str] | None = None, *,
                outward: bool = False) -> dict[str, Any]:
        """The ``taint`` record of the Cedar context (and of the audit event).

        Args:
            target_arg: The tool's target argument.
            destinations: Destination arguments by role (``recipient``, ``url``, ``account``, ``path``,
                ``command``, ``code``...); each is checked like the target. Command and code arguments are reported
                as ``code`` instead.
            outward: The call has a non-empty destination of an outward role (data leaves through it);
                ``outward_level`` is the strongest taint level of those destinations.

        ``target_levels`` and ``target_roles`` are the levels and roles of the tainted destinations; ``dictated``
        says that every argument other than the destinations is the user's own words (each value a run of whole
        tokens of trusted text, or a date or time): a mis-chosen destination then receives nothing the run read.
        """
        roles = dict(destinations or {})
        if target_arg and target_arg not in roles:
            roles[target_arg] = "target"
        checked = [a for a, role in roles.items() if role not in CODE_ROLES and a in self.args]
        code = [a for a, role in roles.items() if role in CODE_ROLES and a in self.args]
        out = [a for a, role in roles.items() if role in OUTWARD_ROLES and a in self.args]
        links = strongest(lv for a, lv in self.embedded if a not in roles)
        return {
            "any": self.any,
            "target": bool(checked),
            "target_level": strongest(self.level(a) for a in checked),
            "destinations": sorted(checked),
            "args": sorted(self.args),
            "sources": sorted(self.sources),
            "code": bool(code),
            "code_level": strongest(self.level(a) for a in code),
            "lookalike": bool(self.lookalike),
            "confidential": bool(self.secret_args),
            "secret_sources": sorted(self.secret_sources),
            "links": links,
            "copied": any(a not in roles for a in self.copied),
            "outward": outward,
            "outward_level": strongest(self.level(a) for a in out),
            "target_levels": sorted({self.level(a) for a in checked}),
            "target_roles": sorted({roles[a] for a in checked}),
            "target_count": len(checked),
            "dictated": self.undictated is not None and not (self.undictated - {
                a for a, role in roles.items() if role not in CODE_ROLES}),
            "findings": [f.to_dict() for f in self.findings],
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
            pos = haystack.find(needle, starts[part + 1] if part + 1 < len(starts) else len(haystack))
        return found

    def find(self, form: str) -> set[int]:
        """Owners of the texts containing ``form`` (or, for long forms, its whitespace-free version)."""
        if not self.parts or not form:
            return set()
        self._build()
        found = self._hits(self._joined, self.starts, form)
        compact = form.replace(" ", "")
        if len(compact) >= MIN_COMPACT:
            found |= self._hits(self._compact, self._compact_starts, compact)
        return found


class _Trusted:
    """Trusted text as whole tokens: exact (grants trust) and folded (finds look-alikes)."""

    def __init__(self) -> None:
        self.exact = _SEP
        self.folded = _SEP
        self.cased = _SEP
        self.skeleton = _SEP

    def add(self, text: str, *, confidential: bool = False) -> None:
        self.exact += " " + " ".join(tokens(text)) + " " + _SEP
        self.folded += " " + " ".join(folded_tokens(text)) + " " + _SEP
        self.cased += " " + " ".join(tokens(text)).casefold() + " " + _SEP
        if not confidential:  # what the user typed is no leak; the values of trusted confidential content are
            self.skeleton += skeleton(text) + _SEP

    def names(self, value: str) -> bool:
        """Whether ``value`` is user-named: its canonical tokens are a run of whole tokens of trusted text."""
        toks = tokens(value)
        return bool(toks) and f" {' '.join(toks)} " in self.exact

    def dictates(self, value: str) -> bool:
        """Whether ``value`` is the user's own words up to letter case (never grants trust: for a call's payload,
        whose re-cased words reveal nothing the run read)."""
        toks = tokens(value)
        return bool(toks) and f" {' '.join(toks).casefold()} " in self.cased

    def resembles(self, value: str) -> bool:
        """Whether ``value`` equals a run of whole trusted tokens once both are folded."""
        toks = folded_tokens(value)
        return bool(toks) and f" {' '.join(toks)} " in self.folded


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


@dataclass
class _Structured:
    records: list[tuple[str, str, str]] = field(default_factory=list)
    """(normalised leaf, key, leaf as written) of short leaves."""
    prose: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    """Every leaf as written (for secrecy)."""


def _split_structured(text: str) -> _Structured | None:
    """Record and prose leaves of JSON content, or ``None`` when ``text`` is not JSON.

    A string leaf is a *record* when it is short (``MAX_RECORD_CHARS`` characters, ``MAX_RECORD_WORDS`` words,
    one line): an identifier, a name, an address, a date, a number. Longer strings are *prose*. Keys are schema,
    not content, and are not indexed, except keys that are addresses (``{"shared_with": {"bob@x.org": "rw"}}``);
    the key of a record is kept to recognise senders and authors.
    """
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")) or len(text) > MAX_CORPUS_CHARS:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    out = _Structured()
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, key = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1, str(k)) for k, v in item.items())
            # keys are schema, except addresses used as keys (a file's ``shared_with`` by e-mail): those are data
            stack.extend((str(k), depth + 1, key) for k in item if _ADDRESS.match(normalise(str(k))))
        elif isinstance(item, list):
            stack.extend((v, depth + 1, key) for v in item)
        elif isinstance(item, str):
            out.raw.append(item)
            norm = normalise(item)
            if not norm:
                continue
            short = len(norm) <= MAX_RECORD_CHARS and norm.count(" ") < MAX_RECORD_WORDS and "\n" not in item
            if short and depth <= MAX_DEPTH:
                out.records.append((norm, key.lower(), item))
            else:
                out.prose.append(norm)
        elif item is not None and not isinstance(item, bool):
            out.raw.append(str(item))
            out.records.append((str(item), key.lower(), str(item)))
    return out


@dataclass
class _Hits:
    """What the checks of one argument found."""

    levels: list[str] = field(default_factory=list)
    embedded: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    lookalike: bool = False
    copied: bool = False
    dictated: bool = True


@dataclass
class ProvenanceTracker:
    """The content of one run with its labels, and the taint and secrecy checks of tool arguments."""

    trusted_sources: frozenset[str] = frozenset()
    _owners: list[tuple[Label, str]] = field(default_factory=list)
    _untrusted: list[tuple[Label, str]] = field(default_factory=list)
    _trusted_text: list[str] = field(default_factory=list)
    _confidential: list[tuple[Label, str]] = field(default_factory=list)
    _untrusted_seen: dict[Label, None] = field(default_factory=dict)  # the labels of _untrusted, first-seen order
    _confidential_seen: dict[Label, None] = field(default_factory=dict)  # and of _confidential
    _recorded: set[tuple[Label, str]] = field(default_factory=set)  # every (label, text) added: a repeat adds nothing
    _corpus: _Corpus = field(default_factory=lambda: _Corpus())
    _records: _Corpus = field(default_factory=lambda: _Corpus())
    _senders: dict[str, set[int]] = field(default_factory=dict)
    _trusted: _Trusted = field(default_factory=lambda: _Trusted())
    _secrets: SecretIndex = field(default_factory=SecretIndex)
    _overflow: bool = False

    # -- recording content ---------------------------------------------------------------------------------

    def add(self, text: str | bytes, label: Label) -> Label:
        """Records content; a source the operator marked trusted is stored as trusted."""
        if not label.trusted and label.source in self.trusted_sources:
            label = replace(label, trusted=True)
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8", "replace")
        if (label, text) in self._recorded:  # the same content from the same source again: nothing to add
            return label
        self._recorded.add((label, text))
        structured = _split_structured(text)
        if label.confidential:
            self._add_secret(text, label, structured)
        norm = normalise(text)
        if not norm:
            return label
        if label.trusted:
            if not label.confidential:  # trusted confidential content is kept (and restored) as confidential
                self._trusted_text.append(text)
            self._trusted.add(text, confidential=label.confidential)
            if "%" in text and (decoded := unquote(text)) != text:
                self._trusted.add(decoded, confidential=label.confidential)
            return label
        self._untrusted.append((label, text))
        self._untrusted_seen.setdefault(label, None)
        if self._overflow or self._corpus.size + self._records.size + len(norm) > MAX_CORPUS_CHARS:
            self._overflow = True
            return label
        if structured is None:
            owner = self._owner(label, "")
            self._corpus.add(norm, owner)
            if "%" in norm and (decoded := normalise(unquote(norm))) != norm:
                self._corpus.add(decoded, owner)
            return label
        for leaf, key, written in structured.records:
            owner = self._owner(label, key)
            self._records.add(leaf, owner)
            if key in SENDER_FIELDS and (exact := " ".join(tokens(written))):
                self._senders.setdefault(exact, set()).add(owner)
        owner = self._owner(label, "")
        for leaf in structured.prose:
            self._corpus.add(leaf, owner)
            if "%" in leaf:
                self._corpus.add(normalise(unquote(leaf)), owner)
        return label

    def _add_secret(self, text: str, label: Label, structured: _Structured | None) -> None:
        self._confidential.append((label, text))
        self._confidential_seen.setdefault(label, None)
        text = _PLACEHOLDER.sub(" ", text)  # a redacted secret's placeholder is not its value
        owner = self._owner(label, "")
        if structured is not None:
            self._secrets.add((_PLACEHOLDER.sub(" ", v) for v in structured.raw), owner)
        else:
            self._secrets.add([text, *(t for t in text.split() if any(c.isdigit() or c == "@" for c in t))], owner)

    def _owner(self, label: Label, key: str) -> int:
        entry = (label, key)
        try:
            return self._owners.index(entry)
        except ValueError:
            self._owners.append(entry)
            return len(self._owners) - 1

    # -- checking arguments -----------------------------------------------------------------------------------

    def _find(self, form: str) -> tuple[set[int], str]:
        prose = self._corpus.find(form)
        records = self._records.find(form)
        return prose | records, "prose" if prose else "record" if records else ""

    def _describe(self, owners: Iterable[int]) -> tuple[tuple[str, ...], str]:
        sources = sorted({self._owners[o][0].source for o in owners})
        fields = sorted({self._owners[o][1] for o in owners if self._owners[o][1]})
        return tuple(sources), fields[0] if len(fields) == 1 else ""

    def _record(self, hits: _Hits, arg: str, owners: set[int], level: str, excerpt: str, *,
                embedded: bool = False, sender: bool = False) -> None:
        sources, key = self._describe(owners)
        hits.sources.update(sources)
        (hits.embedded if embedded else hits.levels).append(level)
        found_key = "sender" if sender else (key if level == "record" else "")
        hits.findings.append(Finding(arg, level, sources, excerpt[:80], found_key))

    def _check_value(self, hits: _Hits, arg: str, raw: str) -> None:
        """Taint of one leaf value (see the module)."""
        if self._trusted.names(raw):
            return
        folded = normalise(raw)
        whole = strip_address(folded)
        if len(whole) < MIN_MATCH and not _addressy(whole):
            return
        if self._trusted.resembles(raw):
            hits.levels.append("prose")
            hits.sources.add("lookalike")
            hits.lookalike = True
            hits.findings.append(Finding(arg, "prose", ("lookalike",), raw[:80], note=LOOKALIKE_NOTE))
            return
        if not self._untrusted:
            return
        if self._overflow:
            hits.levels.append("prose")
            hits.sources.add("overflow")
            hits.findings.append(Finding(arg, "prose", ("overflow",), raw[:80]))
            return
        senders = self._senders.get(" ".join(tokens(raw)))
        if senders:
            self._record(hits, arg, senders, "record", raw, sender=True)
            return
        found = False
        for form in self._forms(raw, whole):
            owners, level = self._find(form)
            if owners:
                self._record(hits, arg, owners, level, raw)
                hits.copied |= level == "prose" and form == whole and whole.count(" ") + 1 >= COPIED_WORDS
                found = True
                break
        # at any length: an address inside a short value ("hi a@evil.co") is as much the attacker's as a long one
        found |= self._check_inside(hits, arg, raw, whole)
        if not found and _ADDRESS.match(folded):
            hits.levels.append("unattributed")
            hits.sources.add("unattributed")
            hits.findings.append(Finding(arg, "unattributed", ("unattributed",), raw[:80]))

    def _forms(self, raw: str, whole: str) -> list[str]:
        forms = [whole]
        # a reversed or ROT13 address reaches nobody: transforms are for the text of other values
        turned = [] if _ADDRESS.match(whole) or "@" in whole else transforms(raw)
        for text in [*decodings(raw), *turned]:
            if not self._trusted.names(text):
                forms.append(strip_address(normalise(text)))
        return [f for f in dict.fromkeys(forms) if len(f) >= MIN_MATCH or _addressy(f)]

    def _check_inside(self, hits: _Hits, arg: str, raw: str, whole: str) -> bool:
        """Addresses and hidden texts inside a longer value; whether any was found."""
        found = False
        named = {strip_address(normalise(e)) for e in (m.strip(".,;:!?)]}") for m in _ENTITY_RAW.findall(raw))
                 if self._trusted.names(e)}
        for entity in _ENTITY.findall(whole):
            entity = entity.strip(".,;:!?)]}")
            form = strip_address(entity)
            if entity == whole or len(form) < MIN_MATCH or form in named:
                continue
            if self._trusted.resembles(entity):
                hits.embedded.append("prose")
                hits.sources.add("lookalike")
                hits.lookalike = True
                hits.findings.append(Finding(arg, "prose", ("lookalike",), entity[:80], note=LOOKALIKE_NOTE))
                found = True
                continue
            owners, level = self._find(form)
            if owners:
                self._record(hits, arg, owners, level, entity, embedded=True)
                found = True
            elif _ADDRESS.match(entity):
                hits.embedded.append("unattributed")
                hits.sources.add("unattributed")
                hits.findings.append(Finding(arg, "unattributed", ("unattributed",), entity[:80]))
                found = True
        for hidden in embedded(raw):
            form = strip_address(normalise(hidden))
            if len(form) < MIN_MATCH or self._trusted.names(hidden):
                continue
            owners, level = self._find(form)
            if owners:
                self._record(hits, arg, owners, "prose", hidden, embedded=True)
                found = True
        return found

    def _secret_owners(self, raw: str) -> set[int]:
        texts = [raw, *decodings(raw), *transforms(raw), *embedded(raw)]
        owners: set[int] = set()
        for text in dict.fromkeys(texts):
            owners |= self._secrets.find(skeleton(text), ignore=self._trusted.skeleton)
        return owners

    def check(self, arguments: Mapping[str, Any]) -> ArgumentTaint:
        """Which arguments carry values derived from untrusted content, and which carry confidential content."""
        per_arg: dict[str, _Hits] = {}
        secret_args: set[str] = set()
        secret_owners: set[int] = set()
        for top in arguments:
            per_arg[str(top)] = _Hits()  # an argument with no value (None, [], a flag) carries nothing
        for top, raw in _leaves(arguments):
            hits = per_arg.setdefault(top, _Hits())
            hits.dictated = hits.dictated and raw is not None and (
                not raw.strip() or self._trusted.dictates(raw) or bool(_WHEN.match(raw.strip())))
            if raw is None:
                if self._untrusted:
                    hits.levels.append("prose")
                    hits.sources.add("too-deep")
                    hits.findings.append(Finding(top, "prose", ("too-deep",)))
                continue
            self._check_value(hits, top, raw)
            if self._secrets:
                owners = self._secret_owners(raw)
                if owners:
                    secret_args.add(top)
                    secret_owners |= owners
        tainted = {a for a, h in per_arg.items() if h.levels or h.embedded}
        sources = set().union(*(h.sources for h in per_arg.values())) if per_arg else set()
        findings = [f for h in per_arg.values() for f in h.findings]
        secret_sources = {self._owners[o][0].source for o in secret_owners}
        for arg in sorted(secret_args):
            findings.append(Finding(arg, "confidential", tuple(sorted(secret_sources))))
        return ArgumentTaint(
            args=frozenset(tainted),
            sources=frozenset(sources),
            levels=tuple(sorted((a, strongest([*h.levels, *h.embedded])) for a, h in per_arg.items() if a in tainted)),
            embedded=tuple(sorted((a, strongest(h.embedded)) for a, h in per_arg.items() if h.embedded)),
            lookalike=frozenset(a for a, h in per_arg.items() if h.lookalike),
            copied=frozenset(a for a, h in per_arg.items() if h.copied),
            by_arg=tuple((a, tuple(sorted(h.sources))) for a, h in sorted(per_arg.items()) if a in tainted),
            secret_args=frozenset(secret_args),
            secret_sources=frozenset(secret_sources),
            findings=tuple(findings[:MAX_FINDINGS]),
            undictated=frozenset(a for a, h in per_arg.items() if not h.dictated),
        )

    # -- state ----------------------------------------------------------------------------------------------

    def untrusted_labels(self) -> tuple[Label, ...]:
        """The distinct labels of the untrusted content recorded so far, in first-seen order (kept as content is
        added: a host-side call reads them, and a long session holds many entries with few labels)."""
        return tuple(self._untrusted_seen)

    def confidential_labels(self) -> tuple[Label, ...]:
        """The distinct labels of the confidential content recorded so far, in first-seen order."""
        return tuple(self._confidential_seen)

    def memory_labels(self) -> tuple[Label, ...]:
        """The labels a memory item written now must keep: the untrusted ones and the confidential ones."""
        return tuple(dict.fromkeys([*self.untrusted_labels(), *self.confidential_labels()]))

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state, for run checkpoints."""
        return {
            "untrusted": [[label.source, text, label.secrecy] for label, text in self._untrusted],
            "trusted": list(self._trusted_text),
            "confidential": [[label.source, text] for label, text in self._confidential if label.trusted],
        }

    def marks(self) -> tuple[int, int, int]:
        """Where the content recorded so far ends (for :meth:`snapshot_since`: the lists only grow)."""
        return len(self._untrusted), len(self._trusted_text), len(self._confidential)

    def snapshot_since(self, marks: tuple[int, int, int]) -> tuple[dict[str, Any], tuple[int, int, int]]:
        """What :meth:`snapshot` holds beyond ``marks`` (an incremental checkpoint), and the new marks.

        Concatenating each list of a snapshot taken at ``marks`` with this delta's gives :meth:`snapshot` now
        (:func:`~stitchwork.agents.runs.merge_provenance`).
        """
        untrusted, trusted, confidential = marks
        delta = {
            "untrusted": [[label.source, text, label.secrecy] for label, text in self._untrusted[untrusted:]],
            "trusted": self._trusted_text[trusted:],
            "confidential": [[label.source, text] for label, text in self._confidential[confidential:]
                             if label.trusted],
        }
        return delta, self.marks()

    @classmethod
    def restore(cls, data: Mapping[str, Any], *, trusted_sources: frozenset[str] = frozenset()) -> ProvenanceTracker:
        tracker = cls(trusted_sources=trusted_sources)
        secret = {str(entry[1]) for entry in data.get("confidential", ())}  # older snapshots listed them twice
        for text in data.get("trusted", ()):
            if str(text) not in secret:
                tracker.add(str(text), Label("restored", True))
        for entry in data.get("confidential", ()):
            tracker.add(str(entry[1]), Label(str(entry[0]), True, "confidential"))
        for entry in data.get("untrusted", ()):
            secrecy = str(entry[2]) if len(entry) > 2 else ""
            tracker.add(str(entry[1]), Label(str(entry[0]), False, secrecy))
        return tracker

