"""MLflow: an unreachable server costs seconds, not minutes, and never fails a materialization; what a reachable
store records (experiment kind, each run's real start and end, its dataset inputs) is read back from the store."""

import hashlib
import json
import logging
import math
import os
import sqlite3
import time
import uuid

import pytest

from emo_assets.defs.activations import activation_path, activations_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.resources import EXPERIMENT_KIND_TAG, MlflowTracker
from emo_assets.defs.summary import summary_key
from emo_assets_tests.defs.conftest import partition_metadata
from emo_assets_tests.fake_servers import SilentServer
from emo_assets_tests.pipeline import materialize


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    """A store of this test's own: MLflow keeps one dataset row per experiment, name and digest, so a dataset of
    equal content logged by an earlier test from another path would show that path here."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_unreachable_mlflow_is_reported_not_fatal(baseline_ready):
    """A server that drops every connection: one request in the whole run (no retries, no request per partition),
    every materialization succeeds and says why nothing was logged."""
    settings, defs, instance = baseline_ready
    keys = partitions_for(settings).activations.get_partition_keys()
    server = SilentServer(hang=False)
    try:
        result = materialize(
            defs,
            [activations_key("baseline"), summary_key("baseline")],
            instance,
            partition_range(keys),
            resources={"mlflow": MlflowTracker(tracking_uri=server.uri, experiment="emo_assets")},
        )
    finally:
        server.close()

    assert result.success
    assert server.connections == 1
    statuses = [meta["mlflow"] for meta in partition_metadata(result, activations_key("baseline")).values()]
    assert len(statuses) == 8 and all(s.startswith("not logged (") for s in statuses)
    assert sum("127.0.0.1" in s or "Connection" in s for s in statuses) >= 1
    assert sum(s.endswith("not retried in this run)") for s in statuses) == 7  # one attempt per run
    assert partition_metadata(result, summary_key("baseline"))[None]["mlflow"].startswith("not logged (")
    warnings = [
        e.user_message for e in instance.all_logs(result.run_id) if e.level == 30 and "MLflow" in (e.user_message or "")
    ]
    assert len(warnings) == 1


def test_runs_record_the_work_times_and_datasets(baseline_ready, mlflow_uri):
    """In the store itself: the experiment opens as model development, each activation run spans its extraction
    (its file was written inside the run's time span), and lists the dataset it read (digest = sha256, path)."""
    settings, defs, instance = baseline_ready
    keys = partitions_for(settings).activations.get_partition_keys()
    result = materialize(defs, [activations_key("baseline"), summary_key("baseline")], instance, partition_range(keys))
    assert result.success

    dataset = settings.datasets["baseline"]
    sha256 = hashlib.sha256(dataset.read_bytes()).hexdigest()
    store = sqlite3.connect(mlflow_uri.removeprefix("sqlite:///"))
    (experiment_id,) = store.execute("SELECT experiment_id FROM experiments WHERE name = 'emo_assets'").fetchone()
    kind = store.execute(
        "SELECT value FROM experiment_tags WHERE experiment_id = ? AND key = ?", (experiment_id, EXPERIMENT_KIND_TAG)
    ).fetchone()
    assert kind == ("custom_model_development",)
    runs = store.execute(
        "SELECT r.run_uuid, r.name, r.start_time, r.end_time, r.status FROM runs r"
        " JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'dagster.run_id' AND t.value = ?",
        (result.run_id,),
    ).fetchall()
    assert len(runs) == len(keys) + 1  # every partition and the summary
    by_name = {name: (run_id, start, end, status) for run_id, name, start, end, status in runs}
    metadata = partition_metadata(result, activations_key("baseline"))
    for key in keys:
        slug, emotion = partitions_for(settings).split(key)
        run_id, start, end, status = by_name[f"baseline/{slug}/{emotion}"]
        assert status == "FINISHED"
        written_ms = os.stat(activation_path(settings, "baseline", slug, emotion)).st_mtime_ns / 1e6
        assert start <= written_ms <= end
        assert end - start >= metadata[key]["wall_seconds"] * 1000 - 1  # metadata rounds to the millisecond
        inputs = store.execute(
            "SELECT d.name, d.digest, d.dataset_source_type, d.dataset_source FROM inputs i JOIN datasets d"
            " ON d.dataset_uuid = i.source_id WHERE i.destination_id = ? AND i.source_type = 'DATASET'",
            (run_id,),
        ).fetchall()
        assert len(inputs) == 1
        name, digest, source_type, source = inputs[0]
        assert (name, source_type, json.loads(source)) == ("baseline", "local", {"uri": str(dataset.resolve())})
        assert digest == sha256[:36]  # MLflow stores at most 36 characters of a digest
        (input_uuid,) = store.execute(
            "SELECT input_uuid FROM inputs WHERE destination_id = ? AND source_type = ?", (run_id, "DATASET")
        ).fetchone()
        tags = dict(store.execute("SELECT name, value FROM input_tags WHERE input_uuid = ?", (input_uuid,)))
        assert tags["sha256"] == sha256
    _, start, end, _ = by_name["baseline/activations_summary"]
    summary_file = settings.results_dir / "baseline" / "summary" / "activations_summary.json"
    assert start <= os.stat(summary_file).st_mtime_ns / 1e6 <= end


def test_an_existing_experiment_gets_the_model_development_kind(mlflow_uri):
    """An experiment created without the kind (by MLflow itself, or an older version of this project) gets it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    name = f"pre_existing_{uuid.uuid4().hex}"
    experiment_id = client.create_experiment(name)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags
    tracker = MlflowTracker(tracking_uri=mlflow_uri, experiment=name)
    started = time.time() - 2.5
    status = tracker.log_run(
        "work", params={}, metrics={"x": 1}, tags={}, log=logging.getLogger(__name__), started=started
    )
    assert status.startswith("logged (run ")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    (run,) = client.search_runs([experiment_id])
    assert run.info.start_time == math.floor(started * 1000)
    assert run.info.end_time - run.info.start_time >= 2500


def test_a_new_sqlite_store_is_created_by_a_child_process_at_setup(tmp_path):
    """Setting up the resource starts creating a new store in a child process; the first log waits for it and
    finds the store at MLflow's current schema (its alembic head), with the run in it."""
    from alembic.script import ScriptDirectory
    from dagster import build_init_resource_context
    from mlflow.store.db.utils import _get_alembic_config

    from emo_assets.defs import resources

    path = tmp_path / "store" / "mlflow.db"
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{path}", experiment="setup")
    tracker.setup_for_execution(build_init_resource_context())
    child = resources._CREATING[tracker.tracking_uri]
    assert child.pid != os.getpid() and path.parent.is_dir()
    status = tracker.log_run(
        "setup/run", params={}, metrics={"x": 1.0}, tags={}, log=logging.getLogger(__name__), started=time.time()
    )
    assert status.startswith("logged (run ") and child.returncode == 0
    assert tracker.tracking_uri not in resources._CREATING
    head = ScriptDirectory.from_config(_get_alembic_config(tracker.tracking_uri)).get_current_head()
    with sqlite3.connect(path) as db:
        assert db.execute("select version_num from alembic_version").fetchall() == [(head,)]
        assert db.execute("select name from runs").fetchall() == [("setup/run",)]
    tracker.setup_for_execution(build_init_resource_context())  # an existing store is not created again
    assert tracker.tracking_uri not in resources._CREATING
