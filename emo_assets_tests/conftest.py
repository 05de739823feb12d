"""Shared test fixtures: a private model cache, small datasets cut from the real ones, loaded offline models.

Tests never touch the user's caches or `results/`: `EMO_ASSETS_MODEL_CACHE` points into a session temp dir and
every output goes to `tmp_path`. The small datasets are the first sentences of each emotion of the committed
dataset, so the tiny models' tokenizers are trained on the same kind of text as in the real pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = REPO_ROOT / "data" / "emotion_dataset.jsonl"
EXTENDED = REPO_ROOT / "data" / "emotion_dataset_extended.jsonl"
OFFLINE_MODELS = ("minilm", "tiny-gpt2", "tiny-pythia", "tiny-gpt-neo")


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("model_cache")
    previous = os.environ.get("EMO_ASSETS_MODEL_CACHE")
    os.environ["EMO_ASSETS_MODEL_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("EMO_ASSETS_MODEL_CACHE", None)
    else:
        os.environ["EMO_ASSETS_MODEL_CACHE"] = previous


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def cut_dataset(source: Path, target: Path, per_emotion: int) -> Path:
    """The first `per_emotion` sentences of each emotion of `source`."""
    counts: dict[str, int] = {}
    kept = []
    for record in read_records(source):
        if counts.get(record["emotion"], 0) < per_emotion:
            counts[record["emotion"]] = counts.get(record["emotion"], 0) + 1
            kept.append(record)
    return write_records(target, kept)


@pytest.fixture(scope="session")
def small_datasets(tmp_path_factory) -> dict[str, Path]:
    """baseline: 6 per emotion, extended: 8 per emotion (cut from the committed files)."""
    folder = tmp_path_factory.mktemp("datasets")
    return {
        "baseline": cut_dataset(BASELINE, folder / "baseline.jsonl", 6),
        "extended": cut_dataset(EXTENDED, folder / "extended.jsonl", 8),
    }


@pytest.fixture(scope="session")
def small_texts(small_datasets) -> list[str]:
    return [r["text"] for path in small_datasets.values() for r in read_records(path)]


@pytest.fixture(scope="session")
def offline_models(small_texts):
    """The four offline models, loaded once per session (fp32, CPU)."""
    from emo_assets.core.models import load_model

    return {name: load_model(name, device="cpu", training_texts=lambda: small_texts) for name in OFFLINE_MODELS}
