"""The `cluster` fixture: the cluster deployment started for real once per session by `deploy/cluster/up.sh`
(PostgreSQL, Redis, 2 celery workers, daemon, webserver on free 127.0.0.1 ports, a temp DAGSTER_HOME) over the
small datasets and two tiny offline models, and stopped by `down.sh` afterwards, also when a test failed.

The automation sensor is turned off (through GraphQL, as in the UI) once the cluster is up: every test here
launches its own runs, and the analysis the sensor would add after each activations run would compete for the
two cores, race the end-to-end backfill for the same partitions and write where the broker test checks that
nothing is written. Automation with a real daemon is tested in `emo_assets_tests/defs/test_automation.py`.

In CI (`CI=true`) missing PostgreSQL or Redis binaries are a failure, not a skip: `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from emo_assets.defs.automation import SENSOR
from emo_assets_tests.deploy.cluster import start_cluster, stop_cluster
from emo_assets_tests.pipeline import pipeline_env

MODELS = ("tiny-gpt2", "tiny-pythia")


def require_services() -> None:
    missing = [
        name
        for name, found in (
            ("postgresql", glob.glob("/usr/lib/postgresql/*/bin/initdb")),
            ("redis-server", shutil.which("redis-server")),
        )
        if not found
    ]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install -y postgresql redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def cluster(small_datasets):
    require_services()
    # Not under pytest's tmp_path: its folders are private to root, and PostgreSQL runs as the postgres user.
    root = Path(tempfile.mkdtemp(prefix="emo-assets-cluster-"))
    root.chmod(0o755)
    env = {
        **os.environ,
        **pipeline_env(root, small_datasets, f"sqlite:///{root / 'mlflow.db'}", EMO_ASSETS_MODELS=",".join(MODELS)),
        "EMO_ASSETS_BIN": str(Path(sys.executable).parent),
    }
    folder = root / "cluster"
    try:
        cluster = start_cluster(folder, env)
        assert cluster.set_sensor(SENSOR, running=False) == "STOPPED"
        yield cluster
    finally:
        stop_cluster(folder)
        shutil.rmtree(root, ignore_errors=True)
