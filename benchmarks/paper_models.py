"""Stand-ins of the paper models for the benchmark: full-size, random weights, real configs, loaded by hub id.

`gpt2`, `EleutherAI/pythia-160m` and `EleutherAI/gpt-neo-125M` are built from the architecture fields of their
hub `config.json` files (below), with seeded random weights, saved with their LM heads as the hub checkpoints
are, and laid out in a Hugging Face cache under their real ids. With `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE`
pointing there (`paper_env`), `emo-assets materialize --profile paper` and the extract CLI load them by name,
through the real hub code path, without a network.

The tokenizer is a byte-level BPE trained on *other* sentences than those measured: the dataset's sentences
with their words shuffled (seeded), so its merges do not fit the measured sentences exactly and they cost about as
many tokens as under a general-purpose tokenizer trained on other text. Every id it emits is below every vocab size.
The cache is built once per recipe and corpus into the model cache (`$EMO_ASSETS_MODEL_CACHE`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from emo_assets.core.offline_models import (
    SPECIAL_TOKEN,
    add_to_hub_cache,
    model_cache_dir,
    save_random_model,
    train_tokenizer,
)

RECIPE = "paper-stand-ins-v1"
TOKENIZER_VOCAB = 1024
# architecture fields of the hub config.json files; token ids are set to the stand-in tokenizer's
PAPER_CONFIGS: dict[str, dict] = {
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    "EleutherAI/pythia-160m": {
        "model_type": "gpt_neox",
        "vocab_size": 50304,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "EleutherAI/gpt-neo-125M": {
        "model_type": "gpt_neo",
        "vocab_size": 50257,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "attention_types": [[["global", "local"], 6]],
        "window_size": 256,
        "max_position_embeddings": 2048,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
}


# `tiny=True`: the same architectures at test size (2 layers, d=64), for checking the rows' structure in seconds
TINY_FIELDS: dict[str, dict] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "gpt_neo": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]]},
}


def stand_in_config(hub_id: str, tiny: bool = False) -> dict:
    config = PAPER_CONFIGS[hub_id]
    return {**config, **TINY_FIELDS[config["model_type"]]} if tiny else dict(config)


def shuffled_sentences(texts: Sequence[str], seed: int = 0) -> list[str]:
    """Each sentence with its words in a seeded random order: other sentences over the same vocabulary."""
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def paper_hub_cache(texts: Sequence[str], hub_ids: Sequence[str] = tuple(PAPER_CONFIGS), tiny: bool = False) -> Path:
    """Build (once) and return a Hugging Face hub cache folder holding the stand-ins of `hub_ids`."""
    corpus = sorted(set(texts))
    configs = {hub_id: stand_in_config(hub_id, tiny) for hub_id in PAPER_CONFIGS}
    key = hashlib.sha256(json.dumps([RECIPE, TOKENIZER_VOCAB, configs, corpus]).encode()).hexdigest()[:16]
    hub_cache = model_cache_dir() / f"{RECIPE}-{key}" / "hub"
    tokenizer = None
    for hub_id in hub_ids:
        commit = hashlib.sha1(f"{RECIPE}:{key}:{hub_id}".encode()).hexdigest()
        repo = hub_cache / f"models--{hub_id.replace('/', '--')}"
        if (repo / "refs" / "main").is_file() and (repo / "snapshots" / commit / "config.json").is_file():
            continue
        from transformers import AutoConfig

        tokenizer = tokenizer or train_tokenizer(shuffled_sentences(corpus), vocab_size=TOKENIZER_VOCAB)
        special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
        config = AutoConfig.for_model(**configs[hub_id], bos_token_id=special, eos_token_id=special)
        model_dir = model_cache_dir() / f"{RECIPE}-{key}" / "models" / hub_id.replace("/", "--")
        if not (model_dir / "config.json").is_file():
            save_random_model(model_dir, config, tokenizer, lm_head=True)
        add_to_hub_cache(hub_cache, hub_id, model_dir, commit)
    return hub_cache


def paper_env(hub_cache: Path) -> dict[str, str]:
    """Environment under which the hub ids resolve from `hub_cache` only."""
    return {
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HOME": str(Path(hub_cache).parent),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
