"""The analysis on what the real extraction stores with a capture selection (`positions`, `layers`).

The offline models `tiny-gpt2` and `minilm` are extracted over the small baseline dataset four times: every token of
every layer (the reference), one row per sentence (`sentence_end`, `mean`) of every layer, and the sentence ends of
layers 0 and -1 only. Each analysis step runs on each, and its values are compared with the reference's: the
sentence-end rows of a selection are bit-identical to the reference file's (same batches), so every sentence-end
table of the selection equals the reference's rows of the same MODEL layers; the means of `mean` are checked against
numpy means of the reference's token rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from safetensors import safe_open

from emo_assets.core.activations import ActivationFile
from emo_assets.core.activations.format import DatasetSource
from emo_assets.core.analysis.comparisons import cross_model_alignment_step, vector_stability_step
from emo_assets.core.analysis.inputs import (
    ModelActivations,
    model_analysis_dir,
    reference_emotion,
    report_path,
    token_strings,
)
from emo_assets.core.analysis.model_analysis import (
    emotion_subspaces_step,
    emotion_vectors_step,
    linear_probes_step,
    model_plots_step,
    token_vectors_step,
)
from emo_assets.core.analysis.variant_report import analysis_report_step
from emo_assets.core.analysis.vectors import emotion_vectors
from emo_assets.core.extraction import ExtractionJob, ExtractionOptions, extract_files
from emo_assets.core.paths import activation_dir, activation_file
from emo_assets_tests.conftest import read_records

SLUGS = ("tiny-gpt2", "minilm")
SELECTIONS = {  # results folder -> (positions, layers)
    "full": ("all", "all"),
    "sentence_end": ("sentence_end", "all"),
    "mean": ("mean", "all"),
    "ends": ("sentence_end", "0,-1"),
}
VARIANT = "baseline"
LEXICON = {"gratitude": ["thank"], "anger": ["angry"]}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, offline_models, small_datasets):
    """selection -> (results folder, emotions); every selection extracted with the same batches."""
    root = tmp_path_factory.mktemp("stored_selections")
    records = read_records(small_datasets[VARIANT])
    emotions = tuple(dict.fromkeys(r["emotion"] for r in records))
    out = {}
    for name, (positions, layers) in SELECTIONS.items():
        results = root / name
        for slug in SLUGS:
            jobs = [
                ExtractionJob(
                    [r["text"] for r in records if r["emotion"] == emotion],
                    [r["id"] for r in records if r["emotion"] == emotion],
                    activation_file(activation_dir(results, VARIANT, slug), emotion),
                    DatasetSource(emotion=emotion, variant=VARIANT),
                )
                for emotion in emotions
            ]
            extract_files(
                offline_models[slug], jobs, ExtractionOptions(batch_size=4, positions=positions, layers=layers)
            )
        out[name] = (results, emotions)
    return out


def _load(extracted, name: str, slug: str, dataset: Path) -> ModelActivations:
    results, emotions = extracted[name]
    return ModelActivations.load(results, VARIANT, slug, emotions, dataset_path=dataset)


def _tables(step) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(table.path) for name, table in step.tables.items()}


def test_a_selection_of_layers_is_analysed_and_labelled_by_model_layer(extracted, small_datasets):
    """Files of layers 0 and -1: every step runs, labels its rows 0 and n_layers - 1, and gives the reference's
    values at those model layers (the emotion vector at model layer -1 among them)."""
    dataset = small_datasets[VARIANT]
    ends = {slug: _load(extracted, "ends", slug, dataset) for slug in SLUGS}
    full = {slug: _load(extracted, "full", slug, dataset) for slug in SLUGS}
    out = extracted["ends"][0]
    for slug in SLUGS:
        acts, reference = ends[slug], full[slug]
        last = reference.n_layers - 1
        assert acts.layers == (0, last) and acts.n_layers == reference.n_layers and len(reference.layers) > 2
        np.testing.assert_array_equal(
            acts.sentence_end_layers("resid_post")[1], reference.sentence_end_layer("resid_post", -1)
        )
        steps = {
            "vectors": (emotion_vectors_step(acts, out), emotion_vectors_step(reference, extracted["full"][0])),
            "subspaces": (
                emotion_subspaces_step(acts, out, k=3, n_random=10),
                emotion_subspaces_step(reference, extracted["full"][0], k=3, n_random=10),
            ),
            "probes": (
                linear_probes_step(acts, out, cv_folds=3, seed=0),
                linear_probes_step(reference, extracted["full"][0], cv_folds=3, seed=0),
            ),
        }
        for name, (step, of_reference) in steps.items():
            for table, written in _tables(step).items():
                assert sorted(set(written["layer"])) == [0, last], (name, table)
                at_same_layers = _tables(of_reference)[table].filter(pl.col("layer").is_in([0, last]))
                assert_frame_equal(written, at_same_layers, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)
        with safe_open(str(steps["vectors"][0].files["vectors"]), framework="numpy") as handle:
            assert json.loads(handle.metadata()["layers"]) == [0, last]
            centred = handle.get_tensor("resid_post/centred")
        independent = emotion_vectors(
            reference.sentence_end_layer("resid_post", -1),
            reference.labels,
            reference.emotions,
            reference_emotion(reference.emotions),
        )
        np.testing.assert_allclose(centred[1], independent.centred, rtol=1e-12, atol=1e-12)
        plots = model_plots_step(out, VARIANT, slug)
        assert plots.summary["best_layer"] in (0, last) and plots.files["cosine_heatmap"].stat().st_size > 0
        token_vectors_step(acts, out, LEXICON, token_strings(acts))  # every token is not stored: not applicable
    cross = cross_model_alignment_step(ends, out, VARIANT, k=3, n_random=5)
    reference_cross = cross_model_alignment_step(full, extracted["full"][0], VARIANT, k=3, n_random=5)
    cka, cka_full = pl.read_parquet(cross.tables["cka"].path), pl.read_parquet(reference_cross.tables["cka"].path)
    keys = ["model_a", "model_b", "kind", "layer_a", "layer_b"]
    stored = cka_full.join(cka.select(keys), on=keys, how="semi")
    assert cka.height == stored.height == 3 * 2 * 4  # model pairs (with self pairs) x kinds x 2 x 2 layers
    assert_frame_equal(
        cka.drop("matched_depth").sort(keys), stored.drop("matched_depth").sort(keys), check_exact=False, rel_tol=1e-9
    )
    matched = cka.filter(pl.col("matched_depth") & (pl.col("model_a") != pl.col("model_b")))
    assert sorted(set(zip(matched["layer_a"], matched["layer_b"]))) == [
        (0, 0),
        (full[SLUGS[0]].n_layers - 1, full[SLUGS[1]].n_layers - 1),
    ]
    analysis_report_step(out, VARIANT, list(SLUGS), dataset, ends[SLUGS[0]].emotions, include_stability=False)
    assert f"stored: [0, {full[SLUGS[0]].n_layers - 1}]" in report_path(out, VARIANT).read_text(encoding="utf-8")


def test_vector_stability_compares_the_layers_both_variants_stored(extracted, small_datasets, tmp_path):
    """Emotion vectors of all layers in one variant and of layers 0 and -1 in another (the same sentences): the
    stability table has those two layers only, where the vectors are the same (cosine 1)."""
    dataset = small_datasets[VARIANT]
    for variant, name in (("every_layer", "full"), ("two_layers", "ends")):
        acts = _load(extracted, name, "tiny-gpt2", dataset)
        acts.variant = variant
        emotion_vectors_step(acts, tmp_path)
    step = vector_stability_step(tmp_path, ["every_layer", "two_layers"], ["tiny-gpt2"])
    table = pl.read_parquet(step.tables["vector_stability"].path)
    assert sorted(set(table["layer"])) == [0, acts.n_layers - 1]
    np.testing.assert_allclose(table["cosine_centred"].to_numpy(), 1.0, atol=1e-9)


@pytest.mark.parametrize("name", ["sentence_end", "mean"])
def test_one_row_per_sentence_runs_everything_but_token_vectors(extracted, small_datasets, name):
    """Files of one row per sentence as the extraction writes them (format version 2, `positions` in the header):
    every sentence-end step runs on them with the values their rows give (sentence_end: the reference's tables;
    mean: emotion vectors of numpy means of the reference's token rows), and the token vectors say they do not
    apply - in their file's metadata, the step's summary and notes, and the report."""
    dataset = small_datasets[VARIANT]
    results, emotions = extracted[name]
    models = {slug: _load(extracted, name, slug, dataset) for slug in SLUGS}
    full = {slug: _load(extracted, "full", slug, dataset) for slug in SLUGS}
    acts, reference = models["tiny-gpt2"], full["tiny-gpt2"]
    header = ActivationFile(activation_file(activation_dir(results, VARIANT, "tiny-gpt2"), emotions[0])).header
    assert header.positions == name == acts.positions and header.format_version >= 2
    for slug in SLUGS:
        steps = {
            "vectors": emotion_vectors_step(models[slug], results),
            "subspaces": emotion_subspaces_step(models[slug], results, k=3, n_random=10),
            "probes": linear_probes_step(models[slug], results, cv_folds=3, seed=0),
        }
        model_plots_step(results, VARIANT, slug)
        tokens = token_strings(models[slug])
        assert tokens.tokens is None and tokens.status.startswith("not applicable: the activation files store")
        step = token_vectors_step(models[slug], results, LEXICON, tokens)
        assert step.summary["token_status"] == tokens.status and any("not applicable" in n for n in step.notes)
        assert step.tables["token_vectors"].rows == 0 == step.tables["lexicon_tokens"].rows
        with safe_open(str(step.files["vectors"]), framework="numpy") as handle:
            assert handle.metadata()["token_status"] == tokens.status and not list(handle.keys())
        if name == "sentence_end":
            reference_dir = Path(results).parent / f"reference-{slug}"
            of_reference = {
                "vectors": emotion_vectors_step(full[slug], reference_dir),
                "subspaces": emotion_subspaces_step(full[slug], reference_dir, k=3, n_random=10),
                "probes": linear_probes_step(full[slug], reference_dir, cv_folds=3, seed=0),
            }
            for step_name, written in steps.items():
                for table, frame in _tables(written).items():
                    assert_frame_equal(frame, _tables(of_reference[step_name])[table])
    if name == "mean":
        blocks = reference.token_blocks("resid_post")
        token_means = np.concatenate(
            [
                np.stack(
                    [block[-1, rows].mean(axis=0, dtype=np.float64) for rows in reference.files[e].sentence_slices()]
                )
                for e, block in zip(reference.emotions, blocks)
            ]
        )
        expected = emotion_vectors(
            token_means, reference.labels, reference.emotions, reference_emotion(reference.emotions)
        )
        path = model_analysis_dir(results, VARIANT, "tiny-gpt2") / "emotion_vectors.safetensors"
        with safe_open(str(path), framework="numpy") as handle:
            np.testing.assert_allclose(handle.get_tensor("resid_post/means")[-1], expected.means, rtol=1e-5, atol=1e-5)
    cross = cross_model_alignment_step(models, results, VARIANT, k=3, n_random=5)
    n_a, n_b = (models[slug].n_layers for slug in SLUGS)
    assert cross.tables["cka"].rows == len(acts.kinds) * (n_a * n_a + n_a * n_b + n_b * n_b)
    report = analysis_report_step(results, VARIANT, list(SLUGS), dataset, emotions, include_stability=False)
    assert any("tiny-gpt2: token strings not applicable" in note for note in report.notes)
    assert "token strings not applicable" in report_path(results, VARIANT).read_text(encoding="utf-8")
