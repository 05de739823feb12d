"""`emo-assets` edges: bad arguments, a failing run's exit status, and what `ui` starts."""

import contextlib
import io
import os
import subprocess

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from emo_assets import cli
from emo_assets.core.atomic import process_identity
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


def test_a_failed_run_stops_the_sequence_and_exits_1(env, monkeypatch, capsys):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", f"baseline={env / 'missing.jsonl'}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["materialize"]) == 1
    assert "[1/" in out.getvalue() and "[2/" not in out.getvalue()
    assert f"dataset file {env / 'missing.jsonl'} does not exist" in out.getvalue()
    assert (env / "dagster_home" / "dagster.yaml").is_file()  # the instance was created from the template


def test_ui_binds_localhost_and_uses_the_workspace(env, monkeypatch):
    started = []
    monkeypatch.setattr(cli.os, "execvp", lambda program, command: started.append(command))
    cli.main(["ui"])
    (command,) = started
    assert command[1:] == ["dev", "-h", "127.0.0.1", "-p", "3000", "-w", str(cli.PROJECT / "workspace.yaml")]
    assert command[0].endswith("dagster")
    assert (env / "dagster_home" / "dagster.yaml").is_file()


def _dead_pid() -> int:
    dead = subprocess.Popen(["true"])
    dead.wait()
    return dead.pid


@pytest.mark.parametrize("owner, released", [
    (lambda: f"{_dead_pid()}:123", True),
    # an earlier process with this pid (a restarted container's entry point is PID 1 again)
    (lambda: f"{os.getpid()}:1", True),
    (lambda: process_identity(), False),
], ids=["dead-process", "reused-pid", "this-process"])
def test_runs_of_a_killed_process_release_their_pool_slot(owner, released):
    """Otherwise the next `emo-assets materialize` would wait forever for the `torch` slot."""
    owner = owner()
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        run = dg.DagsterRun(job_name="__ephemeral_asset_job__", run_id=make_new_run_id(),
                            status=dg.DagsterRunStatus.STARTED, tags={cli.PROCESS_TAG: owner})
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


@pytest.mark.parametrize("phase2_only", [True, False])
def test_phase2_only_stops_before_the_analysis(env, monkeypatch, phase2_only):
    from emo_assets.core.config import load_settings
    from emo_assets.defs.analysis import plan_steps as analysis_steps

    ran = []
    monkeypatch.setattr(cli, "run_steps", lambda defs, steps, instance: ran.append(steps) or True)
    assert cli.main(["materialize", *(["--phase2-only"] if phase2_only else [])]) == 0
    (steps,) = ran
    settings = load_settings()
    variants = list(settings.datasets)
    phase2, phase3 = cli.plan(settings, variants), analysis_steps(settings, variants)
    assert phase2 and phase3
    assert steps == (phase2 if phase2_only else phase2 + phase3)


def test_only_the_program_freezes_its_heap(env, monkeypatch):
    """`emo-assets` (argv from the command line) takes its long-lived objects out of the collector's scans;
    a Python caller of `main([...])` keeps the normal collector (frozen objects are never freed)."""
    import gc

    monkeypatch.setattr(cli, "run_steps", lambda defs, steps, instance: True)
    assert gc.get_freeze_count() == 0
    try:
        assert cli.main(["materialize", "--phase2-only"]) == 0
        assert gc.get_freeze_count() == 0
        monkeypatch.setattr("sys.argv", ["emo-assets", "materialize", "--phase2-only"])
        assert cli.main() == 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
