"""The per-model analysis orchestration on synthetic activation files with planted structure.

The math itself is tested in the other modules here (planted directions, CKA invariance, principal angles,
random overlap); these tests check the plumbing: the per-emotion files are concatenated in the right order,
every output is written where the layout says, its tables have the advertised rows, the planted structure
survives the trip through files, and stale or inconsistent inputs fail loudly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from safetensors import safe_open
from safetensors.numpy import load_file

from emo_assets.core.activations import ActivationHeader, write_activation_file
from emo_assets.core.analysis.comparisons import (
    cross_model_alignment_step,
    matched_layers,
    stability_path,
    vector_stability_step,
)
from emo_assets.core.analysis.inputs import (
    AnalysisInputError,
    ModelActivations,
    TokenStrings,
    model_analysis_dir,
    report_path,
    token_strings,
    write_safetensors,
)
from emo_assets.core.analysis.model_analysis import (
    emotion_subspaces_step,
    emotion_vectors_step,
    linear_probes_step,
    model_plots_step,
    token_vectors_step,
)
from emo_assets.core.analysis.variant_report import analysis_report_step
from emo_assets.core.offline_models import train_tokenizer
from emo_assets.core.paths import activation_dir, activation_file

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
WORDS = {"gratitude": "thanks", "anger": "furious", "apology": "sorry", "neutral": "table"}
LEXICON = {"gratitude": ["thank"], "anger": ["furious"], "apology": ["sorry"]}
PER_EMOTION, N_LAYERS, KINDS = 10, 3, ("resid_post", "mlp_out")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(variant: str) -> list[dict]:
    subjects = [
        "my sister",
        "the driver",
        "our team",
        "the nurse",
        "your friend",
        "the waiter",
        "a neighbour",
        "the teacher",
        "his boss",
        "the pilot",
        "her cousin",
        "the baker",
    ]
    extra = " today" if variant == "extended" else ""
    return [
        {"id": f"{e}-{i:03d}", "emotion": e, "text": f"I said {WORDS[e]} to {subjects[i]} again{extra}."}
        for e in EMOTIONS
        for i in range(PER_EMOTION)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["text"] for v in ("baseline", "extended") for r in _records(v)]
    return train_tokenizer(texts * 3, vocab_size=300)


def _write_model(results: Path, variant: str, slug: str, d: int, tokenizer, seed: int, dataset: Path) -> None:
    """Activations = large common offset + noise + a planted direction per emotion at the sentence end
    (growing with depth) and at the emotion-word tokens; the first token of every sentence gets a huge norm
    (attention sink) that the first-token-free means must ignore."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.standard_normal((d, 8)))[0].T  # orthonormal rows
    for e_index, emotion in enumerate(EMOTIONS):
        records = [r for r in _records(variant) if r["emotion"] == emotion]
        ids = [tokenizer(r["text"], add_special_tokens=False)["input_ids"] for r in records]
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        tokens = [tokenizer.convert_ids_to_tokens(x) for x in ids]
        arrays = {}
        for _k_index, kind in enumerate(KINDS):
            acts = 20.0 + rng.standard_normal((N_LAYERS, int(offsets[-1]), d)).astype(np.float32)
            for s, (start, toks) in enumerate(zip(offsets[:-1], tokens)):
                acts[:, start] += 500.0  # attention sink
                for layer in range(N_LAYERS):
                    acts[layer, offsets[s + 1] - 1] += 6.0 * (layer + 1) * directions[e_index]
                    for t, tok in enumerate(toks):
                        if t and tok.lstrip("Ġ").lower().startswith(WORDS[emotion]) and emotion != "neutral":
                            acts[layer, start + t] += 8.0 * directions[4 + e_index]
            arrays[kind] = acts.astype(np.float32)
        write_activation_file(
            activation_file(activation_dir(results, variant, slug), emotion),
            arrays,
            offsets=offsets,
            input_ids=np.concatenate(ids),
            header=ActivationHeader(
                n_layers=N_LAYERS,
                d_model=d,
                kinds=tuple(arrays),
                emotion=emotion,
                model_id=slug,
                model_revision="r1",
                dataset_sha256="x",
                prepend_bos=False,
                sentence_ids=tuple(r["id"] for r in records),
            ),
        )
    np.save(results / f"{variant}-{slug}-directions.npy", directions)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("model_analysis")
    results = root / "results"
    datasets = {}
    for variant in ("baseline", "extended"):
        datasets[variant] = root / f"{variant}.jsonl"
        datasets[variant].write_text("".join(json.dumps(r) + "\n" for r in _records(variant)), encoding="utf-8")
        for slug, d, seed in (("model-a", 16, 1), ("model-b", 16, 2), ("narrow", 8, 3)):
            _write_model(results, variant, slug, d, tokenizer, seed, datasets[variant])
    return results, datasets


@pytest.fixture(scope="module")
def baseline_a(workspace, tokenizer):
    results, datasets = workspace
    acts = ModelActivations.load(results, "baseline", "model-a", EMOTIONS, dataset_path=datasets["baseline"])
    tokens = token_strings(acts, tokenizer=tokenizer)
    outputs = {
        "vectors": emotion_vectors_step(acts, results),
        "tokens": token_vectors_step(acts, results, LEXICON, tokens),
        "subspaces": emotion_subspaces_step(acts, results, k=4, n_random=20),
        "probes": linear_probes_step(acts, results, cv_folds=5, seed=0),
    }
    outputs["plots"] = model_plots_step(results, "baseline", "model-a")
    return acts, tokens, outputs


def _check_tables(step) -> None:
    for table in step.tables.values():
        assert table.path.is_file()
        assert pl.read_parquet(table.path).height == table.rows
    for path in step.files.values():
        assert Path(path).is_file()


def _check_png(path: Path) -> None:
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_files_are_concatenated_in_emotion_order(baseline_a):
    acts, _, _ = baseline_a
    assert acts.labels == [e for e in EMOTIONS for _ in range(PER_EMOTION)]
    assert acts.sentence_ids[:2] == ["gratitude-000", "gratitude-001"] and acts.sentence_ids[-1] == "neutral-009"
    assert acts.texts[0] == "I said thanks to my sister again."
    X = acts.sentence_end("resid_post")
    assert X.shape == (N_LAYERS, 4 * PER_EMOTION, 16) and X.dtype == np.float32
    anger = acts.files["anger"]
    np.testing.assert_array_equal(X[1, PER_EMOTION : 2 * PER_EMOTION], anger.sentence_end("resid_post", 1))
    assert acts.offsets[-1] == sum(f.n_tokens for f in acts.files.values())


def test_emotion_vectors_outputs_and_planted_directions(baseline_a, workspace):
    acts, _, out = baseline_a
    step = out["vectors"]
    _check_tables(step)
    assert step.tables["emotion_vectors"].rows == len(KINDS) * N_LAYERS * 4
    assert step.tables["emotion_cosines"].rows == len(KINDS) * N_LAYERS * 16
    assert step.tables["separation"].rows == len(KINDS) * N_LAYERS
    tensors = load_file(step.files["vectors"])
    assert tensors["resid_post/means"].shape == (N_LAYERS, 4, 16)
    assert tensors["resid_post/cosine"].shape == (N_LAYERS, 4, 4)
    directions = np.load(workspace[0] / "baseline-model-a-directions.npy")[:4]
    planted = directions - directions.mean(axis=0)
    centred = tensors["resid_post/centred"][-1]
    cos = np.sum(centred * planted, axis=1) / np.linalg.norm(centred, axis=1) / np.linalg.norm(planted, axis=1)
    assert np.all(cos > 0.99)
    # anisotropy: raw cosines ~1, centred ones not
    assert step.summary["resid_post/last_layer_mean_cosine_raw"] > 0.9
    assert step.summary["resid_post/last_layer_mean_cosine_centred"] < 0
    assert step.summary["resid_post/best_separation_layer"] == N_LAYERS - 1


def test_token_vectors_match_lexicon_and_skip_the_sink(baseline_a, workspace):
    acts, tokens, out = baseline_a
    assert tokens.tokens is not None and tokens.status.startswith("verified")
    step = out["tokens"]
    _check_tables(step)
    table = pl.read_parquet(step.tables["token_vectors"].path)
    assert table.height == len(KINDS) * N_LAYERS * 4 * 2
    words = table.filter(
        (pl.col("source") == "emotion_word") & (pl.col("kind") == "resid_post") & (pl.col("layer") == 0)
    )
    counts = dict(zip(words["emotion"], words["n_tokens"]))
    assert counts == {"gratitude": PER_EMOTION, "anger": PER_EMOTION, "apology": PER_EMOTION, "neutral": 0}
    assert words.filter(pl.col("emotion") == "neutral")["cosine_centred"].is_nan().all()
    lex = pl.read_parquet(step.tables["lexicon_tokens"].path)
    assert set(lex["emotion"]) == {"gratitude", "anger", "apology"}
    # first-token-free means do not follow the 500-norm sink: their centred vectors carry the planted signal
    tensors = load_file(step.files["vectors"])
    assert np.all(np.isfinite(tensors["resid_post/content_centred"]))
    assert tensors["resid_post/word_counts"].shape == (N_LAYERS, 4)


def test_token_vectors_without_trusted_tokens(workspace, tmp_path):
    results, datasets = workspace
    acts = ModelActivations.load(results, "baseline", "model-b", EMOTIONS, dataset_path=datasets["baseline"])
    other = train_tokenizer(["completely different words here"] * 5, vocab_size=260)
    tokens = token_strings(acts, tokenizer=other)
    assert tokens.tokens is None and "does not reproduce" in tokens.status
    step = token_vectors_step(acts, tmp_path, LEXICON, tokens)
    table = pl.read_parquet(step.tables["token_vectors"].path)
    assert table.filter(pl.col("source") == "emotion_word")["n_tokens"].sum() == 0
    assert step.tables["lexicon_tokens"].rows == 0 and any("skipped" in n for n in step.notes)
    no_texts = TokenStrings(None, "x")
    assert token_vectors_step(acts, tmp_path, LEXICON, no_texts).summary["token_status"] == "x"


def test_subspaces_and_probes(baseline_a):
    _, _, out = baseline_a
    sub = out["subspaces"]
    _check_tables(sub)
    assert sub.tables["subspaces"].rows == len(KINDS) * N_LAYERS * 4
    assert sub.tables["subspace_pairs"].rows == len(KINDS) * N_LAYERS * 6
    pairs = pl.read_parquet(sub.tables["subspace_pairs"].path)
    assert pairs["overlap"].is_between(0, 1).all() and (pairs["random_overlap_analytical"] == 4 / 16).all()
    bases = load_file(sub.files["bases"])
    assert bases["resid_post/L02/anger/basis"].shape == (16, 4)

    probes = out["probes"]
    _check_tables(probes)
    table = pl.read_parquet(probes.tables["probes"].path)
    assert table.height == len(KINDS) * N_LAYERS and table["model"].unique().to_list() == ["model-a"]
    assert probes.summary["best_accuracy"] > 0.9 and probes.summary["best_kind"] == "resid_post"
    assert probes.summary["bow_accuracy"] > 0.9  # the emotion word gives it away, as in the real data
    assert table["control_mean"].max() < 0.6  # chance is 0.25; 40 sentences leave noise


def test_model_plots_are_pngs(baseline_a):
    _, _, out = baseline_a
    step = out["plots"]
    assert set(step.files) == {"layer_profile", "cosine_heatmap"}
    for path in step.files.values():
        _check_png(path)
    assert step.summary["best_layer"] == out["probes"].summary["best_layer"]


def test_cross_model_alignment_skips_unequal_widths(workspace):
    results, datasets = workspace
    models = {s: ModelActivations.load(results, "baseline", s, EMOTIONS) for s in ("model-a", "model-b", "narrow")}
    step = cross_model_alignment_step(models, results, "baseline", k=4, n_random=20)
    _check_tables(step)
    cka = pl.read_parquet(step.tables["cka"].path)
    # 6 unordered pairs with self pairs, 3 x 3 layer pairs each, 2 kinds
    assert cka.height == 6 * N_LAYERS * N_LAYERS * len(KINDS)
    self_diag = cka.filter((pl.col("model_a") == pl.col("model_b")) & (pl.col("layer_a") == pl.col("layer_b")))
    np.testing.assert_allclose(self_diag["cka"].to_numpy(), 1.0, atol=1e-9)
    np.testing.assert_allclose(self_diag["cka_debiased"].to_numpy(), 1.0, atol=1e-9)
    assert step.tables["rsa"].rows == cka.height
    overlap = pl.read_parquet(step.tables["subspace_overlap"].path)
    assert set(zip(overlap["model_a"], overlap["model_b"])) == {("model-a", "model-b")}
    assert overlap.height == N_LAYERS * 4 * len(KINDS)
    assert step.summary["skipped_overlap_pairs"] == 2 and any("narrow (d=8)" in n for n in step.notes)
    _check_png(step.files["cka_heatmap"])


def test_cross_model_alignment_reuses_only_fitting_per_model_outputs(workspace, tmp_path):
    results, _ = workspace
    shutil.copytree(results / "baseline" / "activations", tmp_path / "baseline" / "activations")
    models = {s: ModelActivations.load(tmp_path, "baseline", s, EMOTIONS) for s in ("model-a", "model-b")}

    def run(k=4):
        step = cross_model_alignment_step(models, tmp_path, "baseline", k=k, n_random=5)
        notes = [n for n in step.notes if "computed here" in n]
        return notes, {name: pl.read_parquet(table.path) for name, table in step.tables.items()}

    notes, computed = run()
    assert [n.split(":")[0] for n in notes] == ["model-a", "model-b"] and all("no " in n for n in notes)
    for acts in models.values():
        emotion_vectors_step(acts, tmp_path)
        emotion_subspaces_step(acts, tmp_path, k=4, n_random=5)
    notes, reused = run()
    assert notes == []
    for name, table in reused.items():
        assert_frame_equal(table, computed[name], check_exact=False, rel_tol=0, abs_tol=1e-12)
    notes, _ = run(k=3)
    assert len(notes) == 2 and all("written for other activations or settings" in n for n in notes)
    # same metadata, other activations: one emotion mean moved by 1e-6 (the activations are ~20)
    path = model_analysis_dir(tmp_path, "baseline", "model-b") / "emotion_subspaces.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        meta, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["mlp_out/L01/anger/mean"][3] += 1e-6
    write_safetensors(tensors, path, meta)
    notes, stale = run()
    assert len(notes) == 1 and notes[0].startswith("model-b:") and "other activations' means" in notes[0]
    for name, table in stale.items():
        assert_frame_equal(table, computed[name], check_exact=False, rel_tol=0, abs_tol=1e-12)


def test_single_model_alignment_plots_self_cka(workspace, tmp_path):
    results, _ = workspace
    models = {"model-a": ModelActivations.load(results, "baseline", "model-a", EMOTIONS)}
    step = cross_model_alignment_step(models, tmp_path, "baseline", k=4, n_random=5)
    assert step.tables["subspace_overlap"].rows == 0 and step.tables["cka"].rows == N_LAYERS**2 * len(KINDS)
    _check_png(step.files["cka_heatmap"])


def test_matched_layers():
    assert matched_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert matched_layers(3, 5) == [(0, 0), (1, 2), (2, 4)]
    assert matched_layers(1, 4) == [(0, 3)]


def test_vector_stability_and_report(workspace, baseline_a, tmp_path):
    results, datasets = workspace
    for variant in ("baseline", "extended"):
        for slug in ("model-a", "model-b"):
            acts = ModelActivations.load(results, variant, slug, EMOTIONS, dataset_path=datasets[variant])
            emotion_vectors_step(acts, results)
    step = vector_stability_step(results, ["baseline", "extended"], ["model-a", "model-b"])
    _check_tables(step)
    assert step.tables["vector_stability"].path == stability_path(results)
    table = pl.read_parquet(stability_path(results))
    assert table.height == 2 * len(KINDS) * N_LAYERS * 4
    # same planted directions (same seed) in both variants: the last layer's vectors agree
    last = table.filter((pl.col("layer") == N_LAYERS - 1) & (pl.col("kind") == "resid_post"))
    assert last["cosine_centred"].min() > 0.95
    with pytest.raises(FileNotFoundError, match="narrow"):
        vector_stability_step(results, ["baseline", "extended"], ["narrow"])

    models = {s: ModelActivations.load(results, "baseline", s, EMOTIONS) for s in ("model-a", "model-b")}
    cross_model_alignment_step(models, results, "baseline", k=4, n_random=5)
    report = analysis_report_step(results, "baseline", ["model-a", "model-b"], datasets["baseline"], EMOTIONS)
    path = report_path(results, "baseline")
    assert report.files["report"] == path
    text = path.read_text(encoding="utf-8")
    assert "## Probe accuracy per layer" in text and "## Stability" in text
    assert "no probe results yet for: model-b" in text
    # problems are the notes the asset logs as warnings; checks that passed are in the report only
    assert "no probe results yet for: model-b" in report.notes
    verified = [line[2:] for line in text.splitlines() if line.startswith("- ") and "token strings verified" in line]
    assert verified and not set(verified) & set(report.notes)
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == report.summary["n_images"] == 3  # model-a's two figures + the CKA heatmap
    for link in links:
        assert not Path(link).is_absolute() and (path.parent / link).is_file()


def test_inconsistent_inputs_fail(workspace, tmp_path):
    results, datasets = workspace
    with pytest.raises(AnalysisInputError, match="missing"):
        ModelActivations.load(results, "baseline", "no-such-model", EMOTIONS)
    stale = tmp_path / "stale.jsonl"
    stale.write_text("".join(json.dumps(r) + "\n" for r in _records("baseline")[1:]), encoding="utf-8")
    with pytest.raises(AnalysisInputError, match="stale"):
        ModelActivations.load(results, "baseline", "model-a", EMOTIONS, dataset_path=stale)
    files = ModelActivations.load(results, "baseline", "model-a", EMOTIONS).files
    swapped = {**files, "gratitude": files["anger"], "anger": files["gratitude"]}
    with pytest.raises(AnalysisInputError, match="holds emotion"):
        ModelActivations.from_files("baseline", "model-a", swapped)


def test_outputs_live_under_the_model_folder(baseline_a, workspace):
    results, _ = workspace
    folder = model_analysis_dir(results, "baseline", "model-a")
    for step in baseline_a[2].values():
        for path in step.paths():
            assert Path(path).parent == folder
    assert not list(folder.glob(".*tmp-*"))  # no temp files left behind
