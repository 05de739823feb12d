"""Shared helpers of the reliability tests: tree snapshots, temp-file scans, subprocess launchers.

Every test here writes under `tmp_path` only. Subprocesses get the session's private model cache
(`EMO_ASSETS_MODEL_CACHE`, set by the top-level conftest) through `os.environ`, so the tiny offline models are
built once per session and reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from emo_assets_tests.conftest import REPO_ROOT
from emo_assets_tests.pipeline import pipeline_env

# The name `emo_assets.core.atomic.temp_path_for` gives temp files: `.<final name>.tmp-<pid>-<hex>`.
TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")
PYTHON = sys.executable


def temp_files(root: Path) -> list[Path]:
    """Every temp file or folder (atomic-write naming) anywhere under `root`."""
    return sorted(p for p in Path(root).rglob("*") if TEMP_RE.match(p.name))


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (kind, size) of everything under `root` (kind: d, f, l)."""
    root = Path(root)
    snapshot = {}
    for path in sorted(root.rglob("*")):
        kind = "l" if path.is_symlink() else "d" if path.is_dir() else "f"
        snapshot[str(path.relative_to(root))] = (kind, 0 if kind != "f" else path.stat().st_size)
    return snapshot


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dataset_env(datasets: Mapping[str, Path], **extra: str) -> dict[str, str]:
    """os.environ plus `EMO_ASSETS_DATASETS` naming `datasets` (so the tiny models' tokenizer corpus matches
    the session's `offline_models`: a model-cache hit) plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMO_ASSETS_") or k == "EMO_ASSETS_MODEL_CACHE"}
    env["EMO_ASSETS_DATASETS"] = ",".join(f"{k}={v}" for k, v in datasets.items())
    env.update(extra)
    return env


def run_python(
    code: str, env: Mapping[str, str], *args: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", code, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO_ROOT,
    )


def extract_command(model: str, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "emo_assets.extract",
        "--model",
        model,
        "--dataset",
        str(dataset),
        "--output",
        str(output),
        "--no-progress",
        *extra,
    ]


# Runs `emo_assets.extract.main(sys.argv[1:])` in a child after `PRELUDE` (Python code) has run: the place to
# set resource limits or wrap functions for fault injection.
CLI_WRAPPER = """
import sys
{prelude}
from emo_assets.extract import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli_with(prelude: str, args: Sequence[str], env: Mapping[str, str], timeout: float = 300):
    return run_python(CLI_WRAPPER.format(prelude=prelude), env, *args, timeout=timeout)


# -- Dagster -------------------------------------------------------------------------------------------

UNREACHABLE_MLFLOW = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused at once


def dagster_env(root: Path, datasets: Mapping[str, Path], **extra: str) -> dict[str, str]:
    """EMO_ASSETS_* values of a test pipeline under `root` (results, DAGSTER_HOME) on `datasets`; MLflow unreachable."""
    return pipeline_env(root, datasets, UNREACHABLE_MLFLOW, **extra)


def dagster_settings(root: Path, datasets: Mapping[str, Path], **extra: str):
    from emo_assets.core.config import load_settings

    return load_settings(dagster_env(root, datasets, **extra))


def step_failures(result, *, causes: bool = True) -> dict[str, str]:
    """step key -> failure text of a run: the dg.Failure description, else the error message followed (with
    `causes`) by the messages of its causes (a plain exception in an asset is wrapped by Dagster)."""
    failures = {}
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            user = data.user_failure_data
            if user and user.description:
                failures[event.step_key] = user.description
                continue
            texts, error = [], data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause if causes else None
            failures[event.step_key] = "\n".join(texts)
    return failures


def files_with_hashes(root: Path, *, skip: Sequence[str] = ()) -> dict[str, str]:
    """relative path -> sha256 of every regular file under `root` (temp files included), minus `skip` globs."""
    root = Path(root)
    skipped = {p for pattern in skip for p in root.glob(pattern)}
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file() and p not in skipped}
