"""Disk cost up front, on a real small filesystem (an 8 MiB tmpfs, mounted here: needs root, skipped otherwise).

The extraction computes the exact bytes it will write before writing; when the filesystem cannot hold them plus
the margin it refuses (CLI: exit 2; Dagster: a failed step) naming the estimate, the free space and the folder,
and writes nothing. `--estimate` prints the same numbers without extracting. The written files' sizes (`os.stat`)
equal the estimate.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from emo_assets.core.activations.diskspace import MARGIN_BYTES, MARGIN_FRACTION
from emo_assets.extract import main
from emo_assets_tests.reliability.helpers import temp_files


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_free: int) -> Path:
    """A filler file that leaves about `leave_free` bytes free (tmpfs counts whole pages)."""
    filler = mount / "filler"
    filler.unlink(missing_ok=True)
    size = shutil.disk_usage(mount).free - leave_free
    with open(filler, "wb") as handle:
        handle.truncate(0)
        handle.write(b"\1" * size)  # real pages: a sparse file would not take the space
    return filler


def _needed(output: str) -> int:
    return int(re.search(r"disk: .* \((\d+) bytes\) to write in", output)[1])


def test_refusal_and_estimate_on_a_real_small_filesystem(small_fs, small_datasets, monkeypatch, capsys):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    out = small_fs / "acts"
    args = ["--model", "tiny-gpt2", "--dataset", str(small_datasets["extended"]), "--output", str(out), "--no-progress"]

    assert main([*args, "--estimate"]) == 0
    printed = capsys.readouterr().out
    needed = _needed(printed)
    per_file = {Path(p): int(n) for p, n in re.findall(r"^(\S+\.safetensors): (\d+) bytes$", printed, re.M)}
    assert sum(per_file.values()) == needed and len(per_file) == 4
    assert not out.exists()  # an estimate writes nothing
    margin = int(needed * MARGIN_FRACTION) + MARGIN_BYTES

    _fill(small_fs, needed + margin - 64 * 1024)
    free = shutil.disk_usage(small_fs).free
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"not enough disk space in {out}" in err and f"({needed} bytes, estimated before writing)" in err
    assert f"only {free / 2**20:.2f} MiB are free" in err and err.count("\n") == 1  # one line, no traceback
    assert not out.exists() and not temp_files(small_fs)

    _fill(small_fs, needed + margin + 256 * 1024)
    assert main(args) == 0
    assert _needed(capsys.readouterr().out) == needed
    assert {path: os.stat(path).st_size for path in out.iterdir()} == per_file  # the estimate is exact
    assert not temp_files(small_fs)


def test_dagster_step_fails_naming_the_estimate(small_fs, small_datasets, tmp_path):
    import dagster as dg

    from emo_assets.definitions import build_defs
    from emo_assets.defs.activations import activations_key
    from emo_assets.defs.jobs import LOAD_MODELS, datasets_job
    from emo_assets.defs.partitions import partitions_for
    from emo_assets_tests.defs.conftest import make_settings
    from emo_assets_tests.pipeline import run_jobs

    settings = make_settings(
        tmp_path,
        {"baseline": small_datasets["baseline"]},
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        EMO_ASSETS_MODELS="tiny-gpt2",
        EMO_ASSETS_RESULTS_DIR=str(small_fs / "results"),
    )
    defs = build_defs(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
        _fill(small_fs, MARGIN_BYTES)  # less than any extraction's margin alone
        key = partitions_for(settings).key("tiny-gpt2", "anger")
        before = sorted(p for p in small_fs.rglob("*"))
        result = dg.materialize(
            [*defs.assets],
            selection=[activations_key("baseline")],
            instance=instance,
            resources=defs.resources,
            partition_key=key,
            raise_on_error=False,
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "not enough disk space in " in message and "bytes, estimated before writing" in message
    assert "activations" in message and "MiB are free" in message
    assert sorted(p for p in small_fs.rglob("*")) == before  # nothing written
