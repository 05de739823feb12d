"""Sharded partitions: a partition over the shard bound is written as shard files plus a manifest, read as one
file, and resumed shard by shard.

The reference is the same extraction written as one file (same options but no bound): rows agree within 1e-5 (the
batches differ: they are cut within each shard), and the manifest holds the same tokens and offsets. Sizes are
checked against `os.stat`; forwards are counted with a hook on the model.
"""

from __future__ import annotations

import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile, ActivationFileError
from emo_assets.core.activations.shards import shard_bounds, shard_folder, shard_path
from emo_assets.core.extraction import ExtractionJob, ExtractionOptions, extract_files, extract_to_file

SHARDED = {"shard_sentences": 7, "shard_max_bytes": 0}


@pytest.fixture(scope="module")
def tiny(offline_models):
    return offline_models["tiny-gpt2"]


@pytest.fixture(scope="module")
def sentences(small_texts):
    texts = small_texts[:30]
    return texts, [f"s{i:03d}" for i in range(len(texts))]


class Forwards:
    """Counts the sentences the model forwards (rows of every batch)."""

    def __init__(self, model) -> None:
        self.sentences = 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        self.sentences += len(kwargs["input_ids"])

    def __enter__(self) -> Forwards:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _equal_rows(a: ActivationFile, b: ActivationFile) -> None:
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.sentence_ids == b.sentence_ids
    for kind in b.kinds:
        np.testing.assert_allclose(a.raw(kind), b.raw(kind), atol=1e-5, rtol=1e-5)
        for layer in b.layers:
            np.testing.assert_allclose(a.sentence_end(kind, layer), b.sentence_end(kind, layer), atol=1e-5, rtol=1e-5)


def test_bounds_cut_contiguous_runs_within_both_limits():
    assert shard_bounds([1, 1, 1, 1, 1], 10, 0, 2) == [(0, 2), (2, 4), (4, 5)]
    assert shard_bounds([3, 1, 1, 5, 1], 10, 50, 0) == [(0, 3), (3, 4), (4, 5)]
    assert shard_bounds([9, 1], 10, 40, 0) == [(0, 1), (1, 2)]  # a sentence over the bound is a shard of its own
    assert shard_bounds([1, 2, 3], 10, 0, 0) == [(0, 3)]


@pytest.mark.parametrize("positions", ["all", "sentence_end"])
def test_sharded_partition_reads_as_one_file(tiny, sentences, tmp_path, positions):
    texts, ids = sentences
    one = extract_to_file(tiny, texts, ids, tmp_path / "one.safetensors", ExtractionOptions(positions=positions))
    options = ExtractionOptions(batch_size=4, positions=positions, **SHARDED)
    result = extract_to_file(tiny, texts, ids, tmp_path / "sharded.safetensors", options)
    shards = sorted(shard_folder(result.path).iterdir())
    assert [p.name for p in shards] == [f"shard-{k:05d}.safetensors" for k in range(5)]  # 30 sentences by 7
    assert result.files == (result.path, *shards)
    assert result.file_bytes == sum(p.stat().st_size for p in result.files) == result.estimated_bytes
    manifest = ActivationFile(result.path)
    assert manifest.files == list(result.files)
    assert {"resid_post", "mlp_out"}.isdisjoint(manifest.metadata) and len(manifest.header.shards) == 5
    assert [ActivationFile(p).n_sentences for p in shards] == [7, 7, 7, 7, 2]
    _equal_rows(manifest, ActivationFile(one.path))
    assert (result.reuse.computed, result.reuse.reused) == (30, 0)


def test_manifest_refuses_a_replaced_or_missing_shard(tiny, sentences, tmp_path):
    texts, ids = sentences
    result = extract_to_file(tiny, texts, ids, tmp_path / "a.safetensors", ExtractionOptions(**SHARDED))
    first, second = shard_path(result.path, 0), shard_path(result.path, 1)
    second.write_bytes(first.read_bytes())  # a valid file, but not the shard the manifest lists
    with pytest.raises(ActivationFileError, match="shard-00001.safetensors has checksum"):
        ActivationFile(result.path)
    second.unlink()
    with pytest.raises(ActivationFileError, match="cannot open"):
        ActivationFile(result.path)


def test_rerun_keeps_every_shard_and_the_manifest_byte_for_byte(tiny, sentences, tmp_path):
    texts, ids = sentences
    path = tmp_path / "a.safetensors"
    first = extract_files(tiny, [ExtractionJob(texts, ids, path, reuse_from=[path])], ExtractionOptions(**SHARDED))[0]
    before = {p: p.read_bytes() for p in first.files}
    with Forwards(tiny.model) as forwards:
        again = extract_files(tiny, [ExtractionJob(texts, ids, path, reuse_from=[path])], ExtractionOptions(**SHARDED))
    assert forwards.sentences == 0 and again[0].estimated_bytes == 0
    assert {p: p.read_bytes() for p in again[0].files} == before


def test_resume_forwards_only_the_sentences_of_missing_shards(tiny, sentences, tmp_path):
    """What a kill between shards leaves (shards 0-1 published, no manifest): the rerun forwards the rest only."""
    texts, ids = sentences
    path = tmp_path / "a.safetensors"
    done = extract_to_file(tiny, texts, ids, path, ExtractionOptions(**SHARDED))
    path.unlink()
    for k in (2, 3, 4):
        shard_path(path, k).unlink()
    with Forwards(tiny.model) as forwards:
        resumed = extract_files(
            tiny, [ExtractionJob(texts, ids, path, reuse_from=[path])], ExtractionOptions(**SHARDED)
        )
    assert forwards.sentences == 30 - 14
    assert (resumed[0].reuse.computed, resumed[0].reuse.reused) == (16, 14)
    scratch = extract_to_file(tiny, texts, ids, tmp_path / "scratch.safetensors", ExtractionOptions())
    _equal_rows(ActivationFile(path), ActivationFile(scratch.path))
    assert done.files == resumed[0].files


def test_fewer_shards_or_one_file_later_leave_no_orphan_shards(tiny, sentences, tmp_path):
    texts, ids = sentences
    path = tmp_path / "a.safetensors"
    extract_to_file(tiny, texts, ids, path, ExtractionOptions(**SHARDED))
    fewer = extract_to_file(tiny, texts, ids, path, ExtractionOptions(shard_sentences=15, shard_max_bytes=0))
    assert sorted(shard_folder(path).iterdir()) == [shard_path(path, 0), shard_path(path, 1)]
    ActivationFile(fewer.path)
    single = extract_to_file(tiny, texts, ids, path, ExtractionOptions(reuse=False))
    assert not shard_folder(path).exists() and single.files == (path,)
    assert ActivationFile(path).header.shards is None


def test_rows_are_reused_from_a_sharded_file(tiny, sentences, tmp_path):
    texts, ids = sentences
    sharded = extract_to_file(tiny, texts, ids, tmp_path / "a.safetensors", ExtractionOptions(**SHARDED))
    with Forwards(tiny.model) as forwards:
        copy = extract_to_file(
            tiny, texts[5:25], ids[5:25], tmp_path / "b.safetensors", ExtractionOptions(), reuse_from=[sharded.path]
        )
    assert forwards.sentences == 0 and copy.reuse.reused == 20
    source = ActivationFile(sharded.path)
    stored = ActivationFile(copy.path)
    for index in range(20):
        np.testing.assert_array_equal(stored.sentence("mlp_out", 2, index), source.sentence("mlp_out", 2, index + 5))


def test_the_analysis_reads_a_sharded_partition_as_one_file(tiny, sentences, tmp_path):
    """The analysis' loader (`ModelActivations`) gets the same arrays from sharded and single files."""
    from emo_assets.core.analysis.inputs import ModelActivations

    texts, ids = sentences
    loaded = {}
    for name, options in (("single", ExtractionOptions()), ("sharded", ExtractionOptions(**SHARDED))):
        files = {}
        for emotion, part in (("anger", slice(0, 15)), ("neutral", slice(15, 30))):
            path = tmp_path / name / f"activations_{emotion}.safetensors"
            extract_to_file(tiny, texts[part], ids[part], path, options)
            files[emotion] = ActivationFile(path)
        loaded[name] = ModelActivations.from_files("baseline", "tiny-gpt2", files)
    single, sharded = loaded["single"], loaded["sharded"]
    assert sharded.sentence_ids == single.sentence_ids and sharded.labels == single.labels
    np.testing.assert_array_equal(sharded.offsets, single.offsets)
    for kind in ("resid_post", "mlp_out"):
        np.testing.assert_allclose(sharded.sentence_end(kind), single.sentence_end(kind), atol=1e-5, rtol=1e-5)
        for a, b in zip(sharded.token_blocks(kind), single.token_blocks(kind)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
