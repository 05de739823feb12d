"""The benchmark's default model: GPT-2-small architecture (`GPT2Config()` defaults: 12 layers, d=768,
50257-row embedding) with seeded random weights and a byte-level BPE tokenizer trained on the dataset texts.

It is built once into the model cache (`$EMO_ASSETS_MODEL_CACHE`, default `~/.cache/emo_assets/models`) and then
loaded through `emo_assets.core.models.load_model(<dir>)`, i.e. the real loading path of a local model.
The tokenizer's vocabulary is small (2048), so every id is < 50257 and the embedding is used as is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from emo_assets.core.offline_models import model_cache_dir, save_random_model, train_tokenizer

RECIPE = "bench-gpt2-small-v1"


def bench_model_dir(texts: Sequence[str]) -> Path:
    """Build (once) and return the directory of the seeded GPT-2-small-size benchmark model."""
    corpus = sorted(set(texts))
    key = hashlib.sha256(json.dumps([RECIPE, corpus]).encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{RECIPE}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import GPT2Config

    return save_random_model(target, GPT2Config(), train_tokenizer(corpus))
