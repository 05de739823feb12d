"""The benchmark's default model: GPT-2-small architecture (`GPT2Config()` defaults: 12 layers, d=768,
50257-row embedding) with seeded random weights and a byte-level BPE tokenizer trained on the dataset texts.

It is built once into the model cache (`$EMO_ASSETS_MODEL_CACHE`, default `~/.cache/emo_assets/models`) and then
loaded through `emo_assets.core.models.load_model(<dir>)`, i.e. the real loading path of a local model.
The tokenizer's vocabulary is small (2048), so every id is < 50257 and the embedding is used as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from emo_assets.core.atomic import fsync_dir, temp_path_for
from emo_assets.core.offline_models import model_cache_dir, train_tokenizer

RECIPE = "bench-gpt2-small-v1"


def bench_model_dir(texts: Sequence[str]) -> Path:
    """Build (once) and return the directory of the seeded GPT-2-small-size benchmark model."""
    corpus = sorted(set(texts))
    key = hashlib.sha256(json.dumps([RECIPE, corpus]).encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{RECIPE}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import GPT2Config, GPT2Model

    tokenizer = train_tokenizer(corpus)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2Model(GPT2Config())
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(target)
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        try:
            os.rename(temp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(temp)
    return target
