"""The MLflow UI as a user meets it: `mlflow ui` on 127.0.0.1 over a store the tracker wrote, the experiment page
rendered in headless Chromium with the link `make mlflow-ui` prints. It opens on the runs table, and the run's
Dataset column names the dataset and its digest (the sha256 of the file).

The screenshot is kept as a test artifact in `$EMO_ASSETS_TEST_ARTIFACTS` (default `test-artifacts/`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emo_assets.defs.resources import MlflowTracker, TrackedDataset
from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.ui.test_dagster_ui import _chromium, _free_port, _render, _wait_for

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture
def mlflow_server(tmp_path):
    """(port, tracking uri) of `mlflow ui` over a fresh sqlite store; its whole process group is stopped after."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = _free_port()
    log = open(tmp_path / "mlflow-ui.log", "wb")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # uvicorn and job workers too
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", 300)
        yield port, uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_experiment_opens_on_runs_with_their_dataset(mlflow_server, small_datasets, tmp_path):
    chromium = _chromium()
    port, uri = mlflow_server
    dataset = small_datasets["baseline"]
    tracker = MlflowTracker(tracking_uri=uri, experiment="emo_assets", artifact_root=str(tmp_path / "artifacts"))
    status = tracker.log_run(
        "baseline/tiny-gpt2/anger",
        params={"model": "tiny-gpt2"},
        metrics={"n_samples": 6},
        tags={},
        log=logging.getLogger(__name__),
        started=time.time() - 3,
        datasets=[TrackedDataset("baseline", dataset)],
    )
    assert status.startswith("logged (run ")
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("emo_assets")

    artifacts = Path(os.environ.get("EMO_ASSETS_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "mlflow-runs.png"
    page = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    dom = _render(chromium, page, tmp_path, screenshot)
    digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert "baseline/tiny-gpt2/anger" in dom, "the run is not in the runs table"
    assert f"baseline ({digest[:12]}" in dom, "the Dataset column does not show the dataset and its digest"
    assert screenshot.stat().st_size > 10_000
