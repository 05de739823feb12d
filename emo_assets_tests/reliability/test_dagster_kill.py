"""SIGKILL of `emo-assets materialize` in the middle of a write, then a rerun on the same DAGSTER_HOME.

A session fixture runs the extraction jobs of the offline profile (both variants, four models, small datasets)
in this process, on a persistent instance made from the committed `dagster.yaml` template (so the `torch`
pool has one slot, as in real use). Then three `emo-assets materialize` processes are killed (SIGKILL to the
whole process group) at the worst moments:

1. `emotion_dataset` has written a Parquet temp file completely but not renamed it yet,
2. an analysis output is complete but not renamed yet,
3. an activation file is half written (after its first batch).

After each kill every published file is byte-identical to before and the killed write's temp file is
there. A fourth, plain run must then succeed (the killed runs' pool slot released), leave no temp file
anywhere and reproduce every file byte for byte.

The fixture `extraction_twice` (conftest.py) also feeds `test_determinism.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from emo_assets_tests.reliability.helpers import PYTHON, dagster_env, files_with_hashes, temp_files

pytestmark = pytest.mark.slow

# Runs `emo-assets materialize ARGS` after arranging to hang (RELIABILITY_HANG) at one write, writing
# RELIABILITY_MARKER when it got there.
HANGING_CLI = """
import os, sys, time
from pathlib import Path
what, marker = os.environ["RELIABILITY_HANG"], Path(os.environ["RELIABILITY_MARKER"])
def hang(where):
    marker.write_text(where)
    while True:
        time.sleep(60)
if what == "activations":
    from emo_assets.core.activations import ActivationWriter
    write_batch = ActivationWriter.write_batch
    def first_batch_then_hang(self, *args, **kwargs):
        write_batch(self, *args, **kwargs)
        hang(str(self.final_path))
    ActivationWriter.write_batch = first_batch_then_hang
else:
    import emo_assets.core.atomic as atomic
    commit_temp = atomic.commit_temp
    def hang_before_rename(temp, final):
        if f"/{what}/" in str(final):
            hang(str(final))
        return commit_temp(temp, final)
    atomic.commit_temp = hang_before_rename
from emo_assets.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _published(results: Path) -> dict[str, str]:
    """sha256 of every published (non-temp) file under results, but the activations summaries: the killed runs
    cover one model, so their (completed, atomic) summary step legitimately rewrites them for that model."""
    temps = {str(p.relative_to(results)) for p in temp_files(results)}
    return {
        name: digest
        for name, digest in files_with_hashes(results).items()
        if name not in temps and "/summary/" not in f"/{name}"
    }


def _kill_at(root: Path, env: dict[str, str], what: str, args: list[str]) -> Path:
    """Start the hanging CLI, wait until it hangs in the `what` write, SIGKILL its process group."""
    marker = root / f"hanging-in-{what}"
    env = {**env, "RELIABILITY_HANG": what, "RELIABILITY_MARKER": str(marker)}
    process = subprocess.Popen(
        [PYTHON, "-c", HANGING_CLI, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before reaching the {what} write:\n{process.stdout.read()[-5000:]}")
            assert time.monotonic() < deadline, f"the run never reached the {what} write"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return Path(marker.read_text())


def test_sigkill_mid_write_then_rerun(extraction_twice, small_datasets):
    root = extraction_twice.here
    results = root / "results"
    env = {**os.environ, **dagster_env(root, small_datasets, EMO_ASSETS_MODELS="tiny-gpt2")}
    args = ["materialize", "--variant", "baseline"]
    good = _published(results)
    assert len([n for n in good if n.endswith(".safetensors")]) == 32 and temp_files(results) == []

    # 1. Parquet complete in its temp file, not renamed
    parquet = _kill_at(root, env, "datasets", args)
    assert parquet.suffix == ".parquet" and parquet.is_file()
    assert _published(results) == good, "a published file changed"
    left = temp_files(results)
    assert [p.name.split(".tmp-")[0] for p in left] == [f".{parquet.name}"]

    # 2. analysis output complete in its temp file, not renamed (the extraction was redone before: same bytes)
    analysis = _kill_at(root, env, "analysis", args)
    assert not analysis.exists(), "the analysis output was published despite the kill"
    assert _published(results) == good
    left = temp_files(results)
    assert [p.name.split(".tmp-")[0] for p in left] == [f".{analysis.name}"], "the Parquet temp was not cleaned"

    # 3. activation file half written (reuse off: an up-to-date file is otherwise kept, and nothing is written)
    activations = _kill_at(root, {**env, "EMO_ASSETS_BATCH_SIZE": "2", "EMO_ASSETS_REUSE": "0"}, "activations", args)
    assert activations.is_file()
    assert _published(results) == good
    # the model's emotions are extracted in one forward stream: every one of its files was being written
    streamed = [f".{path.name}" for path in sorted(activations.parent.glob("activations_*.safetensors"))]
    assert len(streamed) == 4 and f".{activations.name}" in streamed
    assert sorted(p.name.split(".tmp-")[0] for p in temp_files(results)) == sorted([f".{analysis.name}", *streamed])

    # 4. a plain rerun on the same instance
    try:
        rerun = subprocess.run(
            [PYTHON, "-m", "emo_assets.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the rerun hung (a killed run's `torch` pool slot was never released?)")
    assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-5000:]
    assert "its pool slots freed" in rerun.stdout
    assert temp_files(results) == [], "stale temp files survived a successful rerun"
    after = _published(results)
    assert {name: after.get(name) for name in good} == good, "the rerun did not reproduce the files"
    assert analysis.is_file()
    summary = json.loads((results / "baseline" / "summary" / "activations_summary.json").read_text())
    assert summary["total_files"] == 4  # one model x four emotions
