"""SIGKILL during an extraction of every emotion, then a rerun.

* Sharded (a tiny shard bound, so that each emotion's partition really is several shards): the kill loses at most
  the wave of shards in flight; the rerun forwards only the sentences no published shard holds (counted with a
  hook on the forward loop) and its files equal a from-scratch extraction within 1e-5.
* Not sharded: the kill leaves one temp file per emotion; a later run of ONE emotion clears them all (their
  writer is gone), while temps of a writer that still runs stay (`test_storage`).

The child is the real CLI, slowed down by a sleep per batch (so the kill lands mid-run), killed with SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from emo_assets.core import extraction
from emo_assets.core.activations import ActivationFile
from emo_assets.core.activations.shards import shard_folder
from emo_assets.core.config import PACKAGED_CONFIG
from emo_assets.extract import main
from emo_assets_tests.conftest import read_records
from emo_assets_tests.reliability.helpers import CLI_WRAPPER, PYTHON, dataset_env, temp_files

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
SLOW = """
import time
from emo_assets.core import extraction
_batch = extraction.ForwardStream._host_batch
def _slow(self, *args, **kwargs):
    time.sleep(0.05)
    return _batch(self, *args, **kwargs)
extraction.ForwardStream._host_batch = _slow
"""


def _config(tmp_path: Path, shard_sentences: int) -> Path:
    text = PACKAGED_CONFIG.read_text(encoding="utf-8").replace(
        "shard_sentences = 0", f"shard_sentences = {shard_sentences}"
    )
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _kill_when(args: list[str], env: dict, ready, timeout: float = 120) -> None:
    process = subprocess.Popen(
        [PYTHON, "-c", CLI_WRAPPER.format(prelude=SLOW), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"the extraction ended before it could be killed: {process.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def _published_shards(out: Path) -> dict[str, list[Path]]:
    return {e: sorted(shard_folder(out / f"activations_{e}.safetensors").glob("shard-*")) for e in EMOTIONS}


def test_sigkill_mid_partition_resumes_from_the_published_shards(tmp_path, small_datasets, monkeypatch):
    dataset = small_datasets["extended"]  # 8 sentences per emotion, 3 per shard: 3 shards each
    env = dataset_env(small_datasets, EMO_ASSETS_CONFIG=str(_config(tmp_path, 3)))
    out = tmp_path / "out"
    args = ["--model", "tiny-gpt2", "--dataset", str(dataset), "--output", str(out), "--no-progress"]
    args += ["--batch-size", "1"]
    _kill_when(args, env, lambda: all(len(s) >= 2 for s in _published_shards(out).values()))

    published = _published_shards(out)
    assert not any((out / f"activations_{e}.safetensors").exists() for e in EMOTIONS)  # no manifest yet
    done = sum(ActivationFile(p).n_sentences for shards in published.values() for p in shards)
    total = len(read_records(dataset))
    assert 0 < done < total

    forwarded = []
    original = extraction.ForwardStream._host_batch

    def counting(self, writers, batch, *rest):
        forwarded.extend(batch)
        return original(self, writers, batch, *rest)

    for key, value in env.items():
        if key.startswith("EMO_ASSETS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(extraction.ForwardStream, "_host_batch", counting)
    assert main(args) == 0
    assert len(forwarded) == total - done  # only the sentences no published shard holds
    assert not temp_files(out)
    for emotion in EMOTIONS:
        resumed = ActivationFile(out / f"activations_{emotion}.safetensors")
        assert resumed.header.shards is not None and len(resumed.header.shards) >= 2
        assert set(published[emotion]) <= set(resumed.files)

    monkeypatch.setattr(extraction.ForwardStream, "_host_batch", original)
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("EMO_ASSETS_CONFIG", str(PACKAGED_CONFIG))
    assert main(["--model", "tiny-gpt2", "--dataset", str(dataset), "--output", str(scratch), "--no-progress"]) == 0
    for emotion in EMOTIONS:
        name = f"activations_{emotion}.safetensors"
        a, b = ActivationFile(out / name), ActivationFile(scratch / name)
        assert b.header.shards is None and a.sentence_ids == b.sentence_ids
        np.testing.assert_array_equal(a.offsets, b.offsets)
        for kind in b.kinds:
            np.testing.assert_allclose(a.raw(kind), b.raw(kind), atol=1e-5, rtol=1e-5)


def test_a_later_run_of_one_emotion_clears_every_stale_temp(tmp_path, small_datasets, monkeypatch):
    env = dataset_env(small_datasets)
    out = tmp_path / "out"
    dataset = small_datasets["extended"]
    args = ["--model", "tiny-gpt2", "--dataset", str(dataset), "--output", str(out), "--no-progress"]
    _kill_when([*args, "--batch-size", "1"], env, lambda: out.is_dir() and len(temp_files(out)) == len(EMOTIONS))
    stale = temp_files(out)
    assert {p.name.split(".tmp-")[0] for p in stale} == {f".activations_{e}.safetensors" for e in EMOTIONS}

    for key, value in env.items():
        if key.startswith("EMO_ASSETS_"):
            monkeypatch.setenv(key, value)
    assert main([*args, "--emotion", "anger"]) == 0
    assert temp_files(out) == []  # the other emotions' temps too: their writer is gone
    assert [p.name for p in out.iterdir()] == ["activations_anger.safetensors"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The killed child and this process share 2 cores: one OpenMP thread each keeps the timing predictable."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
