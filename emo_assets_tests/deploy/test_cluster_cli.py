"""`emo-assets materialize --deployment cluster`, the command users run, against the real deployment: the stage
jobs are submitted to its webserver, executed by its daemon's run workers on the celery workers, recorded in
PostgreSQL, and reported one line per run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from emo_assets.core.config import load_settings
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.deploy.checks import step_workers, verify_activations

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RUN_LINE = re.compile(r"(\S+) \[(.+)\] ok in [0-9.]+s \(run ([0-9a-f-]{36})\)")


def test_materialize_on_the_cluster_runs_each_stage_job_there(cluster):
    settings = load_settings(cluster.env)
    completed = subprocess.run(
        [sys.executable, "-m", "emo_assets.cli", "materialize", "--variant", "baseline", "--extraction-only"],
        cwd=REPO_ROOT,
        env=cluster.env,  # EMO_ASSETS_DEPLOYMENT=cluster, EMO_ASSETS_WEBSERVER, DAGSTER_HOME: up.sh's `env` file
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    header, *runs, last = completed.stdout.splitlines()
    assert header.startswith(f"profile offline: models {list(settings.model_slugs)}, variants ['baseline'], ")
    assert "cluster deployment" in header and last == "done"
    matched = [RUN_LINE.fullmatch(line) for line in runs]
    assert all(matched), runs
    keys = len(settings.model_slugs) * len(settings.emotions)
    assert [(m[1], m[2]) for m in matched] == [
        *(("load_models", slug) for slug in settings.model_slugs),
        ("baseline_datasets", f"{len(settings.emotions)} partitions"),
        ("baseline_activations", f"{keys} partitions"),
    ]
    run_ids = [m[3] for m in matched]
    # the runs are the deployment's: PostgreSQL holds them, and their steps ran on the celery workers
    listed = ", ".join(f"'{run_id}'" for run_id in run_ids)
    assert sorted(cluster.psql(f"select run_id, status from runs where run_id in ({listed})")) == sorted(
        [run_id, "SUCCESS"] for run_id in run_ids
    )
    with cluster.instance() as instance:
        steps = step_workers(instance, run_ids)
        assert len(steps) >= len(run_ids) and all(worker for _, worker, _ in steps), steps
        verify_activations(instance, settings, "baseline", settings.model_slugs)
