"""What the cluster tests verify after a run, from the instance's records and the files themselves."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import dagster as dg

from emo_assets.core.activations import ActivationFile
from emo_assets.core.config import Settings
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.conftest import read_records

CELERY_WORKER = "Celery worker"  # the metadata label dagster_celery puts on its "Executing steps" engine event


def verify_activations(instance: dg.DagsterInstance, settings: Settings, variant: str, slugs) -> dict[str, dict]:
    """Every partition of `slugs`: the latest recorded size and sample count equal the file on disk and the
    dataset, the file verifies (checksum), no temp file is left beside it. Returns partition -> metadata."""
    parts = partitions_for(settings)
    rows = Counter(r["emotion"] for r in read_records(settings.datasets[variant]))
    recorded = {}
    for slug in slugs:
        for emotion in settings.emotions:
            key = parts.key(slug, emotion)
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=activations_key(variant), asset_partitions=[key]), limit=1
            ).records
            assert records, f"{variant}/activations[{key}] was never materialized"
            meta = {k: v.value for k, v in records[0].asset_materialization.metadata.items()}
            path = activation_path(settings, variant, slug, emotion)
            assert meta["file_size_bytes"] == os.stat(path).st_size, key
            assert meta["n_samples"] == rows[emotion] == len(ActivationFile(path).sentence_ids), key
            recorded[key] = meta
        folder = activation_path(settings, variant, slug, settings.emotions[0]).parent
        assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name], f"temp files left in {folder}"
    return recorded


def step_workers(instance: dg.DagsterInstance, run_ids) -> list[tuple[str, str, int]]:
    """(step key, celery worker name, pid) of every step that started in the runs, from their event logs."""
    found = []
    for run_id in run_ids:
        workers = {}
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            metadata = entry.dagster_event.engine_event_data.metadata
            if CELERY_WORKER in metadata:
                workers[entry.step_key] = metadata[CELERY_WORKER].value
        for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START):
            found.append((entry.step_key, workers.get(entry.step_key), entry.dagster_event.pid))
    return found


def report_path(settings: Settings, variant: str) -> Path:
    return Path(settings.results_dir) / variant / "analysis" / "report.md"
