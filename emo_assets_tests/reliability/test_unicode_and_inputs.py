"""CJK, emoji (with ZWJ sequences) and right-to-left text are valid input and round-trip unchanged.

The committed `data/good/unicode_cjk_emoji_rtl.jsonl` (Chinese, Japanese, Korean, Arabic, Hebrew, emoji,
mixed scripts) goes through the extraction CLI and through the Dagster graph: sentence ids and texts come out
of Parquet exactly as written, every sentence has activations, and the stored token ids decode back to the
very text (the byte-level BPE of the tiny GPT-2 is lossless). Invalid inputs are covered by
`test_dagster_faults.py` (Dagster) and by the validator's own tests (`emo_assets_tests/core/test_datasets.py`,
`emo_assets_tests/test_validate_cli.py`).
"""

from __future__ import annotations

import json
import unicodedata

import dagster as dg
import polars as pl
import pytest

from emo_assets.core.activations import ActivationFile
from emo_assets.core.models import corpus_texts, load_model
from emo_assets.definitions import build_defs
from emo_assets.defs.activations import activation_path
from emo_assets.defs.datasets import emotion_parquet_path
from emo_assets.defs.jobs import stage_order
from emo_assets.extract import main as extract_main
from emo_assets_tests.conftest import REPO_ROOT, read_records
from emo_assets_tests.pipeline import run_jobs
from emo_assets_tests.reliability.helpers import dagster_settings

UNICODE = REPO_ROOT / "emo_assets_tests" / "data" / "good" / "unicode_cjk_emoji_rtl.jsonl"
RECORDS = read_records(UNICODE)


def test_the_corpus_really_is_hard_unicode():
    text = "".join(r["text"] for r in RECORDS)
    assert any(unicodedata.bidirectional(c) in ("R", "AL") for c in text)  # Hebrew / Arabic
    assert any("CJK UNIFIED" in unicodedata.name(c, "") for c in text)
    assert "\u200d" in text and any(ord(c) > 0xFFFF for c in text)  # ZWJ sequence, astral-plane emoji


def _assert_round_trip(file: ActivationFile, records: list[dict], tokenizer) -> None:
    assert file.sentence_ids == [r["id"] for r in records]
    assert file.n_sentences == len(records)
    for index, record in enumerate(records):
        rows = file.sentence("resid_post", -1, index)
        assert rows.shape[0] > 0
        ids = file.input_ids[file.offsets[index] : file.offsets[index + 1]].tolist()
        assert tokenizer.decode(ids) == record["text"]


def test_extract_cli_round_trips_unicode(tmp_path, small_datasets, offline_models, monkeypatch, capsys):
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    out = tmp_path / "out"
    assert extract_main(["--model", "tiny-gpt2", "--dataset", str(UNICODE), "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    tokenizer = offline_models["tiny-gpt2"].tokenizer  # the same model: trained on the same corpus
    for emotion in ("gratitude", "anger", "apology", "neutral"):
        records = [r for r in RECORDS if r["emotion"] == emotion]
        _assert_round_trip(ActivationFile(out / f"activations_{emotion}.safetensors"), records, tokenizer)


@pytest.mark.slow
def test_dagster_graph_round_trips_unicode(tmp_path):
    settings = dagster_settings(tmp_path, {"unicode": UNICODE}, EMO_ASSETS_MODELS="tiny-gpt2")
    lines = []
    with dg.DagsterInstance.ephemeral() as instance:
        names = stage_order(settings, ["unicode"], extraction_only=True)
        assert run_jobs(build_defs(settings), names, instance, lines), lines
    tokenizer = load_model("tiny-gpt2", device="cpu", training_texts=lambda: corpus_texts([UNICODE])).tokenizer
    for emotion in settings.emotions:
        records = [r for r in RECORDS if r["emotion"] == emotion]
        frame = pl.read_parquet(emotion_parquet_path(settings, "unicode", emotion))
        assert frame["id"].to_list() == [r["id"] for r in records]
        assert frame["text"].to_list() == [r["text"] for r in records]  # no normalisation, no stripping
        assert [json.loads(e) for e in frame["extra"]] == [{"lang": r["lang"]} for r in records]
        _assert_round_trip(
            ActivationFile(activation_path(settings, "unicode", "tiny-gpt2", emotion)), records, tokenizer
        )
