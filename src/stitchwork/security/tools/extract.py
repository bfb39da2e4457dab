"""Quarantined extraction: structured values out of untrusted text, without a model and without trust.

The tool returns only values of the kinds asked for (``email``, ``url``, ``date``, ``time``, ``number``,
``iban``, ``phone``), found by fixed patterns. Its output is labelled untrusted like any tool result
(``trusted_output = false`` in its manifest), and every value is a substring of the text it came from, so the
gateway's tracker attributes it to the original source as well as to ``tool:extract``: a planner can make
progress with "the date in this mail" without reading the mail, and a recipient taken this way is still a
tainted recipient. Stdlib only: the file runs inside any sandbox.
"""

from __future__ import annotations

import re

MAX_VALUES = 50
PATTERNS = {
    "email": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "url": r"(?:https?://|www\.)[^\s<>\"')\]]+",
    "date": r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b",
    "time": r"\b(?:[01]?\d|2[0-3]):[0-5]\d\b",
    "number": r"(?<![\w.])-?\d+(?:[.,]\d+)?(?![\w.])",
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
    "phone": r"\+?\d[\d ()-]{7,}\d",
}


def extract(text: str, fields: list[str]) -> dict[str, list[str]]:
    """Values of each requested kind found in ``text``, in order of appearance, each once."""
    unknown = sorted(set(fields) - set(PATTERNS))
    if unknown:
        raise ValueError(f"unknown field kind(s) {', '.join(unknown)}; known: {', '.join(sorted(PATTERNS))}")
    found: dict[str, list[str]] = {}
    for kind in fields:
        values = [m.group(0).rstrip(".,;:!?") for m in re.finditer(PATTERNS[kind], text)]
        found[kind] = list(dict.fromkeys(values))[:MAX_VALUES]
    return found
