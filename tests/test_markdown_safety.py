"""Hostile names through the Markdown filters: parsed back, the structure is unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from recommender.outputs.markdown import md_alt, md_cell, md_fenced, md_text
from recommender.quoting import display, is_active

HOSTILE = [
    "a|b",
    "`code`",
    "[link](http://x)",
    "<script>alert(1)</script>",
    "line\nbreak\r\n| x | y |",
    "**bold** _it_ ~~s~~",
    "![img](x.png)",
    "\\|",
    "```",
    "# heading",
    "- item",
    "&amp; &#124;",
    "abc\u202edcba",
]

names = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30))


def table_of(cells: list[str]) -> str:
    header = "| vm | node |\n| --- | --- |\n"
    return header + "".join(f"| {md_cell(c)} | pve1 |\n" for c in cells)


def cells_of(markdown: str) -> list[list[str]]:
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    rows: list[list[str]] = []
    for token in tokens:
        if token.type == "tr_open":
            rows.append([])
        elif token.type == "inline" and rows:
            rows[-1].append(token.content)
    return rows


@settings(max_examples=200, deadline=None)
@given(st.lists(names, min_size=1, max_size=4))
def test_table_keeps_its_shape_and_no_markup_appears(values: list[str]) -> None:
    markdown = table_of(values)
    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(markdown)
    assert [t.type for t in tokens].count("tr_open") == len(values) + 1
    rows = cells_of(markdown)
    assert all(len(row) == 2 and row[1] == "pve1" for row in rows[1:])
    rendered = md.render(markdown)
    for tag in ("<script", "<a ", "<img", "<code", "<strong", "<em", "<h1"):
        assert tag not in rendered


@settings(max_examples=100, deadline=None)
@given(names)
def test_text_survives_as_plain_text(value: str) -> None:
    md = MarkdownIt("commonmark").enable("table")
    inline = [t for t in md.parse(f"| x |\n| - |\n| {md_cell(value)} |\n") if t.type == "inline"]
    children = inline[-1].children or []
    assert all(child.type == "text" for child in children)
    text = "".join(child.content for child in children)
    # The cell shows the value's one-line form (active characters as visible escapes).
    expected = " ".join(display(value).split())
    assert " ".join(text.split()) == (expected or "—")
    assert not any(is_active(ch) for ch in text)


def test_fence_cannot_be_closed_early() -> None:
    block = md_fenced("virsh migrate --domain='a```b'\necho done")
    tokens = MarkdownIt("commonmark").parse(block + "\n\nafter\n")
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and "echo done" in fences[0].content


def test_alt_text_cannot_close_the_image() -> None:
    markdown = f"![{md_alt('load ] (x) [ on pve1')}](chart.png)"
    tokens = MarkdownIt("commonmark").parse(markdown)
    images = [c for t in tokens if t.children for c in t.children if c.type == "image"]
    assert len(images) == 1 and images[0].attrs["src"] == "chart.png"


@settings(max_examples=150, deadline=None)
@given(st.one_of(names, st.sampled_from(["# h", "1. x", "2) y", "> q", "- - x", "=== ", "+ z"])))
def test_list_item_stays_one_plain_item(value: str) -> None:
    tokens = MarkdownIt("commonmark").parse(f"- {md_text(value) or 'x'}\n")
    types = [t.type for t in tokens]
    assert types.count("list_item_open") == 1
    assert not {"heading_open", "blockquote_open", "ordered_list_open", "hr"} & set(types)
    inline = [t for t in tokens if t.type == "inline"]
    assert all(c.type in ("text", "softbreak") for t in inline for c in t.children or [])


def test_direction_overrides_are_shown_not_obeyed() -> None:
    assert md_cell("evil\u202egnp.exe") == "evil\\\\u202egnp.exe"
    assert "\u2066" not in md_text("a\u2066b") and "\u2028" not in md_text("a\u2028b")
