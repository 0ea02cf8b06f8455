"""How a name someone else chose is written into each output: as data, never as code.

VM ids and names, node names and group names come from tenants and admins. This module alone
decides how such a value appears:

* `shell_word` — one bash word that expands to exactly the value (the commands script and the
  Markdown plan's code block); a value no bash word can carry (a NUL byte, a lone surrogate)
  raises `UnsafeValueError`, it is never replaced by something else.
* `display` — one line of visible text (table cells, script comments, Markdown, stderr and log
  lines): every active character is written as a backslash escape (`\n`, `\x1b`, `\u202e`),
  so the line shows that the value holds it and cannot forge another line or reorder the rest
  of it. Its result holds no active character, so applying it again changes nothing: every
  output applies it at its edge, whatever was applied before. The exact value is in the JSON.
* `json_text` — a JSON document whose active characters are `\\u` escapes (JSON allows them
  raw, but a terminal acts on them and some JSON readers choke on them).

Active characters are those a terminal or a text renderer acts on instead of showing: C0 and
C1 controls and DEL (newline, carriage return, escape sequences), the line and paragraph
separators U+2028/U+2029, format characters (the bidi overrides and isolates U+202A–U+202E and
U+2066–U+2069, zero-width characters, ...) and lone surrogates, which are not text at all.
"""

from __future__ import annotations

import json
import re
import shlex
import unicodedata
from collections.abc import Iterable

_ACTIVE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Plain ASCII that needs no quoting in bash (no glob, no expansion, no word splitting).
_SHELL_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+=,-]+")
# Anything but printable ASCII: the only characters that can be active.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UnsafeValueError(ValueError):
    """A value that cannot be written safely where it was asked for."""


def is_active(char: str) -> bool:
    """True for a character that acts on a terminal or renderer instead of being shown."""
    return unicodedata.category(char) in _ACTIVE_CATEGORIES


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def display(value: object) -> str:
    """One line of visible text for `value`, every active character escaped."""
    text = str(value)
    if not _NOT_PRINTABLE_ASCII.search(text):
        return text
    return "".join(_escape(ch) if is_active(ch) else ch for ch in text)


def check_shell_word(value: str) -> None:
    """Raise UnsafeValueError when no bash word can carry `value`."""
    if "\x00" in value:
        raise UnsafeValueError("holds a NUL byte, which no shell word can carry")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise UnsafeValueError("is not valid text (a lone surrogate); no shell word can carry it")


def shell_word(value: str) -> str:
    """One bash word that expands to exactly `value`, whatever the locale bash runs in.

    Plain ASCII is left as is, other text goes in single quotes, and text with an active
    character in `$'…'` where each such character is spelled as its UTF-8 bytes (`\\xHH`), so
    the script itself holds no control, bidi or separator character.
    """
    check_shell_word(value)
    if value and _SHELL_PLAIN.fullmatch(value):
        return value
    if not any(is_active(ch) for ch in value):
        return shlex.quote(value)
    escaped = []
    for ch in value:
        if ch in "\\'":
            escaped.append("\\" + ch)
        elif is_active(ch):
            escaped.append("".join(f"\\x{byte:02x}" for byte in ch.encode("utf-8")))
        else:
            escaped.append(ch)
    return "$'" + "".join(escaped) + "'"


def _json_escape(match: re.Match[str]) -> str:
    char = match.group(0)
    if char == "\n" or not is_active(char):  # a newline of the layout: no string holds one
        return char
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def json_text(document: str) -> str:
    """A `json.dumps(..., ensure_ascii=False)` text with every active character escaped.

    Outside strings JSON text is printable ASCII and newlines, so every character replaced
    here is inside a string, where a `\\u` escape means the same character."""
    return _NOT_PRINTABLE_ASCII.sub(_json_escape, document)


# What RE2 (the regex engine of Prometheus and VictoriaMetrics) treats as syntax; Go's
# regexp.QuoteMeta escapes exactly these.
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal holding exactly `value` (Go string escapes:
    quotes, backslashes and control characters are escaped; other text stays as it is)."""
    return json.dumps(value, ensure_ascii=False)


def promql_regex_alternatives(values: Iterable[str]) -> str:
    """A PromQL string literal for `label=~...` that matches exactly the given values (each
    one literally, whatever it holds)."""
    literal = "|".join("".join("\\" + c if c in _RE2_SPECIAL else c for c in v) for v in values)
    return promql_string(literal)


__all__ = [
    "UnsafeValueError",
    "check_shell_word",
    "display",
    "is_active",
    "json_text",
    "promql_regex_alternatives",
    "promql_string",
    "shell_word",
]
