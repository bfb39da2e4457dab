"""Provenance labels and taint of tool-call arguments.

Every piece of content that enters a run (the user's task, tool results, channel messages) is recorded with a
:class:`Label`: where it came from and whether it is trusted. When the model proposes a tool call, each argument
value is checked against the run's untrusted content: a value that appears in untrusted text and is not grounded
in trusted text carries the labels of the untrusted content it came from.

Matching (limits stated plainly):
- values and content are normalised: Unicode NFKC, case-folded, zero-width characters removed, whitespace
  collapsed, ``mailto:`` and URL schemes / trailing slashes stripped for URL- and e-mail-like values;
- a value is derived from content when its normalised form is a substring of the content's normalised form, or
  when, with all whitespace removed, it is a substring of the content with all whitespace removed (so re-spaced
  IBANs, card and phone numbers still match; only for values of ``MIN_COMPACT`` characters or more);
  values shorter than ``MIN_MATCH`` characters (after normalisation) are too common to attribute and are not
  tainted, except e-mail addresses and URLs;
- numbers are matched as their decimal text;
- a value the model rewrote (paraphrase, translation, arithmetic, re-encoding) is not recognised: that is the
  limit of value matching and the reason sensitive sinks also get approval rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MIN_MATCH = 4
MIN_COMPACT = 8
_ZERO_WIDTH = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_SPACE = re.compile(r"\s+")
_URL_PREFIX = re.compile(r"^(?:mailto:|https?://|www\.)")


@dataclass(frozen=True)
class Label:
    """Where a piece of content came from."""

    source: str
    """``user``, ``operator``, ``tool:<name>``, ``channel:<name>``, ``agent:<spiffe id>``, ``url:<host>``."""
    trusted: bool

    def __str__(self) -> str:
        return f"{self.source} ({'trusted' if self.trusted else 'untrusted'})"


def normalise(text: str) -> str:
    """Canonical form for matching: NFKC, case-folded, zero-width removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = _ZERO_WIDTH.sub("", text).casefold()
    return _SPACE.sub(" ", text).strip()


def _value_forms(value: str) -> str:
    form = normalise(value)
    stripped = _URL_PREFIX.sub("", form).rstrip("/")
    return stripped or form


def _leaves(value: Any, path: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, str | int | float):
        yield path, str(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")


@dataclass(frozen=True)
class ArgumentTaint:
    """Taint of one call's arguments."""

    args: frozenset[str] = frozenset()
    """Top-level argument names whose value (or a part of it) came from untrusted content."""
    sources: frozenset[str] = frozenset()

    @property
    def any(self) -> bool:
        return bool(self.args)

    def context(self, target_arg: str) -> dict[str, Any]:
        """The ``taint`` record for Cedar's context."""
        return {
            "any": self.any,
            "target": bool(target_arg) and target_arg in self.args,
            "args": sorted(self.args),
            "sources": sorted(self.sources),
        }


@dataclass
class ProvenanceTracker:
    """The content of one run with its labels, and the taint check for tool arguments."""

    trusted_sources: frozenset[str] = frozenset()
    _untrusted: list[tuple[Label, str]] = field(default_factory=list)
    _trusted_text: list[str] = field(default_factory=list)
    _compact: list[str] = field(default_factory=list)

    def add(self, text: str, label: Label) -> Label:
        """Records content; a source the operator marked trusted is stored as trusted."""
        if not label.trusted and label.source in self.trusted_sources:
            label = Label(label.source, True)
        norm = normalise(text)
        if label.trusted:
            self._trusted_text.append(norm)
        elif norm:
            self._untrusted.append((label, norm))
            self._compact.append(norm.replace(" ", ""))
        return label

    def _grounded(self, form: str) -> bool:
        return any(form in t for t in self._trusted_text)

    def check(self, arguments: Mapping[str, Any]) -> ArgumentTaint:
        """Which arguments carry values derived from untrusted content."""
        if not self._untrusted:
            return ArgumentTaint()
        tainted: set[str] = set()
        sources: set[str] = set()
        for path, raw in _leaves(arguments):
            form = _value_forms(raw)
            short = len(form) < MIN_MATCH and "@" not in form and "." not in form
            if not form or short or self._grounded(form):
                continue
            compact = form.replace(" ", "")
            hits = {
                label.source
                for (label, text), squeezed in zip(self._untrusted, self._compact, strict=True)
                if form in text or (len(compact) >= MIN_COMPACT and compact in squeezed)
            }
            if hits:
                tainted.add(re.split(r"[.\[]", path, maxsplit=1)[0])
                sources |= hits
        return ArgumentTaint(frozenset(tainted), frozenset(sources))

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe state, for run checkpoints."""
        return {
            "untrusted": [[label.source, text] for label, text in self._untrusted],
            "trusted": list(self._trusted_text),
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], *, trusted_sources: frozenset[str] = frozenset()) -> ProvenanceTracker:
        tracker = cls(trusted_sources=trusted_sources)
        tracker._untrusted = [(Label(str(s), False), str(t)) for s, t in data.get("untrusted", ())]
        tracker._compact = [t.replace(" ", "") for _, t in tracker._untrusted]
        tracker._trusted_text = [str(t) for t in data.get("trusted", ())]
        return tracker
