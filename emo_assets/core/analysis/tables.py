"""Tables as plain rows: the analysis modules return polars frames or lists of dicts; plots and the report
accept either."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import polars as pl

Table = pl.DataFrame | Sequence[Mapping[str, Any]]


def as_rows(table: Table | None) -> list[dict[str, Any]]:
    """A polars DataFrame or an iterable of mappings as a list of plain dicts (None -> [])."""
    if table is None:
        return []
    if isinstance(table, pl.DataFrame):
        return table.to_dicts()
    return [dict(row) for row in table]


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Column names in first-seen order over all rows."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)
