"""The Dagster UI as a user meets it: webserver + daemon on 127.0.0.1, a materialization launched through the
GraphQL API, and the asset pages rendered in headless Chromium.

The screenshot is kept as a test artifact in `$EMO_ASSETS_TEST_ARTIFACTS` (default `test-artifacts/`).
In CI (`CI=true`) a missing Chromium is a failure, not a skip: `.ci/run` installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emo_assets_tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ui, pytest.mark.slow]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@pytest.fixture
def dagster_server(tmp_path, small_datasets):
    """Webserver and daemon of a fresh instance, configured for one tiny model and the small datasets."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    template = REPO_ROOT / ".dagster_home" / "dagster.yaml"
    if template.exists():
        shutil.copy(template, home / "dagster.yaml")
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "EMO_ASSETS_DATASETS": ",".join(f"{k}={v}" for k, v in small_datasets.items()),
        "EMO_ASSETS_MODELS": "tiny-gpt2",
        "EMO_ASSETS_RESULTS_DIR": str(tmp_path / "results"),
        "EMO_ASSETS_MLFLOW_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    bin_dir = Path(sys.executable).parent
    logs = [open(tmp_path / "webserver.log", "wb"), open(tmp_path / "daemon.log", "wb")]
    processes = [
        subprocess.Popen(
            [str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPO_ROOT,
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO_ROOT,
            env=env,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
        ),
    ]
    try:
        _wait_for(f"http://127.0.0.1:{port}/server_info", 120)
        yield port, tmp_path
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def _render(chromium: str, url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    flags = [
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1600,1000",
        "--virtual-time-budget=20000",
    ]
    if screenshot is not None:
        subprocess.run(
            [chromium, *flags, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120
        )
    return subprocess.run(
        [chromium, *flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    ).stdout


def test_launch_materialization_and_see_the_asset_graph(dagster_server):
    from dagster import AssetKey, DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient

    chromium = _chromium()
    port, tmp_path = dagster_server
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = client.submit_job_execution(
        "__ASSET_JOB", asset_selection=[AssetKey(["baseline", "emotion_dataset"])], tags={"dagster/partition": "anger"}
    )
    deadline = time.monotonic() + 240
    status = client.get_run_status(run_id)
    while status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        assert time.monotonic() < deadline, f"run {run_id} still {status}"
        time.sleep(1)
        status = client.get_run_status(run_id)
    assert status == DagsterRunStatus.SUCCESS
    assert (tmp_path / "results" / "baseline" / "datasets" / "anger.parquet").is_file()

    _dismiss_welcome_dialog(port)
    artifacts = Path(os.environ.get("EMO_ASSETS_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "dagster-asset-graph.png"
    graph_page = f"http://127.0.0.1:{port}/locations/emo_assets/asset-groups/baseline/lineage"
    dom = _render(chromium, graph_page, tmp_path, screenshot)
    for name in ("dataset_file", "emotion_dataset", "activations", "activations_summary", "language_model"):
        assert name in dom, f"asset {name} not shown on the asset graph page"
    assert screenshot.stat().st_size > 10_000
    catalog = _render(chromium, f"http://127.0.0.1:{port}/assets/baseline/emotion_dataset", tmp_path)
    assert "anger" in catalog


def _dismiss_welcome_dialog(port: int) -> None:
    """What clicking "Skip" on the first-visit community dialog does, so it does not cover the screenshot."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["data"]["setNuxSeen"] is True
