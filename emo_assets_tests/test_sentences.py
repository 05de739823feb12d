"""The synthetic-sentence generator of the `scale` benchmark: sizes, no duplicates, balanced lengths, a valid
dataset, and one clear error for what it cannot make."""

import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.sentences import EMOTIONS, capacity, synthetic_sentences, write_dataset
from emo_assets.core.datasets import read_dataset
from emo_assets_tests.conftest import REPO_ROOT


def test_sizes_seeds_and_balance(tmp_path):
    records = synthetic_sentences(1003, seed=7)
    assert len(records) == 1003
    counts = Counter(r["emotion"] for r in records)
    assert [counts[e] for e in EMOTIONS] == [251, 251, 251, 250]
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts) and len({r["id"] for r in records}) == len(records)
    # the same word counts in every emotion, sentence by sentence
    words = {e: [len(r["text"].split()) for r in records if r["emotion"] == e] for e in EMOTIONS}
    assert words["anger"] == words["gratitude"][:251] and words["neutral"] == words["gratitude"][:250]
    assert len(set(words["gratitude"])) > 3  # lengths vary within an emotion
    assert synthetic_sentences(1003, seed=7) == records
    assert synthetic_sentences(1003, seed=8) != records
    # a valid dataset the pipeline reads without a duplicate warning
    path = write_dataset(tmp_path / "data.jsonl", 1003, seed=7)
    dataset = read_dataset(path, EMOTIONS, strict=True)
    assert [s.text for s in dataset.samples] == texts


def test_what_the_templates_cannot_make():
    with pytest.raises(ValueError, match="no templates for emotions"):
        synthetic_sentences(10, emotions=("joy",))
    with pytest.raises(ValueError, match="the templates hold"):
        synthetic_sentences(4 * capacity() + 4)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sentences", "3", "/nonexistent/x.jsonl"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: need at least one sentence per emotion: n=3")
