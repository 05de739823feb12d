"""Per-partition freshness: the schedule runs the freshness checks; an edited dataset or an age limit fails them."""

import os
import time

import dagster as dg

from emo_assets.definitions import build_defs
from emo_assets.defs.activations import activations_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.schedules import FRESHNESS_SCHEDULE
from emo_assets_tests.defs.conftest import check_results, make_settings
from emo_assets_tests.pipeline import materialize


def _run_schedule(defs, instance) -> dg.ExecuteInProcessResult:
    schedule = defs.resolve_schedule_def(FRESHNESS_SCHEDULE)
    (request,) = schedule.evaluate_tick(dg.build_schedule_context(instance=instance)).run_requests
    job = defs.resolve_job_def(schedule.job_name)
    return job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)


def test_schedule_runs_the_freshness_checks(baseline_ready, tmp_path, own_datasets, mlflow_uri):
    settings, defs, instance = baseline_ready
    keys = partitions_for(settings).activations.get_partition_keys()
    assert materialize(defs, [activations_key("baseline")], instance, partition_range(keys)).success

    fresh = _run_schedule(defs, instance)
    assert list(check_results(fresh)) == ["baseline/activations:partitions_fresh"]  # only the freshness checks
    assert not fresh.get_asset_materialization_events()
    assert check_results(fresh)["baseline/activations:partitions_fresh"].passed

    later = time.time() + 60  # the dataset file is edited after the activations were built
    os.utime(own_datasets["baseline"], (later, later))
    stale = check_results(_run_schedule(defs, instance))["baseline/activations:partitions_fresh"]
    assert not stale.passed and stale.severity == dg.AssetCheckSeverity.WARN
    assert sorted(stale.metadata["failed_partitions"].value) == sorted(keys)
    assert "older than its dataset file" in stale.description

    os.utime(own_datasets["baseline"], (later - 3600, later - 3600))
    no_age = build_defs(
        make_settings(
            tmp_path,
            {"baseline": own_datasets["baseline"]},
            mlflow_uri,
            EMO_ASSETS_MODELS="tiny-gpt2,tiny-pythia",
            EMO_ASSETS_MAX_AGE_HOURS="0",
        )
    )
    too_old = check_results(_run_schedule(no_age, instance))["baseline/activations:partitions_fresh"]
    assert not too_old.passed and "the limit is 0.0 h" in too_old.description
