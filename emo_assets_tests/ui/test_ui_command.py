"""`emo-assets ui` as a service manager runs it: no SupersessionWarning, and SIGTERM (`docker stop`, systemd) or
SIGINT stop it with the webserver and daemon it started. The UI pages themselves are tested in
test_dagster_ui.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from emo_assets_tests.ui.test_dagster_ui import _free_port, _wait_for

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> set[int]:
    """Every living process below `pid`, from the kernel's children lists."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return set()
    found = {int(child) for child in children}
    return found.union(*(_descendants(child) for child in found))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_with_its_children_on_a_signal_and_prints_no_supersession_warning(
    tmp_path, small_datasets, stop_signal
):
    port = _free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "EMO_ASSETS_DATASETS": ",".join(f"{k}={v}" for k, v in small_datasets.items()),
        "EMO_ASSETS_MODELS": "tiny-gpt2",
        "EMO_ASSETS_RESULTS_DIR": str(tmp_path / "results"),
        "EMO_ASSETS_MLFLOW_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        # SIGINT ignored, as a shell's background job inherits it: `emo-assets ui` must still act on it
        ui = subprocess.Popen(
            [sys.executable, "-m", "emo_assets.cli", "ui", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            _wait_for(f"http://127.0.0.1:{port}/server_info", 180)
            started = _descendants(ui.pid)
            assert len(started) >= 3  # dagster dev, its webserver and daemon (and their code servers)
            ui.send_signal(stop_signal)
            assert ui.wait(timeout=120) == 0
        finally:
            if ui.poll() is None:
                os.killpg(ui.pid, signal.SIGKILL)
    assert [pid for pid in started if _alive(pid)] == []
    output = log.read_text()
    assert "SupersessionWarning" not in output and "dg dev" not in output
    assert "Dagster services shut down." in output  # dagster dev's own orderly stop, not a kill
