"""Markdown report of the analysis: dataset, models, probe and separation tables, stability and figures.

Pure string building from tables (polars frames or lists of dicts) and image paths; nothing is read or written
here, and nothing time-dependent is inserted unless the caller passes `generated`, so the same inputs give the
same report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from emo_assets.core.analysis.tables import Table, as_rows, columns_of

PROBE_COLUMNS = {
    "model": "model",
    "kind": "kind",
    "layer": "layer",
    "accuracy_mean": "accuracy",
    "accuracy_std": "± std",
    "control_mean": "control (shuffled)",
    "selectivity": "selectivity",
    "bow_mean": "bag-of-words",
    "accuracy_minus_bow": "accuracy − bow",
}
SEPARATION_COLUMNS = {
    "model": "model",
    "kind": "kind",
    "layer": "layer",
    "separation": "separation (between/within)",
    "mean_offdiag_cosine_centred": "mean cosine (centred)",
    "mean_offdiag_cosine_raw": "mean cosine (raw)",
}
BEST_COLUMNS = {
    "model": "model",
    "kind": "kind",
    "layer": "best layer",
    "accuracy_mean": "accuracy",
    "selectivity": "selectivity",
    "accuracy_minus_bow": "accuracy − bow",
}


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats with `digits` decimals, None/NaN as "n/a", pipes escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    table: Table,
    columns: Mapping[str, str] | Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """GitHub-flavoured Markdown table. `columns`: names to show (in order) or name -> header; columns absent
    from every row are skipped. Empty tables render as "_(no rows)_"."""
    rows = as_rows(table)
    if not rows:
        return "_(no rows)_"
    present = columns_of(rows)
    if columns is None:
        columns = {c: c for c in present}
    elif not isinstance(columns, Mapping):
        columns = {c: c for c in columns}
    shown = [(name, header) for name, header in columns.items() if name in present]
    lines = [
        "| " + " | ".join(header for _, header in shown) + " |",
        "|" + "|".join("---" for _ in shown) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(name), digits) for name, _ in shown) + " |")
    return "\n".join(lines)


def best_rows_from_probes(probe_table: Table) -> list[dict]:
    """Per (model, kind) - or per kind without a model column - the row with the highest mean accuracy
    (ties: earliest layer)."""
    best: dict[tuple, dict] = {}
    for row in as_rows(probe_table):
        key = (row.get("model"), row.get("kind"))
        current = best.get(key)
        if current is None or (row["accuracy_mean"], -row["layer"]) > (current["accuracy_mean"], -current["layer"]):
            best[key] = row
    return list(best.values())


def _link(path: str | os.PathLike, base_dir: str | os.PathLike | None) -> str:
    path = os.fspath(path)
    if base_dir is not None and os.path.isabs(path):
        path = os.path.relpath(path, os.fspath(base_dir))
    return PurePath(path).as_posix()


def render_report(
    *,
    title: str,
    dataset: Mapping[str, Any] | str,
    models: Sequence[str],
    probe_table: Table | None = None,
    separation_table: Table | None = None,
    best_layers: Table | None = None,
    stability_table: Table | None = None,
    extra_tables: Mapping[str, Table] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
    base_dir: str | os.PathLike | None = None,
    overview: str = "",
    notes: Sequence[str] = (),
    generated: str | None = None,
    digits: int = 3,
) -> str:
    """The report as a Markdown string.

    `dataset`: a description or key -> value facts (variant, path, sentences per emotion, ...). `images`:
    caption -> path; absolute paths are made relative to `base_dir` (the report's folder) so links survive a
    moved results folder. `best_layers` defaults to the best rows of `probe_table`. `stability_table`
    (e.g. across seeds or dataset variants) and `extra_tables` (heading -> table) are rendered as given.
    """
    out = [f"# {title}", ""]
    if generated:
        out += [f"Generated: {generated}", ""]
    if overview:
        out += ["## Overview", overview.strip(), ""]
    out += ["## Dataset"]
    if isinstance(dataset, Mapping):
        out += [f"- **{key}**: {format_cell(value, digits)}" for key, value in dataset.items()]
    else:
        out += [str(dataset).strip()]
    out += ["", "## Models"] + [f"- {model}" for model in models] + [""]

    if probe_table is not None:
        out += [
            "## Probe accuracy per layer",
            "4-way L2 logistic regression, stratified CV (mean over folds). *control*: the same probe on "
            "shuffled labels; *selectivity* = accuracy − control; *bag-of-words*: word counts of the sentence "
            "texts on the same folds.",
            "",
            markdown_table(probe_table, PROBE_COLUMNS, digits),
            "",
        ]
    if separation_table is not None:
        out += [
            "## Separation per layer",
            "Trace of the between-emotion over the within-emotion covariance of sentence-end activations; "
            "cosines between emotion vectors after subtracting the grand mean (raw cosines shown for contrast: "
            "anisotropy makes them ~1).",
            "",
            markdown_table(separation_table, SEPARATION_COLUMNS, digits),
            "",
        ]
    best = (
        best_layers
        if best_layers is not None
        else (best_rows_from_probes(probe_table) if probe_table is not None else None)
    )
    if best is not None:
        out += ["## Best layers", "", markdown_table(best, BEST_COLUMNS, digits), ""]
    if stability_table is not None:
        out += ["## Stability", "", markdown_table(stability_table, None, digits), ""]
    for heading, table in (extra_tables or {}).items():
        out += [f"## {heading}", "", markdown_table(table, None, digits), ""]
    if images:
        out += ["## Figures", ""]
        for caption, path in images.items():
            out += [f"![{caption}]({_link(path, base_dir)})", "", f"*{caption}*", ""]
    if notes:
        out += ["## Notes"] + [f"- {note}" for note in notes] + [""]
    return "\n".join(out).rstrip() + "\n"
