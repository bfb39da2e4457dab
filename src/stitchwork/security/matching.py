"""Value matching for taint and secrecy: exact forms that grant trust, folded forms that only add suspicion.

Two kinds of comparison, kept apart on purpose:

- **Exact (trust).** :func:`tokens` splits text into whole tokens and canonicalises each *losslessly*: Unicode
  NFC, surrounding sentence punctuation and quotes dropped, and case-insensitivity only where the kind of value is
  case-insensitive: the domain of an e-mail address, the host of a URL (whose ``http(s)://`` scheme, leading
  ``www.`` and trailing ``/`` are ignored on both sides), and an IBAN (ISO 13616 letters are case-insensitive).
  Everything else (file names, identifiers, the local part of an e-mail address, account numbers, words) is
  compared case-sensitively. A value is *user-named* only when its token sequence equals a contiguous run of whole
  tokens of trusted text: ``ob@example.com`` is not named by a user who wrote ``bob@example.com``, and
  ``example.com.evil.net`` is not named by one who wrote ``example.com``.
- **Folded (suspicion).** :func:`normalise` applies NFKC, folds common Cyrillic/Greek look-alikes to Latin,
  removes zero-width, bidi, soft-hyphen, variation-selector and tag characters, case-folds and collapses
  whitespace. Folding is used to *find* a value in untrusted content and to notice that a value is a look-alike
  of a user-named one; it never makes a value trusted.

Encodings and transforms recognised when looking for untrusted or confidential content in a value
(:func:`decodings`, :func:`transforms`, :func:`embedded`): percent-encoding, base64 (standard and URL-safe, padded
or not, of 8 characters or more; a value of letters only counts when it decodes to ASCII text, digits only never),
hex (16 digits or more; a hex value is also tried as base64), JSON ``\\uXXXX`` and ``\\xNN`` escapes, HTML entities
(numeric and named), ROT13 and reversal (for values of ``MIN_COMPACT`` characters or more), the concatenation of a
value's quoted string literals (a command or program assembled from pieces), and base64 (16 characters or more)
and hex runs embedded in a longer value. A decoding counts only when it is UTF-8 text at least 90% printable.

Secrecy (:class:`SecretIndex`) compares *alphanumeric skeletons*: the folded text with everything but letters and
digits removed, so spacing, separators, case and look-alikes do not hide a confidential value; each confidential
value of at least ``MIN_SECRET`` skeleton characters is found whole, and a longer one by any of its windows of
``SECRET_WINDOW`` characters (a partial leak).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import re
import unicodedata
from collections.abc import Iterable

MIN_MATCH = 4
"""Values shorter than this (folded) are too common to attribute, except addresses."""
MIN_COMPACT = 8
"""Values at least this long are also matched without whitespace, reversed and ROT13-decoded."""
MIN_SECRET = 8
"""Alphanumeric characters a confidential value needs to be tracked (shorter ones are too common)."""
SECRET_WINDOW = 12
"""A confidential value longer than this is also found by any run of this many of its characters."""
MAX_SECRET_WINDOWS = 2_000_000
"""Windows one run's secret index holds; past it, further confidential values are found whole only."""

_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f]"
)
_SPACE = re.compile(r"\s+")
_URL_PREFIX = re.compile(r"^(?:mailto:|https?://|www\.)+", re.IGNORECASE)
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
    # Latin look-alikes NFKC keeps (it folds others, such as "ℓ", itself)
    "ı": "i", "ȷ": "j",
})
_TOKEN_SPLIT = re.compile(r"[\s,;<>\"'`()\[\]{}|]+|:(?!//|\d)|(?<=[a-z0-9])\.(?=[A-Z][a-z]+\b)")
"""Token boundaries: spaces, brackets, quotes, separators, a colon that starts no URL or time, and a full stop
glued to the next sentence (``www.example.com.They`` is ``www.example.com`` then ``They``)."""
_EMAIL = re.compile(r"^([^@\s/]+)@((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})$")
_URL = re.compile(r"^(?:(?:https?://)|(?:www\.))+([^/\s?#]+)(.*)$", re.IGNORECASE)
_HOST_PATH = re.compile(r"^((?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,})(/.*)$")
_IBAN = re.compile(r"^[A-Za-z]{2}\d{2}[A-Za-z0-9]{10,30}$")
_B64 = re.compile(r"^[A-Za-z0-9+/_-]{8,}={0,2}$")
_HEX = re.compile(r"^(?:[0-9a-fA-F]{2}){8,}$")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX_RUN = re.compile(r"(?:[0-9a-fA-F]{2}){8,}")
_ESCAPES = re.compile(r"\\(?:u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|U[0-9a-fA-F]{8})")
_LITERAL = re.compile(r"'([^'\\\n]*)'|\"([^\"\\\n]*)\"")
_NON_ALNUM = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Folded form for finding content: NFKC, look-alikes folded, invisible characters removed, case-folded,
    whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text).translate(_CONFUSABLES).casefold()
    return _SPACE.sub(" ", text).strip()


def canonical(text: str) -> str:
    """Lossless form for trust: Unicode NFC, whitespace runs collapsed, trimmed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def strip_address(form: str) -> str:
    """A value without ``mailto:``, ``http(s)://`` and ``www.`` prefixes and a trailing ``/``."""
    stripped = _URL_PREFIX.sub("", form).rstrip("/")
    return stripped or form


def _canon_token(token: str) -> str:
    token = token.strip(".:!?*")  # only punctuation: "", which matches no pattern below and is dropped
    if token.lower().startswith("mailto:"):
        token = token[7:]
    email = _EMAIL.match(token)
    if email:
        return f"{email.group(1)}@{email.group(2).lower()}"
    url = _URL.match(token)
    if url:
        return (url.group(1).lower() + url.group(2)).rstrip("/")
    host_path = _HOST_PATH.match(token)
    if host_path:
        return (host_path.group(1).lower() + host_path.group(2)).rstrip("/")
    if _IBAN.match(token):
        return token.upper()
    return token


def tokens(text: str) -> list[str]:
    """The whole tokens of ``text`` in their lossless canonical form (see the module)."""
    return [t for t in (_canon_token(p) for p in _TOKEN_SPLIT.split(canonical(text))) if t]


def folded_tokens(text: str) -> list[str]:
    """The whole tokens of ``text`` folded (look-alikes, case, width, invisible characters): for suspicion only."""
    out = []
    for part in _TOKEN_SPLIT.split(_INVISIBLE.sub("", unicodedata.normalize("NFKC", text))):
        token = normalise(part).strip(".:!?*")
        if token:
            out.append(strip_address(token))
    return out


def skeleton(text: str) -> str:
    """The alphanumeric skeleton of folded text (what secrecy compares)."""
    return _NON_ALNUM.sub("", normalise(text))


def rot13(text: str) -> str:
    return codecs.encode(text, "rot13")


def _printable(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text and sum(ch.isprintable() or ch.isspace() for ch in text) >= 0.9 * len(text):
        return text
    return ""


def _unescape(value: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(0)[2:]
        try:
            return chr(int(code, 16))
        except (ValueError, OverflowError):
            return match.group(0)

    return _ESCAPES.sub(one, value)


def decodings(value: str) -> list[str]:
    """Texts the whole of ``value`` may be an encoding of (percent, base64, hex, JSON/hex escapes, HTML entities);
    raw (not normalised), empty if none."""
    from urllib.parse import unquote

    out: list[str] = []
    if "%" in value:
        out.append(unquote(value))
    if "\\" in value:
        out.append(_unescape(value))
    if "&" in value:  # numeric and named entities, also the legacy ones that need no ";"
        out.append(html.unescape(value))
    compact = value.strip()
    if _HEX.match(compact):
        out.append(_printable(bytes.fromhex(compact)))
    # both: a value of hex digits may as well be base64 (of text whose hex decoding is not text)
    if _B64.match(compact) and not compact.isdigit():
        out.append(_b64_text(compact))
    return [t for t in out if t and t != value]


def _b64_text(run: str) -> str:
    """The text a base64 run decodes to, or ``""``. A run of letters only may be an ordinary word: it counts only
    when it decodes to ASCII text (encoded ASCII text is often letters only; an English word rarely decodes to
    ASCII)."""
    raw = _b64(run)
    if raw is None or (run.isalpha() and not raw.isascii()):
        return ""
    return _printable(raw)


def _b64(text: str) -> bytes | None:
    padded = text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)
    try:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def transforms(value: str) -> list[str]:
    """ROT13 and reversal of a value of ``MIN_COMPACT`` characters or more (raw)."""
    if len(value.strip()) < MIN_COMPACT:
        return []
    return [rot13(value), value[::-1]]


def embedded(value: str) -> list[str]:
    """Hidden texts inside a longer value: decoded base64/hex runs, escapes, its string literals joined (a command
    or program assembled from pieces) and reversed, and each long literal reversed and ROT13-decoded; raw."""
    out: list[str] = []
    for run in _B64_RUN.findall(value):
        if text := _b64_text(run):
            out.append(text)
    for run in _HEX_RUN.findall(value):
        if text := _printable(bytes.fromhex(run)):
            out.append(text)
    sources = [value]
    if "\\" in value and (unescaped := _unescape(value)) != value:
        out.append(unescaped)
        sources.append(unescaped)
    for source in sources:
        literals = [a or b for a, b in _LITERAL.findall(source)]
        if len(literals) > 1:
            joined = "".join(literals)
            out += [joined, joined[::-1]]
        out += [form for lit in literals if len(lit) >= MIN_COMPACT for form in (lit, lit[::-1], rot13(lit))]
    return [t for t in out if len(t.strip()) >= MIN_MATCH]


class SecretIndex:
    """Confidential values of one run, found in arguments by their alphanumeric skeleton (see the module)."""

    def __init__(self) -> None:
        self._whole: dict[int, dict[str, int]] = {}
        self._windows: dict[str, int] = {}
        self.values = 0

    def __bool__(self) -> bool:
        return self.values > 0

    def add(self, values: Iterable[str], owner: int) -> None:
        """Indexes confidential values (raw text) under ``owner``."""
        for value in values:
            skel = skeleton(value)
            if len(skel) < MIN_SECRET:
                continue
            self.values += 1
            if len(skel) <= SECRET_WINDOW:
                self._whole.setdefault(len(skel), {}).setdefault(skel, owner)
                continue
            if len(self._windows) >= MAX_SECRET_WINDOWS:
                self._whole.setdefault(len(skel), {}).setdefault(skel, owner)
                continue
            for i in range(len(skel) - SECRET_WINDOW + 1):
                self._windows.setdefault(skel[i:i + SECRET_WINDOW], owner)

    def find(self, skel: str, *, ignore: str = "") -> set[int]:
        """Owners of confidential values found in the skeleton ``skel``; hits that occur in ``ignore`` (the
        skeleton of trusted text: what the user typed is not a leak) are not counted."""
        found: set[int] = set()
        if not self.values or len(skel) < MIN_SECRET:
            return found
        for length, table in self._whole.items():
            if length > len(skel):
                continue
            for i in range(len(skel) - length + 1):
                piece = skel[i:i + length]
                owner = table.get(piece)
                if owner is not None and owner not in found and piece not in ignore:
                    found.add(owner)
        if self._windows and len(skel) >= SECRET_WINDOW:
            for i in range(len(skel) - SECRET_WINDOW + 1):
                piece = skel[i:i + SECRET_WINDOW]
                owner = self._windows.get(piece)
                if owner is not None and owner not in found and piece not in ignore:
                    found.add(owner)
        return found


__all__ = [
    "MIN_COMPACT", "MIN_MATCH", "MIN_SECRET", "SECRET_WINDOW", "SecretIndex", "canonical", "decodings",
    "embedded", "folded_tokens", "normalise", "rot13", "skeleton", "strip_address", "tokens", "transforms",
]
