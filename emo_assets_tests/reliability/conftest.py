"""Fixtures of the reliability tests.

`extraction_twice` materializes the extraction stage jobs of the whole offline profile (both variants, four models, the small
datasets) twice at the same time: once in this process on a persistent instance made from the committed
`dagster.yaml` template, once in a child process, each in its own root. `test_determinism.py` compares the
two; `test_dagster_kill.py` then kills and reruns `emo-assets materialize` on the first one's instance.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from emo_assets import cli
from emo_assets.core.config import load_settings
from emo_assets.definitions import build_defs
from emo_assets.defs.jobs import stage_order
from emo_assets_tests.pipeline import run_jobs
from emo_assets_tests.reliability.helpers import PYTHON, dagster_env, files_with_hashes

# The extraction jobs of the whole graph (no analysis), in a child process: the second run of the determinism test.
EXTRACTION_CHILD = """
import dagster as dg
from emo_assets.cli import prepare_dagster_home, run_in_process
from emo_assets.core.config import load_settings
from emo_assets.definitions import build_defs
from emo_assets.defs.jobs import stage_order
from emo_assets_tests.pipeline import run_jobs
from emo_assets.defs.jobs import stage_order
settings = load_settings()
prepare_dagster_home(settings.root)
with dg.DagsterInstance.get() as instance:
    ok = run_in_process(build_defs(settings), stage_order(settings, list(settings.datasets), extraction_only=True),
                        instance)
raise SystemExit(0 if ok else 1)
"""


def _run_extraction_here(env: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        settings = load_settings()
        cli.prepare_dagster_home(settings.root)
        lines = []
        with dg.DagsterInstance.get() as instance:
            names = stage_order(settings, list(settings.datasets), extraction_only=True)
            ok = run_jobs(build_defs(settings), names, instance, lines)
        assert ok, "\n".join(lines)


@dataclass(frozen=True)
class TwoRuns:
    here: Path  # root of the run in this process (results/, dagster_home/)
    there: Path  # root of the run in the child process
    hashes_here: dict  # relative path -> sha256 of every file under here/results, right after the runs
    hashes_there: dict


@pytest.fixture(scope="session")
def extraction_twice(tmp_path_factory, small_datasets) -> TwoRuns:
    """Two complete extractions (stage jobs up to the summaries), run concurrently in two processes."""
    here, there = tmp_path_factory.mktemp("run_here"), tmp_path_factory.mktemp("run_there")
    child_env = {**os.environ, **dagster_env(there, small_datasets)}
    child = subprocess.Popen(
        [PYTHON, "-c", EXTRACTION_CHILD], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _run_extraction_here(dagster_env(here, small_datasets))
        output, _ = child.communicate(timeout=600)
    finally:
        child.kill()
    assert child.returncode == 0, output[-5000:]
    return TwoRuns(here, there, files_with_hashes(here / "results"), files_with_hashes(there / "results"))
