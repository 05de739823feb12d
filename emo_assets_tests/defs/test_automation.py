"""The stage jobs and the automation with a real daemon (`dagster-daemon run`) on a fresh DAGSTER_HOME.

One daemon serves the module: the extended variant alone, two tiny models, the small dataset. A job started
with the real `dagster job launch` CLI is queued and run by the daemon. Then the activations of one model
are written completely and of the other only in part (in this process, on the same instance, as a UI
backfill would leave them): the automation sensor requests the analysis of the complete model by itself,
and never the other's; once the other's last partitions are written, its analysis and the variant's
summary, comparisons and report follow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import PARTITION_NAME_TAG

from emo_assets.definitions import build_defs
from emo_assets.defs.activations import activations_key
from emo_assets.defs.analysis import analysis_keys
from emo_assets.defs.automation import SENSOR
from emo_assets.defs.jobs import LOAD_MODELS, datasets_job, partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.summary import summary_key
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.defs.conftest import make_settings
from emo_assets_tests.pipeline import materialize, pipeline_env, run_jobs

pytestmark = pytest.mark.slow
MODELS = "tiny-gpt2,tiny-pythia"
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, small_datasets, mlflow_uri):
    """(settings, defs, instance, env) with `dagster-daemon run` serving `emo_assets.definitions`."""
    root = tmp_path_factory.mktemp("automation")
    datasets = {"extended": small_datasets["extended"]}
    env = pipeline_env(root, datasets, mlflow_uri, EMO_ASSETS_MODELS=MODELS)
    home = Path(env["DAGSTER_HOME"])
    home.mkdir()
    shutil.copyfile(REPO_ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    settings = make_settings(root, datasets, mlflow_uri, EMO_ASSETS_MODELS=MODELS)
    full_env = {**_base_env(), **env}
    log = open(root / "daemon.log", "wb")
    command = [_bin("dagster-daemon"), "run", "-m", "emo_assets.definitions"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield settings, build_defs(settings), instance, full_env
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EMO_ASSETS_") or k == "EMO_ASSETS_MODEL_CACHE"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not within {seconds:.0f}s")


def _partitions_of(instance, key: dg.AssetKey) -> set[str | None]:
    records = instance.fetch_materializations(key, limit=1000).records
    return {r.asset_materialization.partition for r in records}


def _sensor_ticks(instance) -> list:
    states = [s for s in instance.all_instigator_state() if s.instigator_name == SENSOR]
    return [t for s in states for t in instance.get_ticks(s.instigator_origin_id, s.selector_id)]


def _finished(instance, run_id: str):
    record = instance.get_run_record_by_id(run_id)
    return record if record.dagster_run.status in FINISHED else None


def _all_finished(instance) -> bool:
    return all(r.dagster_run.status in FINISHED for r in instance.get_run_records())


def _analysed(instance, per_model, slugs: set[str], unpartitioned=()) -> bool:
    """Every run ended, the per-model assets exist for exactly `slugs`, the `unpartitioned` ones exist."""
    return (
        _all_finished(instance)
        and all(_partitions_of(instance, key) == slugs for key in per_model)
        and all(_partitions_of(instance, key) for key in unpartitioned)
    )


def test_a_job_starts_with_dagster_job_launch(daemon):
    settings, _, instance, env = daemon
    emotions = list(settings.emotions)
    tags = json.dumps(partition_range(emotions))
    command = [_bin("dagster"), "job", "launch", "-m", "emo_assets.definitions", "-j", datasets_job("extended")]
    launched = subprocess.run(
        [*command, "--tags", tags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    (record,) = instance.get_run_records(dg.RunsFilter(job_name=datasets_job("extended")))
    run_id = record.dagster_run.run_id
    done = _wait(lambda: _finished(instance, run_id), 240, "the launched run")
    assert done.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert _partitions_of(instance, dg.AssetKey(["extended", "emotion_dataset"])) == set(emotions)
    for emotion in emotions:
        assert (settings.results_dir / "extended" / "datasets" / f"{emotion}.parquet").is_file()


def test_the_analysis_of_a_model_follows_its_last_activation_partition(daemon):
    settings, defs, instance, _ = daemon
    parts = partitions_for(settings)
    assert run_jobs(defs, [LOAD_MODELS], instance)
    if not _partitions_of(instance, dg.AssetKey(["extended", "emotion_dataset"])):
        assert run_jobs(defs, [datasets_job("extended")], instance)  # when run alone, without the launch test
    first_ticks = _wait(lambda: _sensor_ticks(instance), 180, "the automation sensor's first evaluation")
    assert first_ticks

    emotions = list(settings.emotions)
    complete = [parts.key("tiny-gpt2", e) for e in emotions]
    partial = [parts.key("tiny-pythia", e) for e in emotions[:2]]
    ours = {r.dagster_run.run_id for r in instance.get_run_records()}
    for key in complete + partial:
        result = materialize(defs, [activations_key("extended")], instance, {PARTITION_NAME_TAG: key})
        assert result.success
        ours.add(result.run_id)

    per_model, per_variant = analysis_keys("extended")
    _wait(lambda: _analysed(instance, per_model, {"tiny-gpt2"}), 240, "tiny-gpt2's analysis")
    automated = [r for r in instance.get_run_records() if r.dagster_run.run_id not in ours]
    assert automated and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in automated)
    # a later evaluation still requests nothing for the model with missing partitions
    after = time.time()
    _wait(lambda: any(t.timestamp > after for t in _sensor_ticks(instance)), 120, "a later evaluation")
    assert all(_partitions_of(instance, key) == {"tiny-gpt2"} for key in per_model)
    for key in (summary_key("extended"), *per_variant):
        assert _partitions_of(instance, key) == set(), key  # they read every partition: not yet

    for emotion in emotions[2:]:
        tags = {PARTITION_NAME_TAG: parts.key("tiny-pythia", emotion)}
        assert materialize(defs, [activations_key("extended")], instance, tags).success
    variant_wide = [*per_variant, summary_key("extended")]
    _wait(lambda: _analysed(instance, per_model, {"tiny-gpt2", "tiny-pythia"}, variant_wide), 360, "the rest")
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in instance.get_run_records())
    assert (settings.results_dir / "extended" / "analysis" / "report.md").is_file()
