"""The typed header and old files: a committed format-version-1 file (written by the writer before the storage
module was split) is read by today's reader and written back byte for byte; unknown or newer versions are refused
with the file named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from emo_assets.core.activations import (
    ActivationFile,
    ActivationFileError,
    ActivationHeader,
    ReuseRecord,
    ReuseSource,
    write_activation_file,
)

VERSION_1 = Path(__file__).resolve().parents[1] / "data" / "activations_v1" / "activations_gratitude.safetensors"


def test_version_1_file_is_read():
    stored = ActivationFile(VERSION_1)  # verifies the checksum
    plain = load_file(VERSION_1)  # safetensors' own reader, independent of ours
    with safe_open(VERSION_1, framework="numpy") as handle:
        raw_meta = handle.metadata()
    header = stored.header
    assert header.format_version == 1 and raw_meta["format_version"] == "1"
    assert (header.model_id, header.architecture, header.emotion, header.dataset_variant) == (
        "tiny-gpt2",
        "GPT2Model",
        "gratitude",
        "baseline",
    )
    assert (header.storage_dtype, header.compute_dtype, header.prepend_bos, header.truncated_to_context) == (
        "float16",
        "float32",
        True,
        False,
    )
    assert (header.n_layers, header.d_model, header.kinds) == (4, 64, ("resid_post", "mlp_out"))
    assert header.hook_points["mlp_out"] == ["h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3.mlp"]
    assert header.model_revision == raw_meta["model_revision"] and len(header.model_revision) == 64
    assert header.checksum == raw_meta["data_xxh3_128"]
    assert header.reuse is None
    assert stored.sentence_ids == ["g1", "g2"]
    np.testing.assert_array_equal(stored.offsets, plain["offsets"])
    np.testing.assert_array_equal(stored.input_ids, plain["input_ids"])
    assert (stored.n_sentences, stored.n_tokens) == (2, int(plain["offsets"][-1])) == (2, header.n_tokens)
    bos = stored.input_ids[stored.offsets[:-1]]
    assert set(bos.tolist()) == {0}  # prepend_bos: every sentence starts with the tiny models' BOS id
    for kind in header.kinds:
        expected = plain[kind].astype(np.float32)
        for layer in range(header.n_layers):
            np.testing.assert_array_equal(stored.layer(kind, layer), expected[layer])
            np.testing.assert_array_equal(stored.sentence_end(kind, layer), expected[layer, stored.offsets[1:] - 1])
            np.testing.assert_array_equal(stored.sentence(kind, layer, 1), expected[layer, stored.offsets[1] :])


def test_version_1_file_is_written_back_byte_for_byte(tmp_path):
    """Header through `ActivationHeader` and data through the writer: the same bytes as the old writer's."""
    stored = ActivationFile(VERSION_1)
    arrays = {kind: stored.raw(kind) for kind in stored.kinds}
    again = write_activation_file(
        tmp_path / VERSION_1.name, arrays, offsets=stored.offsets, input_ids=stored.input_ids, header=stored.header
    )
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(VERSION_1.read_bytes()).digest()


def test_header_round_trips_through_metadata():
    header = ActivationHeader(
        n_layers=2,
        d_model=3,
        kinds=("resid_post", "mlp_out", "attn_out"),
        storage_dtype="bfloat16",
        n_sentences=2,
        n_tokens=5,
        model_id="m",
        model_revision="r",
        prepend_bos=False,
        sentence_ids=("é", "b"),
        emotion="anger",
        hook_points={"resid_post": ["h.0", "h.1"]},
        reuse=ReuseRecord(computed=1, reused=1, sources=(ReuseSource("a/b.safetensors", "f" * 32, 1),)),
        positions="last:3",
        layers=(1,),
        n_rows=4,
    )
    meta = header.to_metadata()
    assert (meta["format_version"], meta["positions"], meta["layers"], meta["n_rows"]) == ("2", "last:3", "[1]", "4")
    assert all(isinstance(v, str) for v in meta.values())
    assert "dataset_path" not in meta  # None fields are not recorded
    back = ActivationHeader.from_metadata(meta)
    assert back == header and back.reuse == header.reuse


def _file_with_metadata(path: Path, **changes: str) -> Path:
    meta = ActivationHeader(n_layers=1, d_model=2, kinds=("resid_post",), n_sentences=1, n_tokens=1).to_metadata()
    meta.update(changes)
    tensors = {
        "input_ids": np.zeros(1, np.int64),
        "offsets": np.array([0, 1], np.int64),
        "resid_post": np.zeros((1, 1, 2), np.float32),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    ("version", "reason"), [("3", "newer than this emo_assets reads"), ("x", "is unknown"), ("0", "is unknown")]
)
def test_unknown_or_newer_format_version_is_refused_naming_the_file(tmp_path, version, reason):
    path = _file_with_metadata(tmp_path / "future.safetensors", format_version=version)
    with pytest.raises(ActivationFileError, match=reason) as caught:
        ActivationFile(path, verify=False)
    assert str(path) in str(caught.value)


def test_other_formats_and_malformed_fields_are_refused(tmp_path):
    with pytest.raises(ActivationFileError, match="not an emo_assets activation file"):
        ActivationFile(_file_with_metadata(tmp_path / "other.safetensors", format="something.else"), verify=False)
    with pytest.raises(ActivationFileError, match="'n_layers' is malformed"):
        ActivationFile(_file_with_metadata(tmp_path / "bad.safetensors", n_layers="four"), verify=False)


def test_header_and_tensors_must_agree(tmp_path):
    path = _file_with_metadata(tmp_path / "kinds.safetensors", kinds='["resid_post", "mlp_out"]')
    with pytest.raises(ActivationFileError, match="do not match the header"):
        ActivationFile(path, verify=False)
