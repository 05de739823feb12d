"""A write that fails part-way leaves no trace: clean error naming the path, temp removed, previous file intact.

Real kernel errors come from `RLIMIT_FSIZE` in a child process (with SIGXFSZ ignored the kernel answers
EFBIG instead of killing the process): set before the write, it fails the up-front allocation; set after the
first batch has been written, it fails a `pwrite` in the middle of the file. Other faults (ENOSPC on a later
write, EIO on fsync or on the checksum read-back, Ctrl-C between batches) are injected in-process.
The CLI must exit 1 with the output path in its message. SIGKILL of the CLI is covered by
`emo_assets_tests/test_extract_cli.py::test_sigkill_mid_write_leaves_no_file_and_keeps_the_previous_one`.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

from emo_assets.core.activations import (
    ActivationFile,
    ActivationHeader,
    ActivationWriteError,
    ActivationWriter,
    fileio,
    write_activation_file,
)
from emo_assets.core.atomic import atomic_path, temp_path_for, write_bytes_atomic
from emo_assets.core.extraction import ExtractionOptions, extract_to_file
from emo_assets.extract import main as extract_main
from emo_assets_tests.reliability.helpers import dataset_env, run_cli_with, run_python, temp_files

N_LAYERS, D_MODEL = 4, 64
LENGTHS = [50] * 40  # 40 sentences of 50 tokens: ~3.3 MB in float32 with two kinds


def layout(lengths=LENGTHS):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, np.arange(offsets[-1], dtype=np.int64) % 1000


def arrays(seed: int, lengths=LENGTHS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (N_LAYERS, int(sum(lengths)), D_MODEL)
    return {kind: rng.standard_normal(shape).astype(np.float32) for kind in ("resid_post", "mlp_out")}


def write_good(final, seed=0, lengths=LENGTHS):
    offsets, ids = layout(lengths)
    return write_activation_file(final, arrays(seed, lengths), offsets=offsets, input_ids=ids, header=header(seed))


def header(seed: int) -> ActivationHeader:
    """A header for the test arrays; the seed goes into a provenance field, so each run's file differs."""
    return ActivationHeader(n_layers=N_LAYERS, d_model=D_MODEL, kinds=("resid_post", "mlp_out"), model_id=f"run-{seed}")


def assert_untouched(final, previous: bytes) -> None:
    assert final.read_bytes() == previous, "the previous file was modified"
    ActivationFile(final)  # and still verifies
    assert temp_files(final.parent) == [], "a temp file was left behind"


# -- core writer, real kernel errors in a child process ------------------------------------------------

# The child writes a new version of FINAL one batch (sentence) at a time; LIMIT_AT says when RLIMIT_FSIZE
# drops to LIMIT bytes: "start" (before the writer opens) or "batch" (after the first batch is on disk).
CHILD = """
import json, resource, signal, sys
import numpy as np
from emo_assets.core.activations import ActivationHeader, ActivationWriter, ActivationWriteError
final, limit_at, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def limit_now():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
lengths = [50] * 40
offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
rng = np.random.default_rng(1)
if limit_at == "start":
    limit_now()
batches = 0
try:
    header = ActivationHeader(n_layers=4, d_model=64, kinds=("resid_post", "mlp_out"), model_id="child")
    with ActivationWriter(final, header, offsets=offsets, input_ids=np.arange(offsets[-1]) % 1000) as writer:
        for index in range(len(lengths)):
            batch = {k: rng.standard_normal((4, 50, 64)).astype(np.float32) for k in writer.kinds}
            writer.write_batch(batch, [index], [50])
            batches += 1
            if limit_at == "batch" and batches == 1:
                limit_now()
        writer.commit()
    print(json.dumps({"ok": True}))
except ActivationWriteError as exc:
    print(json.dumps({"ok": False, "errno": exc.errno, "message": str(exc), "batches": batches}))
"""


@pytest.mark.parametrize("limit_at", ["start", "batch"], ids=["before-first-byte", "mid-file"])
def test_efbig_from_rlimit_fsize_is_a_clean_write_error(tmp_path, limit_at):
    final = tmp_path / "out" / "activations_anger.safetensors"
    write_good(final, seed=0)
    previous = final.read_bytes()
    result = run_python(CHILD, os.environ, str(final), limit_at, str(len(previous) // 2), timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["ok"] is False, "the write succeeded despite the file-size limit"
    assert outcome["errno"] == errno.EFBIG
    assert str(final) in outcome["message"] and "File too large" in outcome["message"]
    if limit_at == "batch":
        assert 1 <= outcome["batches"] < len(LENGTHS), "the failure did not happen mid-file"
    else:
        assert outcome["batches"] == 0
    assert_untouched(final, previous)


# -- core writer, injected faults ----------------------------------------------------------------------


# Each fault is injected into every way the writer could perform the operation (its internals may change:
# single or vectored writes, mmap or read-back for the checksum), with one call counter shared by all of them.
FAULTS = {
    "enospc-mid-file": (("os.pwrite", "os.pwritev", "os.write"), errno.ENOSPC),
    "eio-on-fsync": (("os.fsync", "os.fdatasync"), errno.EIO),
    "eio-on-checksum-read-back": (("os.pread", "os.preadv", "os.read", "mmap.mmap"), errno.EIO),
}


def _inject(monkeypatch, names, code: int, fail_from: float) -> dict:
    """Make the functions `names` (as the writer's I/O module sees them) raise OSError(code) from the
    `fail_from`-th call on, counted over all of them; returns the counter."""
    calls = {"n": 0}
    for name in names:
        module_name, attribute = name.split(".")
        module = getattr(fileio, module_name, None)
        real = getattr(module, attribute, None)
        if real is None:
            continue

        def flaky(*args, _real=real, **kwargs):
            calls["n"] += 1
            if calls["n"] >= fail_from:
                raise OSError(code, os.strerror(code))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, attribute, flaky)
    return calls


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_io_error_is_a_clean_write_error(tmp_path, monkeypatch, fault):
    names, code = FAULTS[fault]
    final = tmp_path / "activations_anger.safetensors"
    write_good(final, seed=0)
    previous = final.read_bytes()
    counted = _inject(monkeypatch, names, code, float("inf"))  # dry run: how many calls does a write make?
    write_good(tmp_path / "dry.safetensors", seed=1)
    monkeypatch.undo()
    (tmp_path / "dry.safetensors").unlink()
    assert counted["n"] >= 1, f"{fault}: the writer uses none of {names}; update FAULTS"
    fail_from = max(2, counted["n"] // 2 + 1) if code == errno.ENOSPC else 1  # ENOSPC: half-way through
    calls = _inject(monkeypatch, names, code, fail_from)
    with pytest.raises(ActivationWriteError) as caught:
        write_good(final, seed=1)
    monkeypatch.undo()
    assert calls["n"] >= fail_from, "the fault was never reached"
    assert caught.value.errno == code
    assert str(final) in str(caught.value)
    assert_untouched(final, previous)


def test_interrupt_between_batches_removes_the_temp(tmp_path, offline_models, small_datasets, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during an extraction: the writer's context manager cleans up."""
    final = tmp_path / "activations_anger.safetensors"
    texts = [f"Sentence number {i} is here to be extracted." for i in range(12)]
    ids = [f"s{i}" for i in range(12)]
    extract_to_file(offline_models["tiny-gpt2"], texts, ids, final, ExtractionOptions(batch_size=2))
    previous = final.read_bytes()
    real = ActivationWriter.write_batch
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ActivationWriter, "write_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(offline_models["tiny-gpt2"], texts[::-1], ids, final, ExtractionOptions(batch_size=2))
    assert calls["n"] == 3
    assert_untouched(final, previous)


def test_failing_rename_at_commit_is_a_clean_write_error(tmp_path):
    """The final path is occupied by a directory: the rename fails; the temp must still be removed."""
    final = tmp_path / "activations_anger.safetensors"
    (final / "something").mkdir(parents=True)
    with pytest.raises(ActivationWriteError, match=str(final)):
        write_good(final, seed=1)
    assert temp_files(tmp_path) == []
    assert (final / "something").is_dir()


def test_stale_temp_of_an_earlier_process_with_this_pid_is_removed(tmp_path):
    """A killed container's entry point was PID 1 and the restarted one is PID 1 again: the leftover temp file
    carries a live pid (ours) but is not ours, and must not stay forever (activation temps are gigabytes)."""
    final = tmp_path / "activations_anger.safetensors"
    leftover = final.with_name(f".{final.name}.tmp-{os.getpid()}-0badc0de")
    leftover.write_bytes(b"half a file of a killed run")
    live = temp_path_for(final)  # this process's own unfinished write: kept
    live.write_bytes(b"in progress")
    write_good(final, seed=0)
    assert not leftover.exists()
    assert live.exists()
    ActivationFile(final)


@pytest.mark.parametrize("writer", ["atomic_path", "write_bytes_atomic"])
def test_atomic_helpers_clean_up_on_a_failing_rename(tmp_path, writer):
    final = tmp_path / "table.parquet"
    (final / "something").mkdir(parents=True)
    with pytest.raises(OSError):
        if writer == "atomic_path":
            with atomic_path(final) as temp:
                temp.write_bytes(b"data")
        else:
            write_bytes_atomic(final, b"data")
    assert temp_files(tmp_path) == []


def test_atomic_path_under_rlimit_fsize_keeps_the_previous_file(tmp_path):
    """The helper every Parquet / JSON / PNG output goes through, with a real EFBIG from the kernel."""
    final = tmp_path / "table.bin"
    final.write_bytes(b"previous good content")
    code = (
        "import resource, signal, sys\n"
        "from emo_assets.core.atomic import atomic_path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    with atomic_path(sys.argv[1]) as temp:\n"
        "        with open(temp, 'wb') as handle:\n"
        "            handle.write(b'x' * 100_000)\n"
        "except OSError as exc:\n"
        "    print('failed', exc.errno)\n"
    )
    result = run_python(code, os.environ, str(final), timeout=60)
    assert result.stdout.strip() == f"failed {errno.EFBIG}", result.stderr
    assert final.read_bytes() == b"previous good content"
    assert temp_files(tmp_path) == []


# -- the CLI -------------------------------------------------------------------------------------------

# Drop RLIMIT_FSIZE to half the size of the (fully pre-allocated) temp file once the first batch is written.
MID_FILE_LIMIT = """
import glob, os, resource, signal
from emo_assets.core.activations import ActivationWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_real = ActivationWriter.write_batch
def _write_batch(self, *args, **kwargs):
    _real(self, *args, **kwargs)
    if not getattr(self, "_limited", False):
        self._limited = True
        size = max(os.path.getsize(p) for p in glob.glob(str(self.final_path.parent / ".*.tmp-*")))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
ActivationWriter.write_batch = _write_batch
"""


@pytest.mark.slow
def test_cli_write_failure_exits_1_naming_the_path(tmp_path, small_datasets, offline_models, monkeypatch, capsys):
    """EFBIG in the middle of the file (the before-first-byte case is covered on the writer above)."""
    env = dataset_env(small_datasets)
    monkeypatch.setenv("EMO_ASSETS_DATASETS", env["EMO_ASSETS_DATASETS"])
    out = tmp_path / "out"
    args = [
        "--model",
        "tiny-gpt2",
        "--dataset",
        str(small_datasets["baseline"]),
        "--output",
        str(out),
        "--emotion",
        "anger",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    assert extract_main(args) == 0
    capsys.readouterr()
    final = out / "activations_anger.safetensors"
    previous = final.read_bytes()

    result = run_cli_with(MID_FILE_LIMIT, args + ["--prepend-bos"], env)  # a different file than the previous one
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"{final}: write failed" in error[0] and "File too large" in error[0], result.stderr
    assert "Traceback" not in result.stderr
    assert_untouched(final, previous)
