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

import bisect
import itertools
import json
import re
import shlex
import unicodedata
from collections.abc import Iterable, Iterator

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


# Values longer than this are listed whole in a regex of alternatives, not factored (the
# factoring recurses once per shared character).
_FACTORED_LENGTH = 200


def _re2_literal(value: str) -> str:
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in value)


def _alternatives(values: list[str]) -> tuple[list[str], bool]:
    """RE2 alternatives matching exactly `values` (sorted, distinct), values that share a
    first character written once with their common prefix (`vm-10(?:1|2)`), and whether
    the empty string is one of them."""
    out: list[str] = []
    empty = False
    for head, grouped in itertools.groupby(values, key=lambda v: v[:1]):
        group = list(grouped)
        if not head:
            empty = True
            continue
        if len(group) == 1:
            out.append(_re2_literal(group[0]))
            continue
        # Sorted: what the first and last share, all share.
        first, last = group[0], group[-1]
        shared = next(
            (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
        )
        prefix = first[:shared]
        inner, optional = _alternatives([v[len(prefix) :] for v in group])
        body = "|".join(inner)
        tail = f"(?:{body})?" if optional else f"(?:{body})" if len(inner) > 1 else body
        factored = _re2_literal(prefix) + tail
        plain = [_re2_literal(v) for v in group]
        # Written once only where that is shorter (a short prefix costs more than it saves).
        if len(factored) < len("|".join(plain)):
            out.append(factored)
        else:
            out.extend(plain)
    return out, empty


def promql_regex_alternatives(values: Iterable[str]) -> str:
    """A PromQL string literal for `label=~...` that matches exactly the given values (each
    one literally, whatever it holds; both servers anchor the regex at both ends). Values
    sharing a prefix share it in the regex too, so a list of similar ids (`c07-vm01234`, ...)
    takes about half the characters."""
    distinct = sorted(set(values))
    long = [v for v in distinct if len(v) > _FACTORED_LENGTH]
    parts, empty = _alternatives([v for v in distinct if len(v) <= _FACTORED_LENGTH])
    parts += [_re2_literal(v) for v in long]
    return promql_string("|".join(["", *parts] if empty else parts))


def regex_batches(values: Iterable[str], chars: int) -> Iterator[list[str]]:
    """The sorted distinct `values` cut into runs whose `promql_regex_alternatives` is at most
    `chars` long, each run as long as fits to within 2 % (a value too long on its own is a
    run alone)."""
    pending = sorted(set(values))
    # Listed whole, a run [i, j) takes listed[j] - listed[i] + 1 characters, and the
    # regex is never longer than that: the runs so listed that fit are the least.
    listed = list(itertools.accumulate((len(promql_string(_re2_literal(v))) - 1 for v in pending),
                                       initial=0))  # fmt: skip
    start = 0
    while start < len(pending):
        fits = max(1, bisect.bisect_right(listed, listed[start] + chars - 1) - 1 - start)
        # Doubling until a run does not fit (or all that is left does), then halving back.
        beyond = 2 * fits
        while start + fits < len(pending):
            run = min(beyond, len(pending) - start)
            if not _fits(pending[start : start + run], chars):
                beyond = run
                break
            fits, beyond = run, 2 * run
        else:
            beyond = fits + 1
        while beyond - fits > max(1, fits // 64):
            middle = (fits + beyond) // 2
            if _fits(pending[start : start + middle], chars):
                fits = middle
            else:
                beyond = middle
        yield pending[start : start + fits]
        start += fits


def _fits(values: list[str], chars: int) -> bool:
    return len(promql_regex_alternatives(values)) <= chars


__all__ = [
    "UnsafeValueError",
    "check_shell_word",
    "display",
    "is_active",
    "json_text",
    "promql_regex_alternatives",
    "promql_string",
    "regex_batches",
    "shell_word",
]
