"""Metadata and MLflow helpers of the analysis assets: what a `StepResult` looks like in the Dagster UI."""

import base64
from pathlib import Path

import dagster as dg
import polars as pl

from emo_assets.core.analysis.phase3 import StepResult
from emo_assets.defs.resources import MlflowTracker


# -- MLflow (best effort) ---------------------------------------------------------------------------------
def log_mlflow(context: dg.AssetExecutionContext, tracker: MlflowTracker, name: str, **run) -> str:
    """One MLflow run (params, metrics, files as artifacts) tagged with the Dagster run and asset."""
    tags = {"dagster.run_id": context.run.run_id, "dagster.asset_key": context.asset_key.to_user_string()}
    return tracker.log_run(name, tags=tags, log=context.log, **run)


# -- metadata ---------------------------------------------------------------------------------------------
def _column_schema(path: Path) -> dg.TableSchema:
    schema = pl.read_parquet_schema(path)
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype).lower()) for name, dtype in schema.items()])


def image_markdown(path: Path, caption: str) -> dg.MetadataValue:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return dg.MetadataValue.md(f"![{caption}](data:image/png;base64,{data})\n\n`{path}`")


def step_metadata(result: StepResult, main_table: str | None, *, partitioned: bool) -> dict:
    """Asset metadata of a step: uri and column schema of the main table, every table's path and row count,
    every file's path, the headline numbers and notes."""
    meta: dict[str, object] = {}
    if main_table is not None:
        table = result.tables[main_table]
        meta["dagster/uri"] = table.path.as_uri()
        meta["dagster/partition_row_count" if partitioned else "dagster/row_count"] = table.rows
        meta["dagster/column_schema"] = _column_schema(table.path)
    for name, table in result.tables.items():
        meta[f"{name}_path"] = dg.MetadataValue.path(str(table.path))
        meta[f"{name}_rows"] = table.rows
    for name, path in result.files.items():
        if not name.startswith("image: "):
            meta[f"{name}_path"] = dg.MetadataValue.path(str(path))
    for key, value in result.summary.items():
        if key.endswith("_table") and isinstance(value, str):
            meta[key] = dg.MetadataValue.md(value)
        else:
            meta[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    if result.notes:
        meta["notes"] = dg.MetadataValue.md("\n".join(f"- {note}" for note in result.notes))
    return meta
