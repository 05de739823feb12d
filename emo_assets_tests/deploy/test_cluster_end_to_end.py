"""End to end on the cluster deployment: the `extended` lineage (datasets, models, activations, analysis) backfilled
through GraphQL as the UI launches it, executed by the daemon's run workers on two celery workers.

The figures of the run (wall time, runs, steps per worker) are written to `$EMO_ASSETS_TEST_ARTIFACTS`
(default `test-artifacts/`) as `cluster-end-to-end.json`; the README's "Scaling out" quotes them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import BACKFILL_ID_TAG  # Dagster exports its tag names only here

from emo_assets.core.config import load_settings
from emo_assets.definitions import build_defs
from emo_assets.defs.activations import activations_key
from emo_assets.defs.models import LANGUAGE_MODEL
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.deploy.checks import report_path, step_workers, verify_activations

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

VARIANT = "extended"


def test_backfill_of_the_extended_lineage_runs_on_two_workers(cluster):
    settings = load_settings(cluster.env)
    graph = build_defs(settings).resolve_asset_graph()
    lineage = sorted(k for k in graph.materializable_asset_keys if k.path[0] == VARIANT or k == LANGUAGE_MODEL)

    started = time.monotonic()
    backfill = cluster.launch_backfill([key.path for key in lineage], allPartitions=True)
    assert cluster.wait_backfill(backfill, timeout_s=900) in {"COMPLETED", "COMPLETED_SUCCESS"}
    wall_s = time.monotonic() - started

    with cluster.instance() as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill}))
        assert runs and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        run_ids = sorted(run.run_id for run in runs)

        # PostgreSQL itself holds the run records (and their backfill tag), not a file beside a process
        rows = cluster.psql(
            "select r.run_id, r.status from runs r join run_tags t on t.run_id = r.run_id "
            f"where t.key = '{BACKFILL_ID_TAG}' and t.value = '{backfill}' order by r.run_id"
        )
        assert rows == [[run_id, "SUCCESS"] for run_id in run_ids]

        steps = step_workers(instance, run_ids)
        workers = Counter(worker for _, worker, _ in steps)
        assert None not in workers, f"a step ran outside the celery workers: {steps}"
        assert len(workers) >= 2 and len({pid for _, _, pid in steps}) >= 2, steps

        # one activations step per model, each loading its model once for all of that model's emotions
        activation_runs = [run for run in runs if activations_key(VARIANT) in (run.asset_selection or ())]
        assert len(activation_runs) == len(settings.model_slugs)
        recorded = verify_activations(instance, settings, VARIANT, settings.model_slugs)
        for meta in recorded.values():
            loads = meta["model_loads_in_run"]
            assert len(loads) == 1 and list(loads.values()) == [1], loads

        # every partition of every asset of the lineage was materialized
        for key in lineage:
            partitions_def = graph.get(key).partitions_def
            expected = set(partitions_def.get_partition_keys()) if partitions_def else {None}
            events = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1000).records
            assert {e.asset_materialization.partition for e in events} >= expected, key

    assert report_path(settings, VARIANT).stat().st_size > 0
    for slug in settings.model_slugs:
        assert list((Path(settings.results_dir) / VARIANT / "analysis").rglob(f"*{slug}*")), slug

    artifacts = Path(os.environ.get("EMO_ASSETS_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "cluster-end-to-end.json").write_text(
        json.dumps(
            {
                "wall_seconds": round(wall_s, 1),
                "runs": len(runs),
                "steps": len(steps),
                "steps_per_worker": dict(sorted(workers.items())),
                "worker_processes": len({pid for _, _, pid in steps}),
                "models": list(settings.model_slugs),
                "assets": [key.to_user_string() for key in lineage],
            },
            indent=2,
        )
    )
