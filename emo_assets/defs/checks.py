"""Asset checks: blocking integrity checks on `<V>/emotion_dataset` and `<V>/activations`, and freshness.

The checks are not partitioned. Run next to their asset they evaluate every partition of the run (a
single-run backfill covers many), run on their own every partition (the activation integrity checks: every
existing file); a failure names the bad partitions. The integrity checks are blocking with ERROR severity, so a bad file stops
`<V>/activations_summary` (and the analysis assets) in the same run. Each group is one `multi_asset_check` so
every file is read once for all its checks.

Each check declares what it reads besides its asset (`additional_deps`: the dataset file, the emotion rows, and
`language_model`, whose recorded metadata it reads through the instance), so the graph shows those edges.

The checks are not partitioned `AssetCheckSpec`s (a preview in Dagster 1.13): a partitioned check records one
result for its step's single partition key, `AssetCheckResult` takes no partition, and a step over a partition range
(the single-run backfill that loads each model once) has no single key. One result per check that names the failed
partitions is what serves a run over many partitions.

The freshness check is per partition (Dagster's `FreshnessPolicy` is per asset): an activation file is
stale when it is older than its dataset file or than `max_age_hours`, or was built from another model
revision than `language_model` last recorded. The freshness schedule runs it (see `schedules.py`).
"""

import time
from collections.abc import Iterable, Iterator

import dagster as dg
import numpy as np
import polars as pl

from emo_assets.core.activations import ActivationFile, ActivationFileError
from emo_assets.core.config import Settings
from emo_assets.core.datasets import validate_dataset
from emo_assets.defs import loaded_settings
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.datasets import SCHEMA, dataset_file_key, emotion_dataset_key, emotion_parquet_path
from emo_assets.defs.models import LANGUAGE_MODEL, model_facts
from emo_assets.defs.partitions import partitions_for, run_partition_keys

ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN
DATASET_CHECKS = {
    "schema": (ERROR, "the Parquet has exactly the columns and types of emotion_dataset's SCHEMA"),
    "row_count": (ERROR, "rows equal the emotion's sentences in the dataset file (and are > 0)"),
    "unique_ids": (ERROR, "no id appears twice"),
    "unique_texts": (WARN, "no text appears twice (whitespace collapsed); a warning, as in the validator"),
}
ACTIVATION_CHECKS = {
    "file_verifies": (ERROR, "the file opens and its data checksum matches (not truncated or corrupt)"),
    "sample_count": (ERROR, "sentences in the file equal the rows of the emotion_dataset partition"),
    "values_finite": (ERROR, "no NaN or infinity in any stored activation"),
    "shape_matches_model": (ERROR, "n_layers and d_model equal language_model's recorded metadata"),
    "offsets_valid": (ERROR, "offsets start at 0, increase strictly and end at n_tokens"),
}
FRESHNESS_CHECK = "partitions_fresh"


def _results(asset_key: dg.AssetKey, checks: dict, problems: dict[str, dict[str, str]], keys: list[str]):
    """One result per check: failed (with the check's severity) when any partition has a problem."""
    for name, (severity, _) in checks.items():
        bad = problems.get(name, {})
        description = "; ".join(f"{key}: {reason}" for key, reason in sorted(bad.items()))
        yield dg.AssetCheckResult(
            asset_key=asset_key,
            check_name=name,
            passed=not bad,
            severity=severity,
            description=f"failed for {len(bad)} of {len(keys)} partitions: {description}" if bad else None,
            metadata={
                "partitions_checked": len(keys),
                "failed_partitions": dg.MetadataValue.json(sorted(bad)),
                "problems": dg.MetadataValue.md("\n".join(f"- `{k}`: {r}" for k, r in sorted(bad.items()))),
            },
        )


def _specs(
    asset_key: dg.AssetKey, checks: dict, blocking: bool, reads: dict[str, list[dg.AssetKey]]
) -> list[dg.AssetCheckSpec]:
    """The specs of `checks`; `reads[name]`: the assets that check reads besides `asset_key`."""
    return [
        dg.AssetCheckSpec(
            name, asset=asset_key, blocking=blocking, description=text, additional_deps=reads.get(name, [])
        )
        for name, (_, text) in checks.items()
    ]


def _dataset_problems(settings: Settings, variant: str, emotions: Iterable[str]) -> dict[str, dict[str, str]]:
    problems: dict[str, dict[str, str]] = {name: {} for name in DATASET_CHECKS}
    dataset, _ = validate_dataset(settings.datasets[variant], settings.emotions)
    for emotion in emotions:
        path = emotion_parquet_path(settings, variant, emotion)
        if not path.is_file():
            for name in DATASET_CHECKS:
                problems[name][emotion] = f"{path} is missing"
            continue
        frame = pl.read_parquet(path)
        if dict(frame.schema) != SCHEMA:
            problems["schema"][emotion] = f"columns {dict(frame.schema)}, expected {SCHEMA}"
            continue
        expected = len(dataset.by_emotion(emotion)) if dataset is not None else None
        if expected is None:
            problems["row_count"][emotion] = "the dataset file is invalid now (see emotion_dataset's failure)"
        elif frame.height != expected or frame.height == 0:
            problems["row_count"][emotion] = f"{frame.height} rows, the dataset file has {expected}"
        if frame["id"].is_duplicated().any():
            duplicated = frame.filter(frame["id"].is_duplicated())["id"].unique().to_list()
            problems["unique_ids"][emotion] = f"duplicate ids {duplicated}"
        normalized = frame["text"].str.replace_all(r"\s+", " ").str.strip_chars()  # the validator's comparison
        if normalized.is_duplicated().any():
            problems["unique_texts"][emotion] = f"{int(normalized.is_duplicated().sum())} rows share a text"
    return problems


def _activation_problems(context, settings: Settings, variant: str, keys: list[str]) -> dict[str, dict[str, str]]:
    parts = partitions_for(settings)
    problems: dict[str, dict[str, str]] = {name: {} for name in ACTIVATION_CHECKS}
    for key in keys:
        slug, emotion = parts.split(key)
        path = activation_path(settings, variant, slug, emotion)
        try:
            file = ActivationFile(path, verify=False)
        except ActivationFileError as exc:  # missing, truncated, bad header: nothing else can be checked
            for name in ACTIVATION_CHECKS:
                problems[name][key] = str(exc)
            continue
        try:
            file.verify()
        except ActivationFileError as exc:
            problems["file_verifies"][key] = str(exc)
        rows = emotion_parquet_path(settings, variant, emotion)
        expected = pl.scan_parquet(rows).select(pl.len()).collect().item() if rows.is_file() else None
        if expected != file.n_sentences:
            problems["sample_count"][key] = f"{file.n_sentences} sentences, emotion_dataset[{emotion}] has {expected}"
        nonfinite = sum(
            int((~np.isfinite(file.layer(kind, layer))).sum()) for kind in file.kinds for layer in file.layers
        )
        if nonfinite:
            problems["values_finite"][key] = f"{nonfinite} non-finite values"
        facts = model_facts(context.instance, slug)
        if facts is None:
            problems["shape_matches_model"][key] = f"language_model[{slug}] has no recorded materialization"
        elif (file.n_layers, file.d_model) != (facts["n_layers"], facts["d_model"]):
            problems["shape_matches_model"][key] = (
                f"file has {file.n_layers} layers x d={file.d_model}, "
                f"language_model[{slug}] has {facts['n_layers']} x {facts['d_model']}"
            )
        offsets = np.asarray(file.offsets)
        if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != file.header.rows:
            problems["offsets_valid"][key] = (
                f"offsets {offsets[:3]}...{offsets[-1]} do not run from 0 to n_rows {file.header.rows}"
            )
    return problems


def staleness(context, settings: Settings, variant: str, key: str, now: float) -> str | None:
    """Why one activation partition is stale, or None when it is fresh."""
    slug, emotion = partitions_for(settings).split(key)
    path = activation_path(settings, variant, slug, emotion)
    if not path.is_file():
        return "not materialized"
    built = path.stat().st_mtime
    dataset = settings.datasets[variant]
    if dataset.is_file() and dataset.stat().st_mtime > built:
        return f"older than its dataset file {dataset}"
    age_hours = (now - built) / 3600
    if age_hours > settings.max_age_hours:
        return f"{age_hours:.1f} h old, the limit is {settings.max_age_hours} h"
    try:
        revision = ActivationFile(path, verify=False).header.model_revision
    except ActivationFileError as exc:
        return f"unreadable: {exc}"
    facts = model_facts(context.instance, slug)
    if facts is None or facts.get("revision") != revision:
        recorded = None if facts is None else facts.get("revision")
        return f"built from model revision {revision}, language_model[{slug}] records {recorded}"
    return None


def _variant_checks(settings: Settings, variant: str) -> list[dg.AssetChecksDefinition]:
    parts = partitions_for(settings)
    dataset_key, act_key = emotion_dataset_key(variant), activations_key(variant)

    file_key = dataset_file_key(variant)
    dataset_reads = {"row_count": [file_key]}
    activation_reads = {"sample_count": [dataset_key], "shape_matches_model": [LANGUAGE_MODEL]}

    @dg.multi_asset_check(
        specs=_specs(dataset_key, DATASET_CHECKS, blocking=True, reads=dataset_reads),
        name=f"{variant}_emotion_dataset_checks",
    )
    def emotion_dataset_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        emotions = run_partition_keys(context, parts.emotions)
        yield from _results(dataset_key, DATASET_CHECKS, _dataset_problems(settings, variant, emotions), emotions)

    @dg.multi_asset_check(
        specs=_specs(act_key, ACTIVATION_CHECKS, blocking=True, reads=activation_reads),
        name=f"{variant}_activations_checks",
    )
    def activations_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        # on their own, the integrity checks look at the files that exist (partitions_fresh reports the others)
        keys = run_partition_keys(
            context, parts.activations, keep=lambda key: activation_path(settings, variant, *parts.split(key)).is_file()
        )
        yield from _results(act_key, ACTIVATION_CHECKS, _activation_problems(context, settings, variant, keys), keys)

    @dg.asset_check(
        asset=act_key,
        name=FRESHNESS_CHECK,
        additional_deps=[file_key, LANGUAGE_MODEL],
        description=f"every activation partition is newer than its dataset file and than {settings.max_age_hours} h, "
        "and was built from the model revision language_model last recorded",
    )
    def partitions_fresh(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        keys, now = run_partition_keys(context, parts.activations), time.time()
        stale = {key: reason for key in keys if (reason := staleness(context, settings, variant, key, now))}
        (result,) = _results(act_key, {FRESHNESS_CHECK: (WARN, "")}, {FRESHNESS_CHECK: stale}, keys)
        return result

    return [emotion_dataset_checks, activations_checks, partitions_fresh]


def freshness_check_keys(settings: Settings) -> list[dg.AssetCheckKey]:
    """The per-partition freshness checks of every variant (what the freshness schedule runs)."""
    return [dg.AssetCheckKey(activations_key(variant), FRESHNESS_CHECK) for variant in settings.datasets]


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions(asset_checks=[c for variant in settings.datasets for c in _variant_checks(settings, variant)])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
