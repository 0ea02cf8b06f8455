"""Outputs: what a plan (and a period of history) becomes for people and programs — the
terminal table, the JSON document, Markdown, the migration commands, and the weekly report."""
