"""Faults on the cluster deployment, with nothing lost: the services are real and are really stopped or killed.

The tests share the session's cluster and work on the `baseline` variant (the end-to-end test owns `extended`);
each checks only what it launched itself, so their order does not matter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG  # Dagster exports its tag names only here

from emo_assets.cli import logged_outcome
from emo_assets.core.config import load_settings
from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.jobs import LOAD_MODELS, datasets_job, partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets_tests.deploy.checks import verify_activations

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

VARIANT = "baseline"
# How psycopg2 reports a connection that PostgreSQL's fast restart closed under a run (or under the daemon)
DATABASE_LOST = ("terminating connection due to administrator command", "server closed the connection unexpectedly")


@pytest.fixture(scope="module")
def baseline_inputs(cluster):
    """Settings of the cluster, with the baseline datasets and the models materialized by their stage jobs (one
    `load_models` run per model, as `emo-assets materialize` launches them)."""
    settings = load_settings(cluster.env)
    runs = [cluster.launch_run({PARTITION_NAME_TAG: slug}, job=LOAD_MODELS) for slug in settings.model_slugs]
    runs.append(cluster.launch_run(partition_range(list(settings.emotions)), job=datasets_job(VARIANT)))
    assert [cluster.wait_run(run_id, timeout_s=600) for run_id in runs] == ["SUCCESS"] * len(runs)
    return settings


def _keys(settings, slug: str) -> list[str]:
    """The model x emotion partition keys of one model."""
    return [partitions_for(settings).key(slug, emotion) for emotion in settings.emotions]


def _whole_range(settings) -> dict[str, str]:
    """Run tags that select every model x emotion key (one model's keys are not contiguous: "<emotion>|<slug>")."""
    return partition_range(partitions_for(settings).activations.get_partition_keys())


def _wait_for_step_pid(cluster, run_id: str, timeout_s: float) -> int:
    """The pid of the worker process that started the run's step, read from PostgreSQL as soon as it is there."""
    deadline = time.monotonic() + timeout_s
    with cluster.instance() as instance:
        while time.monotonic() < deadline:
            starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
            if starts:
                return starts[0].dagster_event.pid
            time.sleep(0.1)
    raise TimeoutError(f"run {run_id} started no step within {timeout_s}s")


def test_worker_killed_during_activations_fails_clearly_and_reexecution_completes(cluster, baseline_inputs):
    settings = baseline_inputs
    run_id = cluster.launch_run(_whole_range(settings), [activations_key(VARIANT).path])
    os.kill(_wait_for_step_pid(cluster, run_id, timeout_s=300), signal.SIGKILL)

    assert cluster.wait_run(run_id, timeout_s=300) == "FAILURE"
    with cluster.instance() as instance:
        failure = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        messages = " ".join(str(e.dagster_event.event_specific_data.error) + e.message for e in failure)
    assert "WorkerLostError" in messages and "SIGKILL" in messages, messages

    retry = cluster.reexecute_from_failure(run_id)
    assert cluster.wait_run(retry, timeout_s=300) == "SUCCESS"
    with cluster.instance() as instance:
        verify_activations(instance, settings, VARIANT, settings.model_slugs)


def test_postgres_restart_during_a_backfill_then_relaunch_completes(cluster, baseline_inputs):
    settings, slug = baseline_inputs, "tiny-pythia"
    state = cluster.state
    backfill = cluster.launch_backfill([activations_key(VARIANT).path], partitionNames=_keys(settings, slug))
    with cluster.instance() as instance:  # restart once the backfill's run is under way
        deadline = time.monotonic() + 300
        while not instance.get_runs(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill})):
            assert time.monotonic() < deadline, "the backfill launched no run"
            time.sleep(0.5)
    pg_dir = os.path.dirname(state["PG_DATA"])  # the server's output goes to its log: no pipe held open
    pg_ctl = [
        f"{state['PG_BIN']}/pg_ctl",
        "-D",
        state["PG_DATA"],
        "-l",
        f"{pg_dir}/postgres.log",
        "-m",
        "fast",
        "-w",
        "restart",
        "-o",
        f"-k {pg_dir} -p {state['PG_PORT']} -c listen_addresses=127.0.0.1",
    ]
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *pg_ctl] if os.getuid() == 0 else pg_ctl,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )

    # What the README promises: the backfill finishes, or it fails cleanly (every run ended, the failure names the
    # lost database connection, no temp file is left) and a relaunch completes.
    status = cluster.wait_backfill(backfill, timeout_s=600)
    with cluster.instance() as instance:
        runs = [
            r.dagster_run for r in instance.get_run_records(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill}))
        ]
        ended = {run.run_id: run.status for run in runs}
        if status == "COMPLETED_SUCCESS":
            assert runs and set(ended.values()) == {dg.DagsterRunStatus.SUCCESS}, ended
        else:
            assert status in {"COMPLETED_FAILED", "FAILED"}, status
            assert set(ended.values()) <= {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}, ended
            failures = [
                line
                for run in runs
                if run.status == dg.DagsterRunStatus.FAILURE
                for line in logged_outcome(instance, run.run_id).failures
            ]
            reasons = " ".join(failures + [cluster.backfill_error(backfill)])
            assert any(error in reasons for error in DATABASE_LOST), reasons
            folder = activation_path(settings, VARIANT, slug, settings.emotions[0]).parent
            assert not list(folder.glob("*.tmp-*")), f"temp files left in {folder}"
    if status != "COMPLETED_SUCCESS":
        backfill = cluster.launch_backfill([activations_key(VARIANT).path], partitionNames=_keys(settings, slug))
        assert cluster.wait_backfill(backfill, timeout_s=600) == "COMPLETED_SUCCESS"
    with cluster.instance() as instance:
        verify_activations(instance, settings, VARIANT, [slug])


def test_unreachable_broker_fails_the_run_naming_it_and_writes_nothing(cluster, baseline_inputs):
    settings, state = baseline_inputs, cluster.state
    broker = cluster.env["EMO_ASSETS_CELERY_BROKER"]
    target = Path(settings.results_dir) / VARIANT / "analysis"  # where emotion_vectors would write
    subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", state["REDIS_PORT"], "shutdown", "nosave"],
        capture_output=True,
        timeout=30,
    )
    try:
        run_id = cluster.launch_run({PARTITION_NAME_TAG: "tiny-gpt2"}, [["baseline", "emotion_vectors"]])
        assert cluster.wait_run(run_id, timeout_s=300) == "FAILURE"
        with cluster.instance() as instance:
            logs = instance.all_logs(run_id)
            text = " ".join(
                e.message + str(getattr(e.dagster_event, "event_specific_data", ""))
                for e in logs
                if e.dagster_event is not None
            )
            assert not [e for e in logs if e.dagster_event and e.dagster_event.is_step_start]
            written = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(["baseline", "emotion_vectors"])), limit=1
            ).records
            by = [instance.get_run_by_id(record.run_id) for record in written]
            assert not written, [(run.job_name, run.run_id, run.tags) for run in by]
        assert broker in text and "not reachable" in text, text
        assert not target.exists()
    finally:  # the same port again, so the workers reconnect and later tests find the broker
        subprocess.run(
            [
                "redis-server",
                "--port",
                state["REDIS_PORT"],
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(cluster.folder / "redis"),
                "--pidfile",
                str(cluster.folder / "redis" / "redis.pid"),
                "--logfile",
                str(cluster.folder / "logs" / "redis.log"),
            ],
            check=True,
            timeout=30,
        )
