"""Content-addressed extraction and one forward stream for several files.

What is asserted: rows are copied only for sentences whose token ids and file-level inputs (model revision,
dtypes, kinds, BOS) are identical, so a file with reused rows equals a from-scratch extraction within the
exactness tolerance of `test_extraction.py`; any change of revision, tokenizer, option or text forwards the
sentence again; `reuse=False` reproduces the from-scratch file byte for byte. Forwards are counted with a
pre-hook on the model (sentences per call), independently of the extraction's own bookkeeping.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace

import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile
from emo_assets.core.extraction import ExtractionJob, ExtractionOptions, extract_files, extract_to_file, stream
from emo_assets.core.offline_models import train_tokenizer

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}  # as in test_extraction.py


@pytest.fixture(scope="module")
def tiny(offline_models):
    return offline_models["tiny-gpt2"]


@pytest.fixture(scope="module")
def sentences(small_texts):
    texts = list(dict.fromkeys(small_texts))  # unique texts, dataset order
    return texts, [f"s{i:03d}" for i in range(len(texts))]


class Forwards:
    """Counts the model's forward calls and the sentences they carry."""

    def __init__(self, model) -> None:
        self.calls, self.sentences = 0, 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        self.calls += 1
        self.sentences += int(kwargs["input_ids"].shape[0])

    def __enter__(self) -> Forwards:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_rows(path, reference) -> None:
    """Equal token ids, offsets and sentence ids; activations within the exactness tolerance."""
    a, b = ActivationFile(path), ActivationFile(reference)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.sentence_ids == b.sentence_ids and a.kinds == b.kinds
    for kind in b.kinds:
        np.testing.assert_allclose(a.raw(kind).astype(np.float32), b.raw(kind).astype(np.float32), **TOLERANCE)


def test_appending_ten_sentences_forwards_only_those_ten(tiny, sentences, tmp_path):
    texts, ids = sentences
    assert len(texts) >= 30
    first = extract_to_file(tiny, texts[:20], ids[:20], tmp_path / "v1.safetensors", ExtractionOptions(batch_size=8))
    with Forwards(tiny.model) as forwards:
        grown = extract_to_file(
            tiny,
            texts[:30],
            ids[:30],
            tmp_path / "v2.safetensors",
            ExtractionOptions(batch_size=8),
            reuse_from=[first.path],
        )
    assert forwards.sentences == 10 and forwards.calls == math.ceil(10 / 8)
    assert (grown.reuse.computed, grown.reuse.reused) == (10, 20)
    (source,) = grown.reuse.sources
    assert (source.path, source.checksum, source.sentences) == (
        "v1.safetensors",
        ActivationFile(first.path).header.checksum,
        20,
    )
    assert ActivationFile(grown.path).header.reuse == grown.reuse  # recorded in the file
    scratch = extract_to_file(
        tiny,
        texts[:30],
        ids[:30],
        tmp_path / "scratch.safetensors",
        ExtractionOptions(batch_size=8, reuse=False),
        reuse_from=[first.path],
    )
    assert scratch.reuse.reused == 0 and ActivationFile(scratch.path).header.reuse is None
    assert_same_rows(grown.path, scratch.path)
    # the reused sentences' rows are the source's, bit for bit
    a, b = ActivationFile(grown.path), ActivationFile(first.path)
    rows = int(b.offsets[-1])
    np.testing.assert_array_equal(a.raw_rows("resid_post", 2, 0, rows), b.raw("resid_post")[2])


def test_no_reuse_is_byte_identical_to_scratch(tiny, sentences, tmp_path):
    texts, ids = sentences
    first = extract_to_file(tiny, texts[:20], ids[:20], tmp_path / "a.safetensors", ExtractionOptions(batch_size=8))
    again = extract_to_file(
        tiny,
        texts[:20],
        ids[:20],
        tmp_path / "b.safetensors",
        ExtractionOptions(batch_size=8, reuse=False),
        reuse_from=[first.path],
    )
    assert again.reuse.reused == 0 and _sha(again.path) == _sha(first.path)


def test_rerun_keeps_an_up_to_date_file_byte_for_byte(tiny, sentences, tmp_path):
    texts, ids = sentences
    first = extract_to_file(tiny, texts[:12], ids[:12], tmp_path / "a.safetensors", ExtractionOptions(batch_size=8))
    before = first.path.read_bytes()
    os.utime(first.path, (1, 1))
    with Forwards(tiny.model) as forwards:
        again = extract_to_file(
            tiny, texts[:12], ids[:12], first.path, ExtractionOptions(batch_size=8), reuse_from=[first.path]
        )
    assert forwards.calls == 0 and (again.reuse.computed, again.reuse.reused) == (0, 12)
    assert first.path.read_bytes() == before and first.path.stat().st_mtime > 1  # kept, its age renewed
    with Forwards(tiny.model) as forwards:  # one sentence id differs: rewritten, every row copied from the old file
        renamed = extract_to_file(
            tiny,
            texts[:12],
            [*ids[:11], "new-id"],
            first.path,
            ExtractionOptions(batch_size=8),
            reuse_from=[first.path],
        )
    assert forwards.calls == 0 and renamed.reuse.reused == 12
    assert ActivationFile(first.path).sentence_ids[-1] == "new-id"


def test_moved_and_reordered_sentences_are_found(tiny, sentences, tmp_path):
    """A sentence is found by its token ids, wherever it sits in whichever candidate file."""
    texts, ids = sentences
    a = extract_to_file(tiny, texts[:10], ids[:10], tmp_path / "a.safetensors", ExtractionOptions(batch_size=4))
    b = extract_to_file(tiny, texts[10:20], ids[10:20], tmp_path / "b.safetensors", ExtractionOptions(batch_size=4))
    order = [15, 3, 7, 12, 0, 20]
    with Forwards(tiny.model) as forwards:
        mixed = extract_to_file(
            tiny,
            [texts[i] for i in order],
            [ids[i] for i in order],
            tmp_path / "m.safetensors",
            ExtractionOptions(batch_size=4),
            reuse_from=[tmp_path / "missing.safetensors", a.path, b.path],
        )
    assert forwards.sentences == 1 and mixed.reuse.reused == 5
    assert {s.path: s.sentences for s in mixed.reuse.sources} == {"a.safetensors": 3, "b.safetensors": 2}
    scratch = extract_to_file(
        tiny,
        [texts[i] for i in order],
        [ids[i] for i in order],
        tmp_path / "s.safetensors",
        ExtractionOptions(batch_size=4, reuse=False),
    )
    assert_same_rows(mixed.path, scratch.path)


def _never_reused(loaded, texts, ids, source, tmp_path, options=ExtractionOptions(batch_size=8)):
    with Forwards(loaded.model) as forwards:
        result = extract_to_file(loaded, texts, ids, tmp_path / "new.safetensors", options, reuse_from=[source])
    assert result.reuse.reused == 0 and forwards.sentences == len(texts)
    assert ActivationFile(result.path).header.reuse is None
    scratch = extract_to_file(loaded, texts, ids, tmp_path / "scratch.safetensors", replace(options, reuse=False))
    assert _sha(result.path) == _sha(scratch.path)


@pytest.fixture
def source_file(tiny, sentences, tmp_path):
    texts, ids = sentences
    return extract_to_file(tiny, texts[:16], ids[:16], tmp_path / "source.safetensors", ExtractionOptions(batch_size=8))


def test_changed_model_revision_is_never_reused(tiny, sentences, source_file, tmp_path):
    texts, ids = sentences
    _never_reused(replace(tiny, revision="0" * 64), texts[:16], ids[:16], source_file.path, tmp_path)


def test_changed_tokenizer_is_never_reused(tiny, sentences, source_file, tmp_path):
    texts, ids = sentences
    other = train_tokenizer(texts[16:], vocab_size=300)  # other merges: other ids for the same texts
    old = tiny.tokenizer(texts[:16], add_special_tokens=False)["input_ids"]
    new = other(texts[:16], add_special_tokens=False)["input_ids"]
    assert all(a != b for a, b in zip(old, new))
    _never_reused(replace(tiny, tokenizer=other), texts[:16], ids[:16], source_file.path, tmp_path)


@pytest.mark.parametrize(
    "change",
    [{"prepend_bos": True}, {"storage_dtype": "float16"}, {"attention": True}],
    ids=["prepend_bos", "storage_dtype", "attention"],
)
def test_changed_option_is_never_reused(tiny, sentences, source_file, tmp_path, change):
    texts, ids = sentences
    _never_reused(tiny, texts[:16], ids[:16], source_file.path, tmp_path, ExtractionOptions(batch_size=8, **change))


def test_changed_compute_dtype_is_never_reused(offline_models, small_texts, sentences, source_file, tmp_path):
    from emo_assets.core.models import load_model

    texts, ids = sentences
    bf16 = load_model("tiny-gpt2", device="cpu", compute_dtype="bfloat16", training_texts=lambda: small_texts)
    assert bf16.revision == offline_models["tiny-gpt2"].revision  # same weights: only the dtype differs
    _never_reused(bf16, texts[:16], ids[:16], source_file.path, tmp_path)


def test_changed_text_is_never_reused(tiny, sentences, source_file, tmp_path):
    texts, ids = sentences
    edited = list(texts[:16])
    for i in (2, 9, 13):
        edited[i] = edited[i] + " Really."
    with Forwards(tiny.model) as forwards:
        result = extract_to_file(
            tiny,
            edited,
            ids[:16],
            tmp_path / "edited.safetensors",
            ExtractionOptions(batch_size=8),
            reuse_from=[source_file.path],
        )
    assert forwards.sentences == 3 and (result.reuse.computed, result.reuse.reused) == (3, 13)
    scratch = extract_to_file(
        tiny, edited, ids[:16], tmp_path / "scratch.safetensors", ExtractionOptions(batch_size=8, reuse=False)
    )
    assert_same_rows(result.path, scratch.path)


def test_corrupt_source_is_not_used(tiny, sentences, source_file, tmp_path):
    texts, ids = sentences
    data = bytearray(source_file.path.read_bytes())
    data[-9] ^= 0x10
    source_file.path.write_bytes(bytes(data))
    _never_reused(tiny, texts[:16], ids[:16], source_file.path, tmp_path)


@pytest.mark.parametrize("on_host", [True, False])
def test_one_stream_over_several_files(tiny, sentences, tmp_path, monkeypatch, on_host):
    """Three files in one stream: batches over the union (no per-file tails), each file equal to its own
    extraction; on the device path the batch buffers are shared by several writers."""
    texts, ids = sentences
    sizes, batch = (7, 5, 9), 4
    parts, start = [], 0
    for n in sizes:
        parts.append((texts[start : start + n], ids[start : start + n]))
        start += n
    singles = [
        extract_to_file(tiny, t, i, tmp_path / f"single{k}.safetensors", ExtractionOptions(batch_size=batch))
        for k, (t, i) in enumerate(parts)
    ]
    if not on_host:
        monkeypatch.setattr(stream, "HOST_DEVICES", ())
    jobs = [ExtractionJob(t, i, tmp_path / f"stream{k}.safetensors") for k, (t, i) in enumerate(parts)]
    with Forwards(tiny.model) as forwards:
        results = extract_files(tiny, jobs, ExtractionOptions(batch_size=batch))
    assert forwards.calls == math.ceil(sum(sizes) / batch) < sum(math.ceil(n / batch) for n in sizes)
    assert forwards.sentences == sum(sizes)
    for result, single, n in zip(results, singles, sizes):
        assert result.n_sentences == n and result.n_nonfinite == 0 and result.reuse.computed == n
        assert_same_rows(result.path, single.path)
