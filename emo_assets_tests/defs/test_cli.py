"""`emo-assets` edges: bad arguments, a failing run's exit status, and what `ui` starts."""

import contextlib
import io
import os
import socket
import subprocess
import sys

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from emo_assets import cli
from emo_assets.core.processes import process_identity
from emo_assets_tests.conftest import OFFLINE_MODELS, REPO_ROOT
from emo_assets_tests.pipeline import pipeline_env


@pytest.fixture
def env(tmp_path, small_datasets, mlflow_uri, monkeypatch):
    values = pipeline_env(tmp_path, small_datasets, mlflow_uri)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_bad_arguments_are_rejected_before_anything_runs(env, capsys):
    assert cli.main(["materialize", "--variant", "nope"]) == 2
    assert "unknown variant(s) ['nope']" in capsys.readouterr().err
    assert cli.main(["materialize", "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert not (env / "dagster_home").exists()


def test_a_failed_job_stops_the_sequence_and_exits_1(env, monkeypatch):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", f"baseline={env / 'missing.jsonl'}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["materialize", "--extraction-only"]) == 1
    lines = out.getvalue().splitlines()
    jobs = [line.split(" [")[0] for line in lines[1:] if " [" in line and "(run " in line]
    slugs = [line.split("[")[1].split("]")[0] for line in lines if line.startswith("load_models [")]
    assert slugs == ["minilm", "tiny-gpt2", "tiny-pythia", "tiny-gpt-neo"]  # one run per model
    assert jobs == ["load_models"] * 4 + ["baseline_datasets"]  # baseline_activations never started
    with dg.DagsterInstance.get() as instance:
        records = {r.dagster_run.job_name: r for r in instance.get_run_records()}
        assert set(records) == {"load_models", "baseline_datasets"}
        failed = records["baseline_datasets"]
        assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
        assert records["load_models"].dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert "baseline_datasets [4 partitions] FAILED in " in out.getvalue()
    assert f"(run {failed.dagster_run.run_id})" in out.getvalue()
    assert f"dataset file {env / 'missing.jsonl'} does not exist" in out.getvalue()
    assert (env / "dagster_home" / "dagster.yaml").is_file()  # the instance was created from the template


def test_ui_binds_localhost_and_uses_the_workspace(env, monkeypatch):
    started = []
    monkeypatch.setattr(cli, "supervise", lambda command: started.append(command) or 0)
    assert cli.main(["ui"]) == 0
    (command,) = started
    assert command[:2] == [sys.executable, "-W"] and command[3:5] == ["-m", "dagster"]
    assert command[5:] == ["dev", "-h", "127.0.0.1", "-p", "3000", "-w", str(cli.PROJECT / "workspace.yaml")]
    assert (env / "dagster_home" / "dagster.yaml").is_file()


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


@pytest.mark.parametrize(
    "owner, released",
    [
        (lambda: f"{_dead_pid()}:123", True),
        # an earlier process with this pid (a restarted container's entry point is PID 1 again)
        (lambda: f"{os.getpid()}:1", True),
        (lambda: process_identity(), False),
    ],
    ids=["dead-process", "reused-pid", "this-process"],
)
def test_runs_of_a_killed_process_release_their_pool_slot(owner, released):
    """Otherwise the next `emo-assets materialize` would wait forever for the `torch` slot."""
    owner = owner()
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        run = dg.DagsterRun(
            job_name="__ephemeral_asset_job__",
            run_id=make_new_run_id(),
            status=dg.DagsterRunStatus.STARTED,
            tags={cli.PROCESS_TAG: owner},
        )
        instance.add_run(run)
        instance.event_log_storage.set_concurrency_slots("torch", 1)
        claim = instance.event_log_storage.claim_concurrency_slot("torch", run.run_id, "baseline__activations")
        assert claim.is_claimed
        messages = []
        cli.release_abandoned_runs(instance, echo=messages.append)
        status = instance.get_run_by_id(run.run_id).status
        claimed = instance.event_log_storage.get_concurrency_info("torch").claimed_slots
        if released:
            assert status == dg.DagsterRunStatus.FAILURE and claimed == []
            pid = owner.partition(":")[0]
            assert messages == [f"run {run.run_id} of the dead process {pid}: marked failed, its pool slots freed"]
        else:
            assert status == dg.DagsterRunStatus.STARTED and len(claimed) == 1 and messages == []


@pytest.mark.parametrize("flags", [[], ["--extraction-only"], ["--phase2-only"]])
def test_extraction_only_stops_before_the_analysis(env, monkeypatch, capsys, flags):
    from emo_assets.core.config import load_settings
    from emo_assets.defs.jobs import stage_order

    ran = []
    monkeypatch.setattr(cli, "run_in_process", lambda defs, names, instance: ran.append(names) or True)
    assert cli.main(["materialize", *flags]) == 0
    (names,) = ran
    settings = load_settings()
    assert names == stage_order(settings, list(settings.datasets), extraction_only=bool(flags))
    assert names[-1] == "extended_activations" if flags else "extended_comparisons"
    deprecation = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert deprecation == (
        ["warning: --phase2-only is deprecated and will be removed; use --extraction-only"]
        if flags == ["--phase2-only"]
        else []
    )


def test_only_the_program_freezes_its_heap(env, monkeypatch):
    """`emo-assets` (argv from the command line) takes its long-lived objects out of the collector's scans;
    a Python caller of `main([...])` keeps the normal collector (frozen objects are never freed)."""
    import gc

    monkeypatch.setattr(cli, "run_in_process", lambda defs, names, instance: True)
    assert gc.get_freeze_count() == 0
    try:
        assert cli.main(["materialize", "--extraction-only"]) == 0
        assert gc.get_freeze_count() == 0
        monkeypatch.setattr("sys.argv", ["emo-assets", "materialize", "--extraction-only"])
        assert cli.main() == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_cluster_deployment_needs_the_deployment_instance(env, monkeypatch, capsys):
    """The runs are followed on the deployment's instance: without DAGSTER_HOME nothing is submitted."""
    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.setenv("EMO_ASSETS_DEPLOYMENT", "cluster")
    assert cli.main(["materialize"]) == 2
    assert "--deployment cluster reads the runs from the deployment's instance: set DAGSTER_HOME" in (
        capsys.readouterr().err
    )
    assert not (env / "dagster_home").exists()


def test_cluster_materialize_without_a_webserver_says_so_in_one_line(env):
    """No traceback of the GraphQL client: the URL, that it is not reachable, and how to start it."""
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    completed = subprocess.run(
        [sys.executable, "-m", "emo_assets.cli", "materialize", "--deployment", "cluster"],
        env={**os.environ, "EMO_ASSETS_WEBSERVER": url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    (error,) = completed.stderr.splitlines()
    assert error.startswith(
        f"error: the Dagster webserver at {url} (--webserver, $EMO_ASSETS_WEBSERVER) is not reachable"
    )
    assert "make cluster-up" in error
    assert completed.stdout == ""  # checked before the definitions were built or anything was submitted


def test_an_invalid_dataset_fails_in_one_line_per_run_with_the_validators_reason(env):
    """The run's line and the validator's `FILE:LINE: field: reason`, not Dagster's stack traces on the console."""
    bad = REPO_ROOT / "emo_assets_tests" / "data" / "bad" / "duplicate_id.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "emo_assets.cli", "materialize", "--extraction-only"],
        env={**os.environ, "EMO_ASSETS_DATASETS": f"baseline={bad}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 1
    assert completed.stderr == "failed\n"
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("profile offline: ")
    assert [line.split(" ")[:2] for line in lines[1:5]] == [["load_models", f"[{slug}]"] for slug in OFFLINE_MODELS]
    assert all(" ok in " in line for line in lines[1:5])
    assert lines[5].startswith("baseline_datasets [4 partitions] FAILED in ")
    assert lines[6:] == [
        f"    baseline__emotion_dataset: invalid dataset {bad}:",
        f"    {bad}:3: id: duplicate id 'g1' (first seen on line 1) [error]",
    ]
