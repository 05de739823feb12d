"""`<V>/activations_summary`: every activation file of a variant, with totals, as one asset.

It depends on *all* activation partitions and runs after their blocking checks, so a summary exists only
for a complete set of verified files. The table goes into Dagster metadata (`dagster/table` and Markdown),
a JSON file under `results/<V>/summary/`, and one MLflow run with the totals as metrics.
"""

import json
import time

import dagster as dg

from emo_assets.core.activations import ActivationFile
from emo_assets.core.atomic import write_bytes_atomic
from emo_assets.core.config import Settings
from emo_assets.core.paths import variant_dir
from emo_assets.defs import loaded_settings
from emo_assets.defs.activations import activation_path, activations_key, freshness_policy
from emo_assets.defs.automation import ANALYSIS_CONDITION
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.resources import MlflowTracker, TrackedDataset

CODE_VERSION = "1"
TABLE_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("model", "string"),
        dg.TableColumn("emotion", "string"),
        dg.TableColumn("samples", "int"),
        dg.TableColumn("size_mb", "float"),
    ]
)


def summary_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey([variant, "activations_summary"])


def file_table(settings: Settings, variant: str) -> list[dict]:
    """One row per activation file of the variant (models and emotions in configured order).

    Raises `dg.Failure` naming the partitions whose file is missing: totals over a partial set would mislead.
    """
    rows, missing = [], []
    for slug in settings.model_slugs:
        for emotion in settings.emotions:
            path = activation_path(settings, variant, slug, emotion)
            if not path.is_file():
                missing.append(partitions_for(settings).key(slug, emotion))
                continue
            size = path.stat().st_size
            samples = ActivationFile(path, verify=False).n_sentences  # verified by the blocking checks
            rows.append(
                {
                    "model": slug,
                    "emotion": emotion,
                    "samples": samples,
                    "size_bytes": size,
                    "size_mb": size / 2**20,
                    "path": str(path),
                }
            )
    if missing:
        raise dg.Failure(description=f"{variant}: no activation file for partitions {missing}; materialize them first")
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| model | emotion | samples | size (MB) |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['emotion']} | {r['samples']} | {r['size_mb']:.2f} |" for r in rows]
    return "\n".join(lines)


def _variant_summary(settings: Settings, variant: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=summary_key(variant),
        deps=[dg.AssetDep(activations_key(variant), partition_mapping=dg.AllPartitionMapping())],
        group_name=variant,
        kinds={"mlflow", "json"},
        code_version=CODE_VERSION,
        freshness_policy=freshness_policy(settings),
        automation_condition=ANALYSIS_CONDITION,
        description=f"Activation files of {variant}: every activation file (model, emotion, samples, size) and totals.",
    )
    def activations_summary(context: dg.AssetExecutionContext, mlflow: MlflowTracker) -> dg.MaterializeResult:
        started = time.time()
        rows = file_table(settings, variant)
        total_files, total_mb = len(rows), sum(r["size_mb"] for r in rows)
        report = variant_dir(settings.results_dir, variant, "summary") / "activations_summary.json"
        write_bytes_atomic(
            report,
            json.dumps(
                {"variant": variant, "files": rows, "total_files": total_files, "total_size_mb": total_mb}, indent=1
            ).encode(),
        )
        status = mlflow.log_run(
            f"{variant}/activations_summary",
            params={
                "stage": "extraction",
                "task": "activations_summary",
                "dataset": variant,
                "models": list(settings.model_slugs),
                "emotions": list(settings.emotions),
            },
            metrics={
                **{f"{r['model']}_{r['emotion']}_size_mb": r["size_mb"] for r in rows},
                f"{variant}_total_files": total_files,
                f"{variant}_total_size_mb": total_mb,
            },
            tags={"dagster.run_id": context.run.run_id, "dagster.asset_key": summary_key(variant).to_user_string()},
            log=context.log,
            started=started,
            datasets=[TrackedDataset(variant, settings.datasets[variant])],
        )
        context.log.info(f"{variant}: {total_files} activation files, {total_mb:.2f} MB; mlflow {status}")
        records = [
            dg.TableRecord(
                {
                    "model": r["model"],
                    "emotion": r["emotion"],
                    "samples": r["samples"],
                    "size_mb": round(r["size_mb"], 4),
                }
            )
            for r in rows
        ]
        return dg.MaterializeResult(
            metadata={
                "dagster/table": dg.MetadataValue.table(records, schema=TABLE_SCHEMA),
                "files": dg.MetadataValue.md(_markdown(rows)),
                "dagster/row_count": total_files,
                "dagster/uri": report.as_uri(),
                f"{variant}_total_files": total_files,
                f"{variant}_total_size_mb": total_mb,
                "mlflow": status,
            }
        )

    return activations_summary


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions(assets=[_variant_summary(settings, variant) for variant in settings.datasets])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
