"""`<V>/dataset_file` and `<V>/emotion_dataset`: the JSONL of each dataset variant and its rows per emotion.

`dataset_file` is an observable source asset whose data version is the file's sha256: editing the JSONL
and observing it marks everything built from it unsynced. `emotion_dataset` validates the *whole* file with
the core validator on every run (a bad file fails with the validator's `FILE:LINE: field: reason` lines,
before any model is loaded) and writes each emotion's rows as Parquet, with the source path and sha256 in
the Parquet metadata so that the activations record exactly which file their sentences came from.
"""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from emo_assets.core.atomic import atomic_path
from emo_assets.core.config import Settings
from emo_assets.core.datasets import Dataset, DatasetError, condensed, file_sha256, read_dataset
from emo_assets.core.paths import safe_name, variant_dir
from emo_assets.defs import loaded_settings
from emo_assets.defs.partitions import partitions_for

CODE_VERSION = "1"
# Parquet columns: the validated record fields, the physical line, and any other fields as JSON text.
SCHEMA = {"id": pl.String, "text": pl.String, "emotion": pl.String, "line": pl.Int64, "extra": pl.String}
COLUMN_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("id", "string", description="record id, or line-N for records without one"),
        dg.TableColumn("text", "string", description="the sentence, exactly as written"),
        dg.TableColumn("emotion", "string"),
        dg.TableColumn("line", "int64", description="1-based line in the JSONL"),
        dg.TableColumn("extra", "string", description="other fields of the record, as JSON"),
    ]
)


def dataset_file_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey([variant, "dataset_file"])


def emotion_dataset_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey([variant, "emotion_dataset"])


def emotion_parquet_path(settings: Settings, variant: str, emotion: str) -> Path:
    """`results/<variant>/datasets/<emotion>.parquet`."""
    return variant_dir(settings.results_dir, variant, "datasets") / f"{safe_name(emotion, 'emotion')}.parquet"


def read_valid_dataset(path: Path, settings: Settings) -> Dataset:
    """The validated dataset, or a `dg.Failure` whose description lists every `FILE:LINE: field: reason`."""
    try:
        return read_dataset(path, settings.emotions)
    except DatasetError as exc:
        raise dg.Failure(
            description=f"invalid dataset {path}:\n{exc}",
            metadata={"issues": dg.MetadataValue.md("\n".join(f"- `{issue.describe()}`" for issue in exc.issues))},
        ) from exc


def samples_frame(dataset: Dataset, emotion: str) -> pl.DataFrame:
    """The rows of one emotion, in file order, with the columns of `SCHEMA`."""
    samples = dataset.by_emotion(emotion)
    return pl.DataFrame(
        {
            "id": [s.id for s in samples],
            "text": [s.text for s in samples],
            "emotion": [s.emotion for s in samples],
            "line": [s.line for s in samples],
            "extra": [json.dumps(s.extra, ensure_ascii=False, sort_keys=True) for s in samples],
        },
        schema=SCHEMA,
    )


def _variant_assets(settings: Settings, variant: str) -> list:
    path = settings.datasets[variant]
    parts = partitions_for(settings)

    @dg.observable_source_asset(
        key=dataset_file_key(variant),
        group_name=variant,
        description=f"The {variant} dataset file ({path}); data version = sha256 of its bytes.",
    )
    def dataset_file() -> dg.ObserveResult:
        if not path.is_file():
            raise dg.Failure(description=f"dataset file {path} does not exist (settings.datasets[{variant!r}])")
        sha256 = file_sha256(path)
        return dg.ObserveResult(
            data_version=dg.DataVersion(sha256),
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "sha256": sha256,
                "file_size_bytes": path.stat().st_size,
            },
        )

    @dg.asset(
        key=emotion_dataset_key(variant),
        deps=[dataset_file],
        partitions_def=parts.emotions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=variant,
        kinds={"polars", "parquet"},
        code_version=CODE_VERSION,
        description=f"The validated {variant} sentences of one emotion, as Parquet under results/{variant}/datasets/.",
    )
    def emotion_dataset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        dataset = read_valid_dataset(path, settings)
        shown, hidden = condensed(dataset.warnings)
        for warning in shown:
            context.log.warning(str(warning))
        if hidden:
            context.log.warning(
                f"{path}: {hidden} more warnings not logged ({len(dataset.warnings)} in all); "
                f"`python -m emo_assets.validate {path} --all-warnings` lists every one"
            )
        for emotion in context.partition_keys:
            frame = samples_frame(dataset, emotion)
            target = emotion_parquet_path(settings, variant, emotion)
            with atomic_path(target) as temp:
                frame.write_parquet(
                    temp, metadata={"dataset_path": str(path), "dataset_sha256": dataset.sha256, "emotion": emotion}
                )
            words = frame["text"].str.count_matches(r"\S+")  # model-free length; token counts are per model
            context.log.info(f"{variant}/{emotion}: {frame.height} sentences -> {target}")
            context.add_asset_metadata(
                {
                    "dagster/partition_row_count": frame.height,
                    "dagster/uri": target.as_uri(),
                    "dagster/column_schema": COLUMN_SCHEMA,
                    "file_size_bytes": target.stat().st_size,
                    "dataset_path": dg.MetadataValue.path(str(path)),
                    "dataset_sha256": dataset.sha256,
                    "dataset_warnings": len(dataset.warnings),
                    "words_min": int(words.min()),
                    "words_mean": round(float(words.mean()), 2),
                    "words_max": int(words.max()),
                },
                partition_key=emotion,
            )
        return dg.MaterializeResult()

    return [dataset_file, emotion_dataset]


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions(assets=[a for variant in settings.datasets for a in _variant_assets(settings, variant)])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
