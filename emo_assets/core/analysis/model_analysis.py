"""The analysis of one model of one dataset variant: plain-Python orchestration of the analysis library.

One function per Dagster asset; each takes a `ModelActivations` (files opened once), computes with the math
modules under one BLAS thread, writes its outputs atomically under `results/<variant>/analysis/<slug>/`
(see `inputs` for the layout) and returns a `StepResult`: the files written, each table's row count, headline
numbers and notes - what the asset puts in its metadata. Nothing here imports Dagster.

- `emotion_vectors_step`  sentence-end mean vectors, differences vs neutral / grand mean, cosines, separation
- `token_vectors_step`    first-token-free sentence means and emotion-word token vectors vs sentence-end ones
- `emotion_subspaces_step` per-emotion PCA subspaces, explained variance, principal angles, overlap
- `linear_probes_step`    per-layer 4-way probes, bag-of-words baseline, shuffled-label control, selectivity
- `model_plots_step`      layer profile (separation + probes) and the cosine heatmap at the best probe layer

The module is longer than the math modules because it holds one step per per-model asset; each step is short,
and together they are the single place that fixes the file layout of a model's analysis outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from emo_assets.core.analysis.blas import one_blas_thread
from emo_assets.core.analysis.inputs import (
    ModelActivations,
    TokenStrings,
    frame,
    label_layers,
    model_analysis_dir,
    reference_emotion,
    stored_layers,
    write_parquet,
    write_safetensors,
)
from emo_assets.core.analysis.labels import encode_labels
from emo_assets.core.analysis.plots import plot_cosine_heatmap, plot_layer_profile
from emo_assets.core.analysis.probes import ProbeSettings, best_layers, probe_layers
from emo_assets.core.analysis.subspaces import (
    DEFAULT_K,
    emotion_subspaces_by_layer,
    empirical_random_overlap,
    expected_random_overlap,
    overlaps_and_angles,
    subspace_rows,
)
from emo_assets.core.analysis.token_vectors import lexicon_matches, normalise_token, token_vectors_by_layer
from emo_assets.core.analysis.vectors import (
    EmotionVectors,
    class_means,
    cosine_matrix,
    emotion_vectors_by_layer,
    separation_rows,
)

PRIMARY_KIND = "resid_post"  # the kind whose best layer is the headline


@dataclass
class TableFile:
    path: Path
    rows: int


@dataclass
class StepResult:
    """What one step wrote and found: the asset's metadata comes from here."""

    tables: dict[str, TableFile] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str, data: pl.DataFrame, path: Path, metadata: Mapping[str, str] | None = None) -> None:
        self.tables[name] = TableFile(Path(path), write_parquet(data, Path(path), metadata))

    def paths(self) -> list[Path]:
        return [t.path for t in self.tables.values()] + list(self.files.values())


def _out_dir(acts: ModelActivations, results_dir: Path) -> Path:
    return model_analysis_dir(Path(results_dir), acts.variant, acts.slug)


def _vectors_by_layer(kind: str, acts: ModelActivations) -> list[EmotionVectors]:
    return emotion_vectors_by_layer(
        acts.sentence_end_layers(kind), acts.labels, acts.emotions, reference_emotion(acts.emotions)
    )


# -- sentence-end emotion vectors --------------------------------------------------------------------------
VECTOR_FIELDS = (
    "means",
    "grand_mean",
    "diff_vs_reference",
    "diff_vs_reference_unit",
    "diff_vs_reference_norm",
    "centred",
    "centred_unit",
    "centred_norm",
    "cosine",
    "cosine_raw",
)


def emotion_vectors_step(acts: ModelActivations, results_dir: Path) -> StepResult:
    """Per kind and layer: per-emotion mean sentence-end activation; differences vs the reference (neutral)
    and vs the grand mean, unit versions and norms; centred and raw cosine matrices; separation score.

    Files: `emotion_vectors.safetensors` (tensors `<kind>/<field>` stacked over the stored layers - metadata
    `layers` - [L, E, d], [L, d], [L, E] or [L, E, E]), `emotion_vectors.parquet` (kind, layer, emotion: counts and norms),
    `emotion_cosines.parquet` (kind, layer, emotion_a, emotion_b: centred / raw / vs-reference cosines),
    `separation.parquet` (`vectors.separation_rows`)."""
    out = _out_dir(acts, results_dir)
    result = StepResult()
    tensors: dict[str, np.ndarray] = {}
    vector_rows, cosine_rows, sep_rows = [], [], []
    with one_blas_thread():
        for kind in acts.kinds:
            by_layer = _vectors_by_layer(kind, acts)
            for name in VECTOR_FIELDS:
                tensors[f"{kind}/{name}"] = np.stack([getattr(v, name) for v in by_layer])
            tensors[f"{kind}/counts"] = by_layer[0].counts.astype(np.int64)
            tensors[f"{kind}/separation"] = np.array([v.separation.ratio for v in by_layer])
            sep_rows += separation_rows(by_layer, model=acts.slug, kind=kind)
            for layer, vec in zip(acts.layers, by_layer):
                diff_cos = cosine_matrix(vec.diff_vs_reference)
                for e, emotion in enumerate(vec.emotions):
                    vector_rows.append(
                        {
                            "model": acts.slug,
                            "kind": kind,
                            "layer": layer,
                            "emotion": emotion,
                            "n_sentences": int(vec.counts[e]),
                            "norm_mean": float(np.linalg.norm(vec.means[e])),
                            "norm_diff_vs_reference": float(vec.diff_vs_reference_norm[e]),
                            "norm_centred": float(vec.centred_norm[e]),
                        }
                    )
                    for f, other in enumerate(vec.emotions):
                        cosine_rows.append(
                            {
                                "model": acts.slug,
                                "kind": kind,
                                "layer": layer,
                                "emotion_a": emotion,
                                "emotion_b": other,
                                "cosine_centred": float(vec.cosine[e, f]),
                                "cosine_raw": float(vec.cosine_raw[e, f]),
                                "cosine_diff_vs_reference": float(diff_cos[e, f]),
                            }
                        )
    meta = {
        **acts.keys(),
        "reference": reference_emotion(acts.emotions),
        "kinds": json.dumps(list(acts.kinds)),
        "fields": json.dumps(list(VECTOR_FIELDS) + ["counts", "separation"]),
    }
    result.files["vectors"] = write_safetensors(tensors, out / "emotion_vectors.safetensors", meta)
    result.table("emotion_vectors", frame(vector_rows), out / "emotion_vectors.parquet")
    result.table("emotion_cosines", frame(cosine_rows), out / "emotion_cosines.parquet")
    separation = label_layers(frame(sep_rows), acts.layers)
    result.table("separation", separation, out / "separation.parquet")
    for kind in acts.kinds:
        sub = separation.filter(pl.col("kind") == kind).sort(["separation", "layer"], descending=[True, False])
        best = sub.row(0, named=True)
        result.summary[f"{kind}/best_separation_layer"] = int(best["layer"])
        result.summary[f"{kind}/best_separation"] = float(best["separation"])
        last = separation.filter((pl.col("kind") == kind) & (pl.col("layer") == acts.layers[-1])).row(0, named=True)
        result.summary[f"{kind}/last_layer_mean_cosine_raw"] = float(last["mean_offdiag_cosine_raw"])
        result.summary[f"{kind}/last_layer_mean_cosine_centred"] = float(last["mean_offdiag_cosine_centred"])
    result.summary.update(n_layers=acts.n_layers, d_model=acts.d_model, n_sentences=acts.n_sentences)
    result.notes += acts.notes
    return result


# -- token-level vectors --------------------------------------------------------------------------------
def token_vectors_step(
    acts: ModelActivations,
    results_dir: Path,
    lexicon: Mapping[str, Sequence[str]],
    tokens: TokenStrings,
) -> StepResult:
    """(a) per-sentence mean over tokens excluding the first ("content_mean") and (b) emotion-word token
    vectors from `lexicon` ("emotion_word"), each turned into per-emotion vectors and compared (cosine of the
    centred vectors, and raw for contrast) with the sentence-end vectors of the same layer and kind.

    Without trusted token strings (`tokens.tokens is None`) part (b) is skipped (NaN cosines, 0 counts) and
    `tokens.status` says why. Files: `token_vectors.safetensors` (`<kind>/content_centred`,
    `<kind>/word_vectors`, `<kind>/word_centred` [L, E, d], `<kind>/word_counts` [L, E]),
    `token_vectors.parquet` (kind, layer, emotion, source, n_tokens, n_sentences, cosine_centred, cosine_raw),
    `lexicon_tokens.parquet` (emotion, token, count: what the tokenizer left visible of the lexicon)."""
    out = _out_dir(acts, results_dir)
    result = StepResult()
    lexicon = {e: list(stems) for e, stems in lexicon.items() if e in acts.emotions}
    if (reason := acts.token_level_unavailable()) is not None:
        return _token_vectors_not_applicable(acts, out, lexicon, reason)
    matches = None
    lex_rows = []
    if tokens.tokens is not None:
        matches = lexicon_matches(tokens.tokens, acts.offsets, acts.labels, lexicon, acts.emotions)
        for e, emotion in enumerate(acts.emotions):
            found: dict[str, int] = {}
            for j in np.flatnonzero(matches[e]):
                word = normalise_token(tokens.tokens[j])
                found[word] = found.get(word, 0) + 1
            lex_rows += [
                {"model": acts.slug, "emotion": emotion, "token": t, "count": c} for t, c in sorted(found.items())
            ]
    else:
        result.notes.append(f"{acts.slug}: emotion-word vectors skipped: {tokens.status}")
    lengths = np.diff(acts.offsets)
    labels = np.asarray(acts.labels)
    content_tokens = {e: int(np.sum(np.where(lengths > 1, lengths - 1, 1)[labels == e])) for e in acts.emotions}
    tensors: dict[str, np.ndarray] = {}
    rows = []
    E, L = len(acts.emotions), len(acts.layers)
    nan_rows = np.full((L, E, acts.d_model), np.nan)
    y = encode_labels(acts.labels, acts.emotions)
    with one_blas_thread():
        for kind in acts.kinds:
            sentence_end = _vectors_by_layer(kind, acts)
            se_centred = np.stack([v.centred for v in sentence_end])
            se_means = np.stack([v.means for v in sentence_end])
            content, word_layers = token_vectors_by_layer(
                acts.token_blocks(kind), acts.offsets, acts.labels, matches, acts.emotions
            )
            acts.release(kind)  # every token row of every layer was read: hold none of them past this kind
            # the emotion vectors of the content means (as `vectors.emotion_vectors` makes them; only the means
            # and centred vectors are compared)
            c_means, c_counts = class_means(content.means, y, E)
            c_centred = c_means - c_means.mean(axis=-2)[:, None]
            c_cos = np.diagonal(cosine_matrix(c_centred, se_centred), axis1=-2, axis2=-1)
            c_raw = np.diagonal(cosine_matrix(c_means, se_means), axis1=-2, axis2=-1)
            if word_layers is not None:
                w_vectors = np.stack([tv.vectors for tv in word_layers])
                w_centred = np.stack([tv.centred for tv in word_layers])
                w_counts = np.stack([tv.counts for tv in word_layers])
                w_cos = np.diagonal(cosine_matrix(w_centred, se_centred), axis1=-2, axis2=-1)
                w_raw = np.diagonal(cosine_matrix(w_vectors, se_means), axis1=-2, axis2=-1)
                w_vs_c = np.diagonal(cosine_matrix(w_centred, c_centred), axis1=-2, axis2=-1)
                w_sentences = word_layers[0].sentence_counts
            else:
                w_vectors, w_centred, w_counts = nan_rows, nan_rows, np.zeros((L, E), dtype=np.int64)
                w_cos = w_raw = w_vs_c = np.full((L, E), np.nan)
                w_sentences = np.zeros(E, dtype=np.int64)
            for layer in range(L):
                for e, emotion in enumerate(acts.emotions):
                    keys = {"model": acts.slug, "kind": kind, "layer": acts.layers[layer], "emotion": emotion}
                    rows.append(
                        {
                            **keys,
                            "source": "content_mean",
                            "n_tokens": content_tokens[emotion],
                            "n_sentences": int(c_counts[e]),
                            "cosine_centred": float(c_cos[layer, e]),
                            "cosine_raw": float(c_raw[layer, e]),
                            "cosine_with_content_mean_centred": None,  # defined for emotion-word rows only
                        }
                    )
                    rows.append(
                        {
                            **keys,
                            "source": "emotion_word",
                            "n_tokens": int(w_counts[layer, e]),
                            "n_sentences": int(w_sentences[e]),
                            "cosine_centred": float(w_cos[layer, e]),
                            "cosine_raw": float(w_raw[layer, e]),
                            "cosine_with_content_mean_centred": float(w_vs_c[layer, e]),
                        }
                    )
            tensors[f"{kind}/content_centred"] = c_centred
            tensors[f"{kind}/word_vectors"] = w_vectors
            tensors[f"{kind}/word_centred"] = w_centred
            tensors[f"{kind}/word_counts"] = w_counts.astype(np.int64)
    meta = {
        **acts.keys(),
        "kinds": json.dumps(list(acts.kinds)),
        "lexicon": json.dumps(lexicon, sort_keys=True),
        "token_status": tokens.status,
    }
    result.files["vectors"] = write_safetensors(tensors, out / "token_vectors.safetensors", meta)
    table = frame(rows, TOKEN_VECTOR_SCHEMA)
    result.table("token_vectors", table, out / "token_vectors.parquet")
    result.table("lexicon_tokens", frame(lex_rows, LEXICON_SCHEMA), out / "lexicon_tokens.parquet")
    result.summary["token_status"] = tokens.status
    result.summary["first_token_only_sentences"] = int(np.sum(lengths == 1))
    if matches is not None:
        for e, emotion in enumerate(acts.emotions):
            result.summary[f"matched_tokens/{emotion}"] = int(matches[e].sum())
    words = table.filter((pl.col("source") == "emotion_word") & (pl.col("kind") == acts.kinds[0]))
    for layer in (acts.layers[0], acts.layers[-1]):
        at = words.filter(pl.col("layer") == layer)["cosine_centred"].drop_nans().drop_nulls()
        result.summary[f"{acts.kinds[0]}/L{layer}/mean_word_vs_sentence_end_cosine"] = (
            float(at.mean()) if len(at) else float("nan")
        )
    return result


TOKEN_VECTOR_SCHEMA = {
    "model": pl.String,
    "kind": pl.String,
    "layer": pl.Int64,
    "emotion": pl.String,
    "source": pl.String,
    "n_tokens": pl.Int64,
    "n_sentences": pl.Int64,
    "cosine_centred": pl.Float64,
    "cosine_raw": pl.Float64,
    "cosine_with_content_mean_centred": pl.Float64,
}
LEXICON_SCHEMA = {"model": pl.String, "emotion": pl.String, "token": pl.String, "count": pl.Int64}


def _token_vectors_not_applicable(
    acts: ModelActivations, out: Path, lexicon: Mapping[str, Sequence[str]], reason: str
) -> StepResult:
    """`token_vectors_step` on files without every token: the same files, with no rows and no tensors, and the
    reason as the token status (in the safetensors metadata, the step's summary and notes, and so the report)."""
    result = StepResult()
    status = f"not applicable: {reason}"
    meta = {
        **acts.keys(),
        "kinds": json.dumps(list(acts.kinds)),
        "lexicon": json.dumps(lexicon, sort_keys=True),
        "token_status": status,
    }
    result.files["vectors"] = write_safetensors({}, out / "token_vectors.safetensors", meta)
    result.table("token_vectors", frame([], TOKEN_VECTOR_SCHEMA), out / "token_vectors.parquet")
    result.table("lexicon_tokens", frame([], LEXICON_SCHEMA), out / "lexicon_tokens.parquet")
    result.summary["token_status"] = status
    result.notes.append(f"{acts.slug}: token vectors {status}")
    return result


# -- subspaces -----------------------------------------------------------------------------------------
def emotion_subspaces_step(
    acts: ModelActivations, results_dir: Path, k: int = DEFAULT_K, *, n_random: int = 200, seed: int = 0
) -> StepResult:
    """Per kind, layer and emotion: PCA subspace (top-k of that emotion's centred sentence-end activations;
    k clipped to n_e - 1), explained variance, and between emotions principal angles and overlap next to an
    empirical random-subspace baseline (`n_random` draws, fixed `seed`) and the analytical max(k)/d.

    Files: `emotion_subspaces.safetensors` (`<kind>/L<layer>/<emotion>/{basis,explained_variance_ratio,mean}`),
    `subspaces.parquet` (`subspaces.subspace_rows` + empirical baseline), `subspace_pairs.parquet`
    (kind, layer, emotion_a, emotion_b, k, overlap, mean/min/max angle, baselines)."""
    out = _out_dir(acts, results_dir)
    result = StepResult()
    tensors: dict[str, np.ndarray] = {}
    rows, pair_rows = [], []

    def baseline(d: int, k1: int, k2: int):
        return empirical_random_overlap(d, max(k1, k2), min(k1, k2), n_draws=n_random, seed=seed)

    with one_blas_thread():
        for kind in acts.kinds:
            by_layer = emotion_subspaces_by_layer(acts.sentence_end_layers(kind), acts.labels, acts.emotions, k)
            for layer, subspaces in zip(acts.layers, by_layer):
                if missing := [e for e in acts.emotions if e not in subspaces]:
                    result.notes.append(
                        f"{acts.slug}: {kind} layer {layer}: no variance at the sentence end for "
                        f"{', '.join(missing)} (every sentence gives the same vector): no subspace"
                    )
            for row in subspace_rows(by_layer, model=acts.slug, kind=kind):
                sub = by_layer[row["layer"]][row["emotion"]]
                base = baseline(sub.d, sub.k, sub.k)
                row.update(layer=acts.layers[row["layer"]], random_overlap_mean=base.mean, random_overlap_std=base.std)
                rows.append(row)
            pairs = []
            for layer, subspaces in enumerate(by_layer):
                for emotion, sub in subspaces.items():
                    prefix = f"{kind}/L{acts.layers[layer]:02d}/{emotion}"
                    tensors[f"{prefix}/basis"] = sub.basis
                    tensors[f"{prefix}/explained_variance_ratio"] = sub.explained_variance_ratio
                    tensors[f"{prefix}/mean"] = sub.mean
                names = list(subspaces)
                pairs += [(layer, a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
            overlaps, angles = overlaps_and_angles(
                [by_layer[layer][a] for layer, a, _ in pairs], [by_layer[layer][b] for layer, _, b in pairs]
            )
            for (layer, a, b), overlap, theta in zip(pairs, overlaps, angles):
                sa, sb = by_layer[layer][a], by_layer[layer][b]
                base = baseline(sa.d, sa.k, sb.k)
                pair_rows.append(
                    {
                        "model": acts.slug,
                        "kind": kind,
                        "layer": acts.layers[layer],
                        "emotion_a": a,
                        "emotion_b": b,
                        "k": min(sa.k, sb.k),
                        "overlap": float(overlap),
                        "mean_angle_deg": float(theta.mean()),
                        "min_angle_deg": float(theta.min()),
                        "max_angle_deg": float(theta.max()),
                        "random_overlap_mean": base.mean,
                        "random_overlap_std": base.std,
                        "random_overlap_analytical": expected_random_overlap(sa.k, sa.d, sb.k),
                    }
                )
    meta = {**acts.keys(), "k_requested": str(k), "kinds": json.dumps(list(acts.kinds))}
    result.files["bases"] = write_safetensors(tensors, out / "emotion_subspaces.safetensors", meta)
    table = frame(rows)
    pairs = frame(pair_rows)
    result.table("subspaces", table, out / "subspaces.parquet")
    result.table("subspace_pairs", pairs, out / "subspace_pairs.parquet")
    result.summary["k_requested"] = int(k)
    result.summary["k_used_min"] = int(table["k"].min())
    for kind in acts.kinds:
        sub = pairs.filter(pl.col("kind") == kind)
        result.summary[f"{kind}/mean_pair_overlap"] = float(sub["overlap"].mean())
        result.summary[f"{kind}/random_overlap_mean"] = float(sub["random_overlap_mean"].mean())
    return result


# -- probes -----------------------------------------------------------------------------------------------
def linear_probes_step(acts: ModelActivations, results_dir: Path, *, cv_folds: int = 5, seed: int = 0) -> StepResult:
    """Per kind and layer: 4-way L2 logistic regression, stratified `cv_folds`-fold CV (mean, std), the
    bag-of-words baseline on the same folds (needs texts), the shuffled-label control and selectivity
    (`probes.probe_layers`). File: `probes.parquet` (its table plus a model column)."""
    out = _out_dir(acts, results_dir)
    result = StepResult()
    settings = ProbeSettings(n_splits=int(cv_folds), seed=int(seed))
    with one_blas_thread():
        activations = {kind: acts.sentence_end_layers(kind) for kind in acts.kinds}
        probes = probe_layers(activations, acts.labels, acts.texts, acts.emotions, settings)
    table = label_layers(probes.table, acts.layers)
    table = table.with_columns(pl.lit(acts.slug).alias("model")).select(["model", *table.columns])
    result.table("probes", table, out / "probes.parquet", {"model": acts.slug, "variant": acts.variant})
    if acts.texts is None:
        result.notes.append(f"{acts.slug}: no texts, so no bag-of-words baseline")
    best_by_kind = best_layers(table)
    primary = PRIMARY_KIND if PRIMARY_KIND in best_by_kind else next(iter(best_by_kind))
    best = best_by_kind[primary]
    result.summary.update(
        best_kind=primary,
        best_layer=int(best["layer"]),
        best_accuracy=float(best["accuracy_mean"]),
        best_selectivity=float(best["selectivity"]),
        bow_accuracy=float(probes.bow.mean) if probes.bow else float("nan"),
        chance=float(probes.chance),
        n_folds=int(cv_folds),
        probe_seconds=round(probes.seconds, 2),
        all_converged=bool(table["converged"].all()),
    )
    for kind, b in best_by_kind.items():
        result.summary[f"{kind}/best_layer"] = int(b["layer"])
        result.summary[f"{kind}/best_accuracy"] = float(b["accuracy_mean"])
    return result


# -- plots per model --------------------------------------------------------------------------------------
def best_probe_layer(probes: pl.DataFrame, kind: str = PRIMARY_KIND) -> int:
    """Layer with the highest mean accuracy for `kind` (ties: earliest), from a probes table."""
    sub = probes.filter(pl.col("kind") == kind)
    if not sub.height:
        sub = probes
    return int(sub.sort(["accuracy_mean", "layer"], descending=[True, False])["layer"][0])


def model_plots_step(results_dir: Path, variant: str, slug: str) -> StepResult:
    """From the model's `separation.parquet`, `probes.parquet` and `emotion_vectors.safetensors`: the layer
    profile (separation and probe accuracy vs layer with control, bag-of-words and chance) and the heatmap of
    centred emotion-vector cosines at the best probe layer (resid_post). Files: `layer_profile.png`,
    `cosine_heatmap.png`."""
    from safetensors import safe_open

    out = model_analysis_dir(Path(results_dir), variant, slug)
    result = StepResult()
    separation = pl.read_parquet(out / "separation.parquet")
    probes = pl.read_parquet(out / "probes.parquet")
    result.files["layer_profile"] = plot_layer_profile(
        out / "layer_profile.png", probes, separation, title=f"{slug} ({variant}): separation and probe accuracy"
    )
    kind = PRIMARY_KIND if PRIMARY_KIND in probes["kind"].to_list() else probes["kind"][0]
    layer = best_probe_layer(probes, kind)
    with safe_open(str(out / "emotion_vectors.safetensors"), framework="numpy") as handle:
        emotions = json.loads(handle.metadata()["emotions"])
        cosines = handle.get_tensor(f"{kind}/cosine")
        cosine = cosines[stored_layers(handle.metadata(), len(cosines)).index(layer)]
    result.files["cosine_heatmap"] = plot_cosine_heatmap(
        out / "cosine_heatmap.png",
        cosine,
        emotions,
        title=f"{slug} ({variant}) {kind} layer {layer}: centred cosines",
    )
    result.summary.update(best_kind=kind, best_layer=layer)
    return result
