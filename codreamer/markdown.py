"""Markdown tables, the one way every report (run reports, failure reports) renders them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["escape_cell", "table"]


def escape_cell(value: Any) -> str:
    """`value` as one table cell: a `|` escaped and a line break flattened, so the row stays one row."""
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table, one string per line: header, rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(escape_cell(value) for value in row) + " |" for row in rows]
