"""How the per-model analysis reads its inputs: stored rows, token strings, checksums.

The rows `ModelActivations` hands out (sentence ends, per-emotion token blocks) are compared with the reader's
whole-layer copies; the token strings read from a model folder's `tokenizer.json` with the `tokenizers` library
alone are compared with transformers' tokenizer on the same folder; the checksum of a file is hashed once per
process and again when the file is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile, ActivationFileError, ActivationHeader, write_activation_file
from emo_assets.core.analysis import layerwise
from emo_assets.core.analysis.inputs import ModelActivations, token_strings
from emo_assets.core.analysis.layerwise import layer_chunks
from emo_assets.core.analysis.subspaces import emotion_subspaces_by_layer
from emo_assets.core.analysis.vectors import emotion_vectors_by_layer
from emo_assets.core.offline_models import train_tokenizer
from emo_assets.core.paths import activation_dir, activation_file

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
TEXTS = {
    "gratitude": ["Thank you so much for the flowers.", "I am grateful for your help today."],
    "anger": ["I am furious about the broken window!", "This delay makes me so angry."],
    "apology": ["Sorry, I forgot your birthday.", "I apologise for the noise last night."],
    "neutral": ["The table is made of oak.", "The train leaves at nine."],
}
N_LAYERS, D = 2, 6


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t for texts in TEXTS.values() for t in texts] * 4, vocab_size=300)


def _model_folder(root: Path, tokenizer) -> Path:
    """A local model folder as the hub cache holds one: config and tokenizer files (no weights needed here)."""
    folder = root / "model"
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    return folder


def _write_model(root: Path, tokenizer, *, model_id: str, prepend_bos: bool, storage_dtype: str = "float32"):
    """One activation file per emotion with random rows, the tokenizer's ids and the dataset file; returns
    (results dir, dataset path, the float32 rows written per emotion)."""
    results, dataset = root / "results", root / "dataset.jsonl"
    rng = np.random.default_rng(0)
    records, written = [], {}
    for emotion, texts in TEXTS.items():
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            ids = [[tokenizer.bos_token_id, *x] for x in ids]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        rows = {
            k: rng.standard_normal((N_LAYERS, int(offsets[-1]), D)).astype(np.float32)
            for k in ("resid_post", "mlp_out")
        }
        if storage_dtype == "bfloat16":  # stored as the high half of the float32 bits
            rows = {k: (v.view(np.uint32) >> 16 << 16).view(np.float32) for k, v in rows.items()}
            stored = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in rows.items()}
        else:
            stored = rows
        sentence_ids = tuple(f"{emotion}-{i}" for i in range(len(texts)))
        write_activation_file(
            activation_file(activation_dir(results, "baseline", "m"), emotion),
            stored,
            offsets=offsets,
            input_ids=np.concatenate(ids),
            header=ActivationHeader(
                n_layers=N_LAYERS,
                d_model=D,
                kinds=tuple(stored),
                storage_dtype=storage_dtype,
                emotion=emotion,
                model_id=model_id,
                model_revision="r1",
                prepend_bos=prepend_bos,
                sentence_ids=sentence_ids,
            ),
        )
        records += [{"id": i, "emotion": emotion, "text": t} for i, t in zip(sentence_ids, texts)]
        written[emotion] = (rows, offsets)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return results, dataset, written


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_sentence_ends_and_token_blocks_are_the_stored_rows(tmp_path, tokenizer, storage_dtype):
    results, _, written = _write_model(
        tmp_path, tokenizer, model_id="m", prepend_bos=False, storage_dtype=storage_dtype
    )
    acts = ModelActivations.load(results, "baseline", "m", EMOTIONS)
    for kind in ("resid_post", "mlp_out"):
        expected_ends = np.concatenate([rows[kind][:, offsets[1:] - 1] for rows, offsets in written.values()], axis=1)
        np.testing.assert_array_equal(acts.sentence_end(kind), expected_ends)
        blocks = acts.token_blocks(kind)
        assert [b.dtype for b in blocks] == [np.float32] * len(EMOTIONS)
        for block, emotion in zip(blocks, EMOTIONS):
            np.testing.assert_array_equal(block, written[emotion][0][kind])
            for layer in range(N_LAYERS):
                np.testing.assert_array_equal(block[layer], acts.files[emotion].layer(kind, layer))


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_token_strings_from_tokenizer_json_equal_transformers(tmp_path, tokenizer, prepend_bos):
    from transformers import AutoTokenizer

    folder = _model_folder(tmp_path, tokenizer)
    results, dataset, _ = _write_model(tmp_path, tokenizer, model_id=str(folder), prepend_bos=prepend_bos)
    acts = ModelActivations.load(results, "baseline", "m", EMOTIONS, dataset_path=dataset)
    bare = token_strings(acts)
    full = token_strings(acts, tokenizer=AutoTokenizer.from_pretrained(folder))
    assert bare.status == full.status == "verified (texts re-tokenize to the stored ids)"
    assert bare.tokens == full.tokens and len(bare.tokens) == acts.offsets[-1]
    no_texts = ModelActivations.load(results, "baseline", "m", EMOTIONS)
    assert token_strings(no_texts).tokens == full.tokens


def test_token_strings_without_a_usable_tokenizer_json(tmp_path, tokenizer):
    folder = _model_folder(tmp_path, tokenizer)
    results, dataset, _ = _write_model(tmp_path, tokenizer, model_id=str(folder), prepend_bos=False)
    acts = ModelActivations.load(results, "baseline", "m", EMOTIONS, dataset_path=dataset)
    # another tokenizer's file: neither the bare library nor transformers reproduce the stored ids
    other = train_tokenizer(["completely different words here"] * 5, vocab_size=260)
    other.save_pretrained(folder)
    assert token_strings(acts).status.startswith("tokenizer does not reproduce the stored ids")
    # no tokenizer.json at all: transformers is asked, and says why it cannot load one
    (folder / "tokenizer.json").unlink()
    missing = token_strings(acts)
    assert missing.tokens is None and missing.status.startswith("tokenizer not loaded")


def test_token_strings_import_neither_transformers_nor_torch(tmp_path, tokenizer):
    folder = _model_folder(tmp_path, tokenizer)
    results, dataset, _ = _write_model(tmp_path, tokenizer, model_id=str(folder), prepend_bos=True)
    script = (
        "import sys; from emo_assets.core.analysis.inputs import ModelActivations, token_strings\n"
        f"acts = ModelActivations.load({str(results)!r}, 'baseline', 'm', {EMOTIONS!r}, dataset_path={str(dataset)!r})\n"
        "print(token_strings(acts).status, 'transformers' in sys.modules, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["verified", "(texts", "re-tokenize", "to", "the", "stored", "ids)", "False", "False"]


def test_a_file_is_hashed_once_until_it_is_replaced(tmp_path, tokenizer, monkeypatch):
    results, _, _ = _write_model(tmp_path, tokenizer, model_id="m", prepend_bos=False)
    hashed = []
    verify = ActivationFile.verify
    monkeypatch.setattr(ActivationFile, "verify", lambda self: (hashed.append(self.path.name), verify(self))[1])
    ModelActivations.load(results, "baseline", "m", EMOTIONS)
    assert sorted(hashed) == sorted(f"activations_{e}.safetensors" for e in EMOTIONS)
    ModelActivations.load(results, "baseline", "m", EMOTIONS)
    assert len(hashed) == len(EMOTIONS)  # the same files: not hashed again
    # a replaced file (the writers rename a new file into place) is hashed again, and a corrupt one refused
    path = activation_file(activation_dir(results, "baseline", "m"), "anger")
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    replacement = path.with_name("replacement")
    replacement.write_bytes(bytes(data))
    os.replace(replacement, path)
    with pytest.raises(ActivationFileError, match="checksum mismatch"):
        ModelActivations.load(results, "baseline", "m", EMOTIONS)
    assert hashed[-1] == path.name


def test_layer_stack_reads_the_stored_rows_one_layer_at_a_time(tmp_path, tokenizer, monkeypatch):
    """`sentence_end_layers` is the [layers, sentences, d] block of `sentence_end`, a layer per `[layer]`
    (optionally only some sentences, in their order); the analysis' groups of layers keep under the byte
    budget, and the emotion vectors and subspaces computed a layer at a time equal those of the whole block."""
    results, dataset, written = _write_model(tmp_path, tokenizer, model_id="m", prepend_bos=False)
    acts = ModelActivations.load(results, "baseline", "m", EMOTIONS, dataset_path=dataset)
    rows = np.array([5, 0, 7, 2])
    for kind in ("resid_post", "mlp_out"):
        whole = acts.sentence_end(kind)
        stack = acts.sentence_end_layers(kind)
        assert stack.shape == whole.shape == (N_LAYERS, 8, D) and len(stack) == N_LAYERS
        for layer in range(N_LAYERS):
            np.testing.assert_array_equal(stack[layer], whole[layer])
            np.testing.assert_array_equal(acts.sentence_end_layers(kind, rows)[layer], whole[layer, rows])
        with pytest.raises(IndexError, match="layer 2"):
            stack[N_LAYERS]
    stack = acts.sentence_end_layers("resid_post")
    groups = [(list(layers), chunk.shape) for layers, chunk in layer_chunks(stack, budget=8 * 8 * D)]
    assert groups == [([0], (1, 8, D)), ([1], (1, 8, D))]
    assert [list(layers) for layers, _ in layer_chunks(stack)] == [[0, 1]]
    whole = acts.sentence_end("resid_post")
    expected_vectors = emotion_vectors_by_layer(whole, acts.labels, EMOTIONS, "neutral")
    expected_subspaces = emotion_subspaces_by_layer(whole, acts.labels, EMOTIONS, k=1)
    monkeypatch.setattr(layerwise, "CHUNK_BYTES", 1)  # one layer per group
    vectors = emotion_vectors_by_layer(stack, acts.labels, EMOTIONS, "neutral")
    subspaces = emotion_subspaces_by_layer(stack, acts.labels, EMOTIONS, k=1)
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(vectors[layer].means, expected_vectors[layer].means)
        assert vectors[layer].separation == expected_vectors[layer].separation
        for emotion in EMOTIONS:
            np.testing.assert_array_equal(subspaces[layer][emotion].basis, expected_subspaces[layer][emotion].basis)
