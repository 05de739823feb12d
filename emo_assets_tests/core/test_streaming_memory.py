"""Extraction streams: however large the dataset, the activations pass through the writer one batch at a time.

Peak RSS is a noisy thing to assert on (allocator, page cache, other processes), so these tests check the
structure instead: `ActivationWriter.write_batch` is wrapped to record every batch it receives, and
 * it is called once per batch, each call carrying at most batch_size x max_len rows per layer;
 * the arrays of earlier batches are freed: when a batch arrives, at most `queue_depth + 1` earlier batches are
   still alive (the one being written on the writer thread and the one just handed over), never the dataset.
Also here: the zero-copy CPU capture falls back to copying when a model writes into a captured output in place,
and the accelerator code path (device gather + host buffer pool), run on the CPU, writes the same bytes.
No timing assertions.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import numpy as np
import pytest
import torch

from emo_assets.core.activations import ActivationFile, ActivationHeader, ActivationWriteError, ActivationWriter
from emo_assets.core.extraction import ExtractionOptions, extract_to_file, stream
from emo_assets.core.layers import find_hook_points
from emo_assets.core.models import load_model

BATCH = 8
REPEAT = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: two OpenMP threads stall on every op when the other core is busy
    (measured 0.4 s vs 28 s for the same 448 sentences); one thread keeps this module fast everywhere."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(small_texts):
    return load_model("tiny-gpt2", device="cpu", training_texts=lambda: small_texts)


@pytest.fixture(scope="module")
def dataset_8x(small_texts):
    texts = [t for _ in range(REPEAT) for t in small_texts]
    return texts, [f"s{i:05d}" for i in range(len(texts))]


def _arrays_of(activations, padded: bool) -> list[np.ndarray]:
    out = []
    for value in activations.values():
        out.extend(list(value) if padded else [value])
    return out


@pytest.fixture
def recorded(monkeypatch):
    """Wrap `ActivationWriter.write_batch`: record sizes, and how many earlier batches are still alive."""
    calls = []
    alive_refs: list[list[weakref.ref]] = []
    original = ActivationWriter.write_batch

    def wrapper(self, activations, sentence_indices, lengths, **kwargs):
        padded = kwargs.get("padded", False)
        arrays = _arrays_of(activations, padded)
        still_alive = sum(any(ref() is not None for ref in refs) for refs in alive_refs)
        lengths = list(lengths)
        calls.append(
            {
                "sentences": len(lengths),
                "max_len": max(lengths),
                "rows": sum(lengths),
                "padded": padded,
                "nbytes": sum(a.nbytes for a in arrays),
                "max_array_rows": max(a.size // a.shape[-1] for a in arrays),
                "earlier_alive": still_alive,
                "queue_depth": self._queue_depth if self._background else 0,
            }
        )
        alive_refs.append([weakref.ref(_owner(a)) for a in arrays])
        return original(self, activations, sentence_indices, lengths, **kwargs)

    monkeypatch.setattr(ActivationWriter, "write_batch", wrapper)
    return calls


def _owner(array: np.ndarray):
    """The object that owns an array's memory (a view's base chain ends at the tensor or ndarray that owns it)."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


@pytest.mark.parametrize("background", [True, False])
def test_8x_dataset_is_written_batch_by_batch(tiny, dataset_8x, recorded, tmp_path, background):
    texts, ids = dataset_8x
    result = extract_to_file(
        tiny, texts, ids, tmp_path / "big.safetensors", ExtractionOptions(batch_size=BATCH, background_write=background)
    )
    lengths = np.diff(ActivationFile(result.path).offsets)
    max_len = int(lengths.max())
    assert len(recorded) == math.ceil(len(texts) / BATCH) >= 50
    assert sum(c["sentences"] for c in recorded) == len(texts)
    n_kinds, n_layers, d = len(result.kinds), tiny.n_layers, tiny.d_model
    per_batch_bound = n_kinds * n_layers * BATCH * max_len * d * 4  # bytes of one full, padded fp32 batch
    whole = n_kinds * n_layers * result.n_tokens * d * 4
    for call in recorded:
        assert call["sentences"] <= BATCH
        assert call["max_array_rows"] <= BATCH * max_len
        assert call["nbytes"] <= per_batch_bound
        assert call["earlier_alive"] <= call["queue_depth"] + 1, call
    assert max(c["nbytes"] for c in recorded) * 20 < whole  # no call carries a large part of the dataset


def test_zero_copy_capture_falls_back_when_the_model_writes_in_place(tiny, small_texts, tmp_path, monkeypatch):
    """A pre-hook that modifies block 0's output (block 1's input) in place must not change what is stored."""
    texts, ids = small_texts[:20], [f"s{i}" for i in range(20)]
    block1 = find_hook_points(tiny.model).blocks[1]

    def clobber(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.mul_(1.0).add_(0.0)  # values unchanged, but the tensor is written in place (version bumps)
        return None

    def clobber_for_real(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.add_(1000.0)  # changes block 0's captured output after the hook saw it
        return None

    reference = extract_to_file(tiny, texts, ids, tmp_path / "ref.safetensors", ExtractionOptions(batch_size=4))
    handle = block1.register_forward_pre_hook(clobber, with_kwargs=True)
    try:
        same = extract_to_file(tiny, texts, ids, tmp_path / "same.safetensors", ExtractionOptions(batch_size=4))
    finally:
        handle.remove()
    assert _sha(same.path) == _sha(reference.path)

    handle = block1.register_forward_pre_hook(clobber_for_real, with_kwargs=True)
    try:
        real = extract_to_file(tiny, texts, ids, tmp_path / "real.safetensors", ExtractionOptions(batch_size=4))
    finally:
        handle.remove()
    stored, ref = ActivationFile(real.path), ActivationFile(reference.path)
    # block 0's output is stored as the model produced it (before the in-place +1000), not the clobbered tensor
    np.testing.assert_array_equal(stored.layer("resid_post", 0), ref.layer("resid_post", 0))
    assert np.abs(stored.layer("resid_post", 1) - ref.layer("resid_post", 1)).max() > 1.0


@pytest.mark.parametrize("storage_dtype, write_threads", [("float32", 0), ("bfloat16", 3), ("float16", 2)])
def test_device_path_on_cpu_writes_the_same_bytes(
    tiny, small_texts, tmp_path, monkeypatch, storage_dtype, write_threads
):
    """The accelerator path (gather on the device, host buffer pool, writer threads) gives the same file."""
    texts, ids = small_texts, [f"s{i}" for i in range(len(small_texts))]
    options = ExtractionOptions(batch_size=5, storage_dtype=storage_dtype, attention=True)
    host = extract_to_file(tiny, texts, ids, tmp_path / "host.safetensors", options)
    monkeypatch.setattr(stream, "HOST_DEVICES", ())
    device = extract_to_file(
        tiny,
        texts,
        ids,
        tmp_path / "device.safetensors",
        ExtractionOptions(
            batch_size=5, storage_dtype=storage_dtype, attention=True, write_threads=write_threads, length_sorted=True
        ),
    )
    assert device.n_nonfinite == host.n_nonfinite == 0
    assert _sha(device.path) == _sha(host.path)


@pytest.mark.parametrize("on_host", [True, False])
def test_dataset_order_batches_write_one_run_per_layer(tiny, small_texts, tmp_path, monkeypatch, on_host):
    """Dataset-order batches (the accelerator default) give the same activations as length-sorted ones, and each
    (kind, layer) of a batch is one contiguous write."""
    from emo_assets.core.activations import fileio

    texts, ids = small_texts, [f"s{i}" for i in range(len(small_texts))]
    sorted_file = extract_to_file(tiny, texts, ids, tmp_path / "sorted.safetensors", ExtractionOptions(batch_size=6))
    if not on_host:
        monkeypatch.setattr(stream, "HOST_DEVICES", ())
    runs = []
    real = fileio.write_unit
    monkeypatch.setattr(fileio, "write_unit", lambda fd, unit: (runs.append(len(unit)), real(fd, unit)))
    ordered = extract_to_file(
        tiny, texts, ids, tmp_path / "ordered.safetensors", ExtractionOptions(batch_size=6, length_sorted=False)
    )
    assert len(runs) == math.ceil(len(texts) / 6) * 2 * tiny.n_layers and set(runs) == {1}
    a, b = ActivationFile(sorted_file.path), ActivationFile(ordered.path)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    for kind in ("resid_post", "mlp_out"):
        np.testing.assert_allclose(a.raw(kind), b.raw(kind), atol=1e-5, rtol=1e-5)


def test_writer_thread_error_is_raised_and_nothing_is_published(tiny, small_texts, tmp_path, monkeypatch):
    from emo_assets.core.activations import fileio

    calls = {"n": 0}
    real = fileio.pwrite_all

    def failing(fd, data, position):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(28, "No space left on device")
        real(fd, data, position)

    monkeypatch.setattr(fileio, "pwrite_all", failing)
    texts, ids = small_texts, [f"s{i}" for i in range(len(small_texts))]
    with pytest.raises(ActivationWriteError, match="No space left"):
        extract_to_file(tiny, texts, ids, tmp_path / "out" / "a.safetensors", ExtractionOptions(batch_size=4))
    assert list((tmp_path / "out").iterdir()) == []


def test_nonfinite_values_are_counted(tiny, small_texts, tmp_path):
    mlp0 = find_hook_points(tiny.model).mlps[0]

    def poison(module, args, output):
        output = output.clone()
        output[0, 0, :3] = float("nan")
        return output

    handle = mlp0.register_forward_hook(poison, prepend=True)
    try:
        result = extract_to_file(
            tiny,
            small_texts[:10],
            [f"s{i}" for i in range(10)],
            tmp_path / "nan.safetensors",
            ExtractionOptions(batch_size=4),
        )
    finally:
        handle.remove()
    # 3 NaNs in row 0 of each of the 3 batches' mlp_out[0]; they propagate into later layers, so count >= 9
    assert result.n_nonfinite >= 9


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("short", [False, True])
def test_coalesced_writes_survive_short_pwritev(tmp_path, monkeypatch, short):
    """Neighbouring sentences go out as one pwritev; a short pwritev is finished buffer by buffer."""
    import os

    from emo_assets.core.activations import fileio

    rng = np.random.default_rng(3)
    offsets = np.array([0, 3, 4, 9, 11, 12])
    lengths = np.diff(offsets)
    full = {k: rng.standard_normal((2, 12, 8)).astype(np.float32) for k in ("resid_post", "mlp_out")}
    real = os.pwritev
    calls = []

    def pwritev(fd, buffers, position):
        calls.append(len(buffers))
        if short:  # write only part of the first buffer
            return os.pwrite(fd, bytes(memoryview(buffers[0]).cast("B")[:5]), position)
        return real(fd, buffers, position)

    monkeypatch.setattr(fileio.os, "pwritev", pwritev)
    path = tmp_path / "a.safetensors"
    header = ActivationHeader(n_layers=2, d_model=8, kinds=tuple(full))
    with ActivationWriter(path, header, offsets=offsets, input_ids=np.arange(12)) as writer:
        for batch in ([3, 1, 2], [0, 4]):  # padded layout: [n_layers, batch, width, d]
            width = max(lengths[batch])
            padded = {}
            for kind, array in full.items():
                out = np.zeros((2, len(batch), width, 8), dtype=np.float32)
                for j, i in enumerate(batch):
                    out[:, j, : lengths[i]] = array[:, offsets[i] : offsets[i + 1]]
                padded[kind] = out
            writer.write_batch(padded, batch, lengths[batch], padded=True)
        writer.commit()
    assert calls and max(calls) == 3  # sentences 1, 2, 3 are neighbours: one call per (kind, layer)
    for kind, array in full.items():
        np.testing.assert_array_equal(ActivationFile(path).raw(kind), array)


def test_windowed_map_hash_equals_read_back(tmp_path, monkeypatch):
    """The writer hashes its temp file through small memory-map windows (bounded RSS); same digest as reading."""
    import mmap
    import os

    from emo_assets.core.activations import fileio

    data = np.random.default_rng(5).bytes(5 * mmap.ALLOCATIONGRANULARITY + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    monkeypatch.setattr(fileio, "MAP_WINDOW", 2 * mmap.ALLOCATIONGRANULARITY)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start in (0, 17, mmap.ALLOCATIONGRANULARITY + 5):
            size = len(data) - start - 3
            assert fileio.hash_own_file(fd, start, size) == fileio.hash_data(fd, start, size)
    finally:
        os.close(fd)
