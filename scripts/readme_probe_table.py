"""Refresh the README's MiniLM probe table from the pipeline's own output (`make readme-results`).

The numbers are never typed in: this reads `<results>/baseline/analysis/minilm/probes.parquet`, written by the
`baseline/linear_probes` asset, and replaces the block between the README markers with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from emo_assets.core.analysis.report import PROBE_COLUMNS, markdown_table

START, END = "<!-- minilm-probes:start -->", "<!-- minilm-probes:end -->"


def main(results_dir: str, readme: str = "README.md") -> int:
    table = pl.read_parquet(Path(results_dir) / "baseline" / "analysis" / "minilm" / "probes.parquet")
    columns = {k: v for k, v in PROBE_COLUMNS.items() if k != "model"}
    block = f"{START}\n{markdown_table(table, columns)}\n{END}"
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    before, _, rest = text.partition(START)
    _, found, after = rest.partition(END)
    if not found:
        print(f"{readme}: markers {START} ... {END} not found", file=sys.stderr)
        return 1
    path.write_text(before + block + after, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
