"""Extraction is exact: stored activations equal an independent computation, batch or no batch.

The reference runs each sentence alone (no padding, no batching) through the plain HF forward with
`output_hidden_states`, with the final norm replaced by Identity so that `hidden_states[-1]` is the raw output
of the last block, and with the test's own hooks on the MLP modules. The extraction under test batches,
pads, sorts by length and writes through the streaming writer. Tolerance: 1e-5 absolute or relative (fp32
GEMMs of a different batch shape round differently; MiniLM's MLP outputs reach magnitudes of ~10).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from emo_assets.core.activations import ActivationFile, DatasetSource
from emo_assets.core.extraction import ExtractionOptions, extract_to_file, length_sorted_batches
from emo_assets.core.layers import find_hook_points, first_tensor
from emo_assets_tests.conftest import OFFLINE_MODELS

FINAL_NORMS = ("ln_f", "final_layer_norm")

TEXTS = [
    "Thank you so much for staying late to help me move.",
    "I can't believe they cancelled the match again!",
    "Sorry.",
    "The library opens at nine on weekdays and at ten on Saturdays, except on public holidays.",
    "Honestly, your note made my whole week.",
    "Why does nobody ever refill the printer?",
    "I owe you an apology for what I said at dinner.",
    "Trains to the airport leave every twenty minutes.",
    "We are grateful.",
    "Stop interrupting me!",
    "Café au lait, s'il vous plaît — 東京 🙂",
]
IDS = [f"s{i:02d}" for i in range(len(TEXTS))]


def reference_activations(loaded, text: str) -> dict[str, np.ndarray]:
    """resid_post and mlp_out [n_layers, n_tokens, d] for one sentence, computed without the extraction code."""
    model = loaded.model
    ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
    mlp_outputs = {}
    points = find_hook_points(model)
    handles = [
        mlp.register_forward_hook(lambda m, a, out, i=i: mlp_outputs.__setitem__(i, first_tensor(out)[0].clone()))
        for i, mlp in enumerate(points.mlps)
    ]
    norm_name = next((n for n in FINAL_NORMS if hasattr(model, n)), None)
    saved_norm = getattr(model, norm_name) if norm_name else None
    try:
        if norm_name:
            setattr(model, norm_name, torch.nn.Identity())
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        if norm_name:
            setattr(model, norm_name, saved_norm)
        for handle in handles:
            handle.remove()
    return {
        "resid_post": np.stack([h[0].numpy() for h in hidden[1:]]),
        "mlp_out": np.stack([mlp_outputs[i].numpy() for i in range(loaded.n_layers)]),
    }


@pytest.fixture(scope="module")
def extracted(offline_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("extracted")
    return {
        name: extract_to_file(
            loaded,
            TEXTS,
            IDS,
            folder / f"{name}.safetensors",
            ExtractionOptions(batch_size=4, attention=True),
            source=DatasetSource(emotion="mixed", path="inline", sha256="0" * 64),
        )
        for name, loaded in offline_models.items()
    }


@pytest.mark.parametrize("name", OFFLINE_MODELS)
def test_stored_activations_equal_independent_forward(name, offline_models, extracted):
    loaded, result = offline_models[name], extracted[name]
    stored = ActivationFile(result.path)
    assert stored.n_layers == loaded.n_layers and stored.d_model == loaded.d_model
    for index, text in enumerate(TEXTS):
        reference = reference_activations(loaded, text)
        for kind in ("resid_post", "mlp_out"):
            for layer in range(loaded.n_layers):
                got = stored.sentence(kind, layer, index)
                np.testing.assert_allclose(
                    got,
                    reference[kind][layer],
                    atol=1e-5,
                    rtol=1e-5,
                    err_msg=f"{name} {kind} layer {layer} sentence {index}",
                )


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia", "tiny-gpt-neo"])
def test_last_layer_is_the_raw_block_output_not_hidden_states_last(name, offline_models, extracted):
    """hidden_states[-1] is final_norm(last block): the stored last layer must differ from it."""
    loaded = offline_models[name]
    ids = torch.tensor([loaded.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        post_norm = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].numpy()
    stored = ActivationFile(extracted[name].path).sentence("resid_post", loaded.n_layers - 1, 0)
    assert np.abs(stored - post_norm).max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-pythia", "tiny-gpt-neo"])
def test_decoder_residual_identity(name, offline_models, extracted):
    """Sequential and parallel residual alike: resid_post[l] - resid_post[l-1] = attn_out[l] + mlp_out[l]."""
    stored = ActivationFile(extracted[name].path)
    for layer in range(1, stored.n_layers):
        delta = stored.layer("resid_post", layer) - stored.layer("resid_post", layer - 1)
        parts = stored.layer("attn_out", layer) + stored.layer("mlp_out", layer)
        np.testing.assert_allclose(delta, parts, atol=2e-5)


@pytest.mark.parametrize("name", OFFLINE_MODELS)
def test_batched_equals_one_at_a_time(name, offline_models, tmp_path):
    loaded = offline_models[name]
    alone = extract_to_file(loaded, TEXTS, IDS, tmp_path / "alone.safetensors", ExtractionOptions(batch_size=1))
    batched = extract_to_file(loaded, TEXTS, IDS, tmp_path / "batched.safetensors", ExtractionOptions(batch_size=16))
    a, b = ActivationFile(alone.path), ActivationFile(batched.path)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    for kind in ("resid_post", "mlp_out"):
        np.testing.assert_allclose(a.raw(kind), b.raw(kind), atol=1e-5, rtol=1e-5)


def test_round_trip_metadata_and_sentence_ends(offline_models, extracted):
    loaded = offline_models["tiny-gpt2"]
    stored = ActivationFile(extracted["tiny-gpt2"].path)
    meta = stored.metadata
    for key in (
        "format_version",
        "model_id",
        "model_revision",
        "emotion",
        "dataset_path",
        "dataset_sha256",
        "sentence_ids",
        "prepend_bos",
        "dtype",
        "n_layers",
        "d_model",
        "package_version",
        "hook_points",
    ):
        assert meta.get(key), f"metadata {key} missing"
    assert meta["model_revision"] == loaded.revision and meta["model_id"] == "tiny-gpt2"
    assert json.loads(meta["sentence_ids"]) == IDS == stored.sentence_ids
    assert (meta["dtype"], meta["prepend_bos"]) == ("float32", "false")
    expected_ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert np.diff(stored.offsets).tolist() == [len(ids) for ids in expected_ids]
    assert stored.input_ids.tolist() == [t for ids in expected_ids for t in ids]
    for layer in range(stored.n_layers):
        ends = stored.sentence_end("resid_post", layer)
        assert ends.shape == (len(TEXTS), stored.d_model)
        for index in range(len(TEXTS)):
            np.testing.assert_array_equal(ends[index], stored.sentence("resid_post", layer, index)[-1])
    assert stored.path.stat().st_size == extracted["tiny-gpt2"].file_bytes


def test_same_inputs_give_byte_identical_files(offline_models, tmp_path):
    loaded = offline_models["tiny-pythia"]
    digests = []
    for run in range(2):
        result = extract_to_file(
            loaded, TEXTS, IDS, tmp_path / f"run{run}" / "a.safetensors", ExtractionOptions(batch_size=3)
        )
        digests.append(hashlib.sha256(result.path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_prepend_bos_is_applied_and_recorded(offline_models, tmp_path):
    loaded = offline_models["tiny-gpt2"]
    result = extract_to_file(
        loaded, TEXTS[:3], IDS[:3], tmp_path / "bos.safetensors", ExtractionOptions(prepend_bos=True)
    )
    stored = ActivationFile(result.path)
    assert stored.metadata["prepend_bos"] == "true"
    assert stored.input_ids[stored.offsets[:-1]].tolist() == [loaded.tokenizer.bos_token_id] * 3


@pytest.mark.parametrize("storage_dtype, tolerance", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_reduced_storage_dtype(storage_dtype, tolerance, offline_models, extracted, tmp_path):
    loaded = offline_models["minilm"]
    result = extract_to_file(
        loaded, TEXTS, IDS, tmp_path / "low.safetensors", ExtractionOptions(storage_dtype=storage_dtype)
    )
    low, full = ActivationFile(result.path), ActivationFile(extracted["minilm"].path)
    assert low.metadata["dtype"] == storage_dtype
    for layer in range(low.n_layers):
        a, b = low.layer("resid_post", layer), full.layer("resid_post", layer)
        assert np.abs(a - b).max() <= tolerance * np.abs(b).max()
    assert result.file_bytes < full.path.stat().st_size


def test_length_sorted_batches_cover_every_sentence_once():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = length_sorted_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_planning_and_reuse_decide_the_work_without_writing(offline_models, extracted, tmp_path):
    """The parts of `extract_files` alone: planning tokenizes and writes nothing; the reuse decision keeps an
    identical file (no work) and forwards every sentence of a new one."""
    from emo_assets.core.extraction import ExtractionJob, decide_reuse, plan_extraction

    loaded = offline_models["tiny-gpt2"]
    done = extracted["tiny-gpt2"].path
    source = DatasetSource(emotion="mixed", path="inline", sha256="0" * 64)
    options = ExtractionOptions(batch_size=4, attention=True)
    jobs = [
        ExtractionJob(TEXTS, IDS, done, source, reuse_from=[done]),
        ExtractionJob(TEXTS[:3], IDS[:3], tmp_path / "new.safetensors", source),
    ]
    plan = plan_extraction(loaded, jobs, options)
    assert list(tmp_path.iterdir()) == []
    expected = [len(loaded.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert plan.lengths == expected + expected[:3]
    decision = decide_reuse(plan, options)
    assert decision.kept == [True, False]
    assert decision.work(plan) == [len(TEXTS) + i for i in range(3)]
    assert plan.local(decision.work(plan)) == [0, 1, 2]
