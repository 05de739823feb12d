"""`<V>/activations`: one activation file per model x emotion, extracted with each model loaded once per run.

The asset is partitioned by model x emotion and uses a single-run backfill policy: a run covering many
partitions receives them all in `context.partition_keys` (in Dagster's emotion-major order), groups them by
model, and loads each model once through the run's `ModelCache`, releasing it before the next one. The
emotions of one model are extracted in one forward stream (batches over the union of their sentences), and
sentences whose rows already exist in the model's other files (the other variant, the previous version of the
file) are copied instead of forwarded, unless `[extraction] reuse = false` (see `core.activations.reuse`). The
tensors are far too large for an IO manager: the file is written at a deterministic path
(`activation_path`, which downstream assets use too) and the asset returns metadata only.
"""

import os
import time
from datetime import timedelta
from itertools import groupby
from pathlib import Path

import dagster as dg
import polars as pl

from emo_assets.core.activations import DatasetSource
from emo_assets.core.activations.diskspace import DiskSpaceError
from emo_assets.core.config import Settings
from emo_assets.core.extraction import (
    ExtractionError,
    ExtractionJob,
    ExtractionOptions,
    ExtractionResult,
    estimate_files,
    extract_files,
)
from emo_assets.core.models import LoadedModel
from emo_assets.core.paths import activation_dir, activation_file
from emo_assets.core.selection import SelectionError, parse_layers, parse_positions
from emo_assets.defs import loaded_settings
from emo_assets.defs.datasets import emotion_dataset_key, emotion_parquet_path
from emo_assets.defs.deployment import TORCH_OP_TAGS
from emo_assets.defs.models import LANGUAGE_MODEL
from emo_assets.defs.partitions import Partitions, fingerprint, partitions_for, step_data_version
from emo_assets.defs.resources import MlflowTracker, ModelCache, TrackedDataset

CODE_VERSION = "1"


class ActivationsConfig(dg.Config):
    """Run config of the activations asset: what to store, when a run should differ from `[extraction]` (empty:
    the setting). Recorded in the files' headers, the metadata, the input fingerprint and MLflow."""

    positions: str = ""  # all | sentence_end | mean | last:N
    layers: str = ""  # all, or indices and ranges such as 0,6,11 or 6-11 or -1

    def options(self, settings: Settings) -> ExtractionOptions:
        """The extraction options of a run; `dg.Failure` naming a bad value."""
        try:
            positions = parse_positions(self.positions or settings.extraction.positions)
            layers = parse_layers(self.layers or settings.extraction.layers)
        except SelectionError as exc:
            raise dg.Failure(description=f"activations run config: {exc}") from exc
        return ExtractionOptions.from_settings(settings.extraction, positions=positions, layers=layers)


def activations_key(variant: str) -> dg.AssetKey:
    return dg.AssetKey([variant, "activations"])


def activation_path(settings: Settings, variant: str, slug: str, emotion: str) -> Path:
    """`results/<variant>/activations/<model-slug>/activations_<emotion>.safetensors`."""
    return activation_file(activation_dir(settings.results_dir, variant, slug), emotion)


def freshness_policy(settings: Settings) -> dg.FreshnessPolicy:
    """Asset-level freshness (evaluated by the daemon): the newest materialization within max_age_hours.

    Dagster requires a window of at least a minute; the per-partition check applies the limit exactly.
    """
    window = max(timedelta(hours=settings.max_age_hours), timedelta(minutes=1))
    return dg.FreshnessPolicy.time_window(fail_window=window)


def input_fingerprint(options: ExtractionOptions, loaded: LoadedModel, emotion: str, dataset_sha256: str) -> str:
    """Data version of one partition: everything that decides its file's contents (every option that is not a
    runtime choice, see `ExtractionOptions.output_fields`), the model revision and compute dtype, the dataset."""
    return fingerprint(
        {
            **options.output_fields(),
            "dataset_sha256": dataset_sha256,
            "emotion": emotion,
            "model_revision": loaded.revision,
            "compute_dtype": loaded.compute_dtype,
            "code_version": CODE_VERSION,
        }
    )


def group_by_model(keys, parts: Partitions, model_order) -> list[tuple[str, list[str]]]:
    """[(slug, [emotion, ...])] for the given partition keys, models in `model_order`, emotions in key order."""
    pairs = sorted((parts.split(key) for key in keys), key=lambda pair: list(model_order).index(pair[0]))
    return [(slug, [emotion for _, emotion in group]) for slug, group in groupby(pairs, key=lambda pair: pair[0])]


def reuse_candidates(settings: Settings, variant: str, slug: str, emotion: str) -> list[Path]:
    """The model's files that may already hold rows of this partition (see `ExtractionJob.reuse_from`): its own
    previous file first, then the same emotion in the other variants, then the other emotions."""
    variants = [variant, *(v for v in settings.datasets if v != variant)]
    emotions = [emotion, *(e for e in settings.emotions if e != emotion)]
    return [activation_path(settings, v, slug, e) for e in emotions for v in variants]


def _job(settings: Settings, variant: str, slug: str, emotion: str) -> ExtractionJob:
    source = emotion_parquet_path(settings, variant, emotion)
    if not source.is_file():
        raise dg.Failure(description=f"{source} is missing: materialize {variant}/emotion_dataset[{emotion}] first")
    rows = pl.read_parquet(source, columns=["id", "text"])
    source_meta = pl.read_parquet_metadata(source)
    return ExtractionJob(
        rows["text"].to_list(),
        rows["id"].to_list(),
        activation_path(settings, variant, slug, emotion),
        DatasetSource(
            emotion=emotion, variant=variant, path=source_meta["dataset_path"], sha256=source_meta["dataset_sha256"]
        ),
        reuse_candidates(settings, variant, slug, emotion),
    )


def _report(
    context,
    settings: Settings,
    variant: str,
    loaded: LoadedModel,
    options: ExtractionOptions,
    job: ExtractionJob,
    result: ExtractionResult,
    mlflow: MlflowTracker,
    started: float,
) -> tuple[dict, str]:
    """Log one written partition (MLflow, Dagster log); return (its metadata, its input fingerprint).

    `started` is when the model's forward stream began: the emotions of one stream are computed together."""
    emotion, dataset_sha256 = job.source.emotion, job.source.sha256
    size = sum(os.stat(path).st_size for path in result.files)  # a sharded partition: its manifest and shards
    inputs = input_fingerprint(options, loaded, emotion, dataset_sha256)
    key = partitions_for(settings).key(loaded.slug, emotion)
    reuse = result.reuse
    sources = [source.path for source in reuse.sources]
    status = mlflow.log_run(
        f"{variant}/{loaded.slug}/{emotion}",
        params={
            "stage": "extraction",
            "task": "activation_extraction",
            "dataset": variant,
            "model": loaded.model_id,
            "emotion": emotion,
            "dtype": result.storage_dtype,
            "batch_size": options.batch_size,
            "model_revision": loaded.revision,
            "dataset_sha256": dataset_sha256,
            "reuse": options.reuse,
            "reuse_sources": ", ".join(sources) or "none",
            "positions": result.positions,
            "layers": ",".join(map(str, result.layers)),
        },
        metrics={
            "file_size_mb": size / 2**20,
            "n_samples": result.n_sentences,
            "samples_per_s": result.samples_per_s,
            "n_tokens": result.n_tokens,
            "wall_seconds": result.wall_seconds,
            "n_computed": reuse.computed,
            "n_reused": reuse.reused,
        },
        tags={
            "dagster.run_id": context.run.run_id,
            "dagster.partition_key": key,
            "dagster.asset_key": activations_key(variant).to_user_string(),
        },
        log=context.log,
        started=started,
        datasets=[TrackedDataset(variant, Path(job.source.path), dataset_sha256)],
    )
    context.log.info(
        f"{variant}/{loaded.slug}/{emotion}: {result.n_sentences} samples ({reuse.computed} computed, "
        f"{reuse.reused} reused), {result.n_tokens} tokens, {size / 2**20:.2f} MB, {result.wall_seconds:.2f}s "
        f"({result.samples_per_s:.1f} samples/s); mlflow {status}"
    )
    metadata = {
        "dagster/uri": result.path.as_uri(),
        "file_size_bytes": size,
        "file_size_mb": size / 2**20,
        "n_samples": result.n_sentences,
        "dagster/partition_row_count": result.n_sentences,
        "n_tokens": result.n_tokens,
        "n_layers": result.n_layers,
        "d_model": result.d_model,
        "dtype": result.storage_dtype,
        "layers_saved": ", ".join(result.kinds),
        "positions": result.positions,
        "layers": dg.MetadataValue.json(list(result.layers)),
        "n_rows": result.n_rows,
        "estimated_bytes": result.estimated_bytes,
        "n_files": len(result.files),
        "n_nonfinite": result.n_nonfinite,
        "samples_per_s": round(result.samples_per_s, 2),
        "wall_seconds": round(result.wall_seconds, 3),
        "n_computed": reuse.computed,
        "n_reused": reuse.reused,
        "reuse_sources": dg.MetadataValue.json([source.as_dict() for source in reuse.sources]),
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "dataset_sha256": dataset_sha256,
        "input_fingerprint": inputs,
        "mlflow": status,
    }
    return metadata, inputs


def _extract_model(
    context,
    settings: Settings,
    variant: str,
    slug: str,
    emotions,
    model_cache: ModelCache,
    mlflow: MlflowTracker,
    options: ExtractionOptions,
) -> dict[str, str]:
    """Extract every emotion of one model in one forward stream (the model loaded once); return {partition key:
    input fingerprint}."""
    parts = partitions_for(settings)
    loaded = model_cache.get(settings.model_slugs[slug], settings)
    jobs = [_job(settings, variant, slug, emotion) for emotion in emotions]
    started = time.time()
    try:
        results = extract_files(loaded, jobs, options)
    except (ExtractionError, DiskSpaceError) as exc:
        raise dg.Failure(description=f"{variant}/{slug} ({', '.join(emotions)}): {exc}") from exc
    versions = {}
    for job, result in zip(jobs, results):
        key = parts.key(slug, job.source.emotion)
        metadata, versions[key] = _report(context, settings, variant, loaded, options, job, result, mlflow, started)
        context.add_asset_metadata(metadata, partition_key=key)
    return versions


def estimate_job_name(variant: str) -> str:
    return f"{variant}_activations_disk_estimate"


def _disk_estimate_job(settings: Settings, variant: str) -> dg.JobDefinition:
    """The bytes every activations partition of `variant` would write and the free space, without extracting:
    each model loaded and its sentences tokenized, no forward pass, nothing written; recorded as observations of
    the activations partitions (`estimated_bytes`) and logged."""
    parts = partitions_for(settings)

    @dg.op(name=f"{variant}_estimate_activations_disk", tags=TORCH_OP_TAGS)
    def estimate(context: dg.OpExecutionContext, config: ActivationsConfig, model_cache: ModelCache) -> None:
        options = config.options(settings)
        for slug, model_id in settings.model_slugs.items():
            loaded = model_cache.get(model_id, settings)
            jobs = [_job(settings, variant, slug, emotion) for emotion in settings.emotions]
            try:
                disk = estimate_files(loaded, jobs, options)
            except ExtractionError as exc:
                raise dg.Failure(description=f"{variant}/{slug}: {exc}") from exc
            for job in jobs:
                context.log_event(
                    dg.AssetObservation(
                        asset_key=activations_key(variant),
                        partition=parts.key(slug, job.source.emotion),
                        metadata={
                            "estimated_bytes": disk.partition_bytes(job.output_path),
                            "positions": options.positions,
                            "layers": options.layers,
                        },
                    )
                )
            context.log.info(f"{variant}/{slug}: {disk.summary()}")
            model_cache.release(slug)

    @dg.job(
        name=estimate_job_name(variant),
        description=f"The bytes each {variant}/activations partition would write, and the free space: nothing is "
        "extracted or written (recorded as observations of the partitions)",
    )
    def disk_estimate():
        estimate()

    return disk_estimate


def _variant_activations(settings: Settings, variant: str) -> dg.AssetsDefinition:
    parts = partitions_for(settings)

    @dg.asset(
        key=activations_key(variant),
        partitions_def=parts.activations,
        deps=[emotion_dataset_key(variant), LANGUAGE_MODEL],
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="torch",
        op_tags=TORCH_OP_TAGS,
        group_name=variant,
        kinds={"pytorch", "safetensors"},
        code_version=CODE_VERSION,
        freshness_policy=freshness_policy(settings),
        description=f"Every layer's residual-stream and MLP activations of the {variant} sentences of one emotion, "
        f"for one model: results/{variant}/activations/<model>/activations_<emotion>.safetensors.",
    )
    def activations(
        context: dg.AssetExecutionContext, config: ActivationsConfig, model_cache: ModelCache, mlflow: MlflowTracker
    ) -> dg.MaterializeResult:
        options = config.options(settings)
        versions = {}
        for slug, emotions in group_by_model(context.partition_keys, parts, settings.model_slugs):
            versions |= _extract_model(context, settings, variant, slug, emotions, model_cache, mlflow, options)
            model_cache.release(slug)  # after _extract_model returned: no reference to the model is left
        context.add_asset_metadata({"model_loads_in_run": dg.MetadataValue.json(model_cache.loads)})
        return dg.MaterializeResult(data_version=step_data_version(versions))

    return activations


def build_defs(settings: Settings) -> dg.Definitions:
    return dg.Definitions(
        assets=[_variant_activations(settings, variant) for variant in settings.datasets],
        jobs=[_disk_estimate_job(settings, variant) for variant in settings.datasets],
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
