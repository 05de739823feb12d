"""The activation file format: round trip, safetensors compatibility, corruption detection, atomicity."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from emo_assets.core.activations import (
    ActivationFile,
    ActivationFileError,
    ActivationHeader,
    ActivationWriter,
    write_activation_file,
)
from emo_assets.core.atomic import atomic_path, remove_stale_temps, temp_path_for

OFFSETS = np.array([0, 3, 4, 9, 11])
IDS = np.arange(11) + 100
HEADER = ActivationHeader(n_layers=3, d_model=8, kinds=("resid_post", "mlp_out"))


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    return {kind: rng.standard_normal((3, 11, 8)).astype(np.float32) for kind in ("resid_post", "mlp_out")}


@pytest.fixture
def written(tmp_path, arrays):
    return write_activation_file(
        tmp_path / "activations_anger.safetensors",
        arrays,
        offsets=OFFSETS,
        input_ids=IDS,
        header=ActivationHeader(
            n_layers=3, d_model=8, kinds=tuple(arrays), emotion="anger", sentence_ids=tuple("abcd")
        ),
    )


def test_round_trip(written, arrays):
    stored = ActivationFile(written)
    assert (stored.n_layers, stored.n_tokens, stored.d_model, stored.n_sentences) == (3, 11, 8, 4)
    assert stored.kinds == ["resid_post", "mlp_out"]
    np.testing.assert_array_equal(stored.offsets, OFFSETS)
    np.testing.assert_array_equal(stored.input_ids, IDS)
    for kind, array in arrays.items():
        np.testing.assert_array_equal(stored.raw(kind), array)
        np.testing.assert_array_equal(stored.sentence_end(kind, 2), array[2, OFFSETS[1:] - 1])
        np.testing.assert_array_equal(stored.sentence(kind, 1, 2), array[1, 4:9])
    assert stored.sentence_ids == list("abcd")
    assert stored.header.emotion == "anger" and stored.metadata["emotion"] == "anger"


def test_plain_safetensors_readers_open_it(written, arrays):
    loaded = load_file(written)
    assert set(loaded) == {"resid_post", "mlp_out", "input_ids", "offsets"}
    np.testing.assert_array_equal(loaded["mlp_out"], arrays["mlp_out"])
    with safe_open(written, framework="numpy") as handle:
        assert handle.metadata()["format"] == "emo_assets.activations"


def test_batches_out_of_order_land_in_dataset_order(tmp_path, arrays):
    path = tmp_path / "a.safetensors"
    lengths = np.diff(OFFSETS)
    with ActivationWriter(path, HEADER, offsets=OFFSETS, input_ids=IDS) as writer:
        for batch in ([2, 0], [3, 1]):
            rows = np.concatenate([np.arange(OFFSETS[i], OFFSETS[i + 1]) for i in batch])
            writer.write_batch({k: a[:, rows] for k, a in arrays.items()}, batch, lengths[batch])
        writer.commit()
    for kind, array in arrays.items():
        np.testing.assert_array_equal(ActivationFile(path).raw(kind), array)


def test_incomplete_file_is_refused_and_nothing_published(tmp_path, arrays):
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="incomplete"):
        with ActivationWriter(path, HEADER, offsets=OFFSETS, input_ids=IDS) as writer:
            writer.write_batch({k: a[:, :3] for k, a in arrays.items()}, [0], [3])
            writer.commit()
    assert os.listdir(tmp_path) == []


def test_truncated_file_raises(written):
    data = written.read_bytes()
    written.write_bytes(data[:-100])
    with pytest.raises(ActivationFileError, match="truncated"):
        ActivationFile(written)
    written.write_bytes(data[:5])
    with pytest.raises(ActivationFileError, match="truncated"):
        ActivationFile(written)


def test_bit_flip_in_data_raises(written):
    data = bytearray(written.read_bytes())
    data[-17] ^= 0x04
    written.write_bytes(bytes(data))
    with pytest.raises(ActivationFileError, match="checksum mismatch"):
        ActivationFile(written)
    ActivationFile(written, verify=False)  # an explicit opt-out still opens it


def test_bit_flip_in_header_raises(written):
    data = bytearray(written.read_bytes())
    data[12] ^= 0x40
    written.write_bytes(bytes(data))
    with pytest.raises(ActivationFileError):
        ActivationFile(written)


def test_checksum_is_recorded(written):
    header = ActivationFile(written).header
    assert len(header.checksum) == 32 and header.checksum != "0" * 32


def test_atomic_path_keeps_previous_file_on_error(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as temp:
            temp.write_text("half")
            raise RuntimeError("boom")
    assert final.read_text() == "previous"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    final = tmp_path / "out.txt"
    dead = final.with_name(f".{final.name}.tmp-999999999-abcd1234")
    dead.write_text("left by a killed writer")
    mine = temp_path_for(final)
    mine.write_text("in progress")
    assert remove_stale_temps(final) == [dead]
    assert mine.exists()


def _resident_kib_of(path) -> int:
    """Resident KiB of this process's mappings of `path` (every mapping: ours and safetensors'), from smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_a_read_layer_leaves_no_pages_mapped(tmp_path):
    """Reading a layer copies it out and gives its mapped pages back, so reading every layer of a large file one at
    a time holds one layer, not the file (the values read are those written)."""
    rng = np.random.default_rng(3)
    n, d, layers = 4096, 128, 3
    array = rng.standard_normal((layers, n, d)).astype(np.float32)
    path = write_activation_file(
        tmp_path / "activations_joy.safetensors",
        {"resid_post": array},
        offsets=np.arange(n + 1),
        input_ids=np.arange(n),
        header=ActivationHeader(n_layers=layers, d_model=d, kinds=("resid_post",)),
    )
    stored = ActivationFile(path)
    layer_kib = n * d * 4 // 1024
    for layer in range(layers):
        np.testing.assert_array_equal(stored.sentence_end("resid_post", layer), array[layer])
        assert _resident_kib_of(path) < layer_kib // 8
    stored.mapped("resid_post")[1].sum()  # a plain read through the map keeps its pages until released
    assert _resident_kib_of(path) >= layer_kib
    stored.release("resid_post")
    assert _resident_kib_of(path) < layer_kib // 8
