"""Comparisons across models (one dataset variant) and across dataset variants (one model).

- `cross_model_alignment_step`: on the sentences every model saw, per kind: linear CKA (plain and debiased)
  for every layer pair of every model pair (self pairs included: they show a model's own layer similarity),
  RSA of the centred emotion cosine matrices for every layer pair, and - for models of equal width only -
  subspace overlap of the same emotion's PCA subspaces at matched relative depth, next to an empirical
  random baseline. Files under `results/<variant>/analysis/_cross_model/`. Each model's emotion vectors and
  subspaces come from its `emotion_vectors` / `emotion_subspaces` files when those fit the activations
  compared here (`_stored_outputs`), else they are computed again.
- `vector_stability_step`: cosine between the baseline and extended (every pair of variants) centred
  emotion vectors of the same model, kind, layer and emotion, read from the `emotion_vectors` outputs.
  File `results/_cross_variant/vector_stability.parquet`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from emo_assets.core.analysis.alignment import LayerSet, cross_model_subspace_rows, rsa_matrix
from emo_assets.core.analysis.blas import one_blas_thread
from emo_assets.core.analysis.inputs import (
    ModelActivations,
    cross_model_dir,
    cross_variant_dir,
    frame,
    model_analysis_dir,
    reference_emotion,
    stored_layers,
)
from emo_assets.core.analysis.layerwise import layer_chunks
from emo_assets.core.analysis.model_analysis import StepResult
from emo_assets.core.analysis.plots import plot_cka_heatmaps
from emo_assets.core.analysis.subspaces import DEFAULT_K, Subspace, emotion_subspaces_by_layer
from emo_assets.core.analysis.vectors import cosine_matrix, emotion_vectors_by_layer

# the columns that name a layer pair of a model pair, shared by the CKA and RSA tables
LAYER_PAIR_SCHEMA = {
    "model_a": pl.String,
    "model_b": pl.String,
    "kind": pl.String,
    "layer_a": pl.Int64,
    "layer_b": pl.Int64,
    "matched_depth": pl.Boolean,
}
CKA_SCHEMA = {**LAYER_PAIR_SCHEMA, "cka": pl.Float64, "cka_debiased": pl.Float64, "n_sentences": pl.Int64}
RSA_SCHEMA = {**LAYER_PAIR_SCHEMA, "rsa_pearson": pl.Float64, "rsa_spearman": pl.Float64, "n_pairs": pl.Int64}
OVERLAP_SCHEMA = {
    "model_a": pl.String,
    "model_b": pl.String,
    "kind": pl.String,
    "layer_a": pl.Int64,
    "layer_b": pl.Int64,
    "emotion": pl.String,
    "k": pl.Int64,
    "overlap": pl.Float64,
    "mean_angle_deg": pl.Float64,
    "min_angle_deg": pl.Float64,
    "random_overlap_mean": pl.Float64,
    "random_overlap_std": pl.Float64,
    "random_overlap_analytical": pl.Float64,
}


def matched_layers(n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Layer pairs at the same relative depth: every layer of A with layer round(i (n_b-1)/(n_a-1)) of B."""
    if n_a == 1:
        return [(0, n_b - 1)]
    return [(i, int(round(i * (n_b - 1) / (n_a - 1)))) for i in range(n_a)]


def matched_stored_layers(a: ModelActivations, b: ModelActivations) -> list[tuple[int, int]]:
    """`matched_layers` between the layers two models store, as (position in `a.layers`, position in `b.layers`):
    each stored layer of A with the stored layer of B nearest its same-depth partner (the partner itself when B
    stores every layer)."""
    partner = dict(matched_layers(a.n_layers, b.n_layers))
    stored_b = np.asarray(b.layers)
    return [(i, int(np.argmin(np.abs(stored_b - partner[layer])))) for i, layer in enumerate(a.layers)]


def common_sentences(models: Mapping[str, ModelActivations]) -> list[str]:
    """Sentence ids every model has, in the first model's order."""
    first = next(iter(models.values()))
    shared = set(first.sentence_ids)
    for acts in models.values():
        shared &= set(acts.sentence_ids)
    return [sid for sid in first.sentence_ids if sid in shared]


def cross_model_alignment_step(
    models: Mapping[str, ModelActivations],
    results_dir: Path,
    variant: str,
    *,
    k: int = DEFAULT_K,
    n_random: int = 200,
    seed: int = 0,
) -> StepResult:
    """CKA, RSA and subspace overlap between the models of one variant (see module doc). Files: `cka.parquet`,
    `rsa.parquet`, `subspace_overlap.parquet` and `cka_heatmap.png`: debiased CKA of the first kind (resid_post)
    for every pair of different models, or of a model with itself when there is only one. Only the debiased
    values are drawn: with d > n the plain estimator is far from 0 even for unrelated representations (see
    `alignment`), and one figure of many panels is what takes time here; both are in `cka.parquet`."""
    out = cross_model_dir(Path(results_dir), variant)
    result = StepResult()
    slugs = list(models)
    ids = common_sentences(models)
    if not ids:
        raise ValueError(f"{variant}: the models share no sentence ids")
    for slug, acts in models.items():
        if len(ids) != acts.n_sentences:
            result.notes.append(
                f"{slug}: {acts.n_sentences - len(ids)} sentences not seen by every model were left out"
            )
    rows_of = {slug: acts.subset(ids) for slug, acts in models.items()}
    labels = [models[slugs[0]].labels[i] for i in rows_of[slugs[0]]]
    emotions = models[slugs[0]].emotions
    reference = reference_emotion(emotions)
    kinds = [kd for kd in models[slugs[0]].kinds if all(kd in a.kinds for a in models.values())]
    cka_rows, rsa_rows, overlap_rows, skipped, reasons = [], [], [], [], set()
    heatmap: dict[tuple[str, str], np.ndarray] = {}
    with one_blas_thread():
        for kind in kinds:
            X = {
                slug: acts.sentence_end_layers(kind, _unless_all(rows_of[slug], acts.n_sentences))
                for slug, acts in models.items()
            }
            layer_sets = {slug: LayerSet(X[slug], slug) for slug in slugs}
            cos, subspaces = {}, {}
            for slug, acts in models.items():
                stored = _stored_outputs(Path(results_dir), acts, kind, X[slug], rows_of[slug], labels, emotions, k)
                if isinstance(stored, str):
                    reasons.add(f"{slug}: emotion vectors and subspaces computed here ({stored})")
                    by_layer = emotion_vectors_by_layer(X[slug], labels, emotions, reference)
                    cos[slug] = [cosine_matrix(v.centred) for v in by_layer]
                else:
                    cos[slug], subspaces[slug] = stored
            for a, b in itertools.combinations_with_replacement(slugs, 2):
                plain, debiased = layer_sets[a].ckas(layer_sets[b])
                pearson, spearman, n_pairs = rsa_matrix(cos[a], cos[b])
                matched = set(matched_stored_layers(models[a], models[b]))
                for la, lb in itertools.product(range(len(X[a])), range(len(X[b]))):
                    keys = {
                        "model_a": a,
                        "model_b": b,
                        "kind": kind,
                        "layer_a": models[a].layers[la],
                        "layer_b": models[b].layers[lb],
                        "matched_depth": (la, lb) in matched,
                    }
                    cka_rows.append(
                        {
                            **keys,
                            "cka": float(plain[la, lb]),
                            "cka_debiased": float(debiased[la, lb]),
                            "n_sentences": len(ids),
                        }
                    )
                    rsa_rows.append(
                        {
                            **keys,
                            "rsa_pearson": float(pearson[la, lb]),
                            "rsa_spearman": float(spearman[la, lb]),
                            "n_pairs": n_pairs,
                        }
                    )
                if kind == kinds[0] and (a != b or len(slugs) == 1):
                    heatmap[(a, b)] = debiased
                if a == b:
                    continue
                d_a, d_b = models[a].d_model, models[b].d_model
                if d_a != d_b:
                    skipped.append(f"{a} (d={d_a}) vs {b} (d={d_b})")
                    continue
                for slug in (a, b):
                    if slug not in subspaces:
                        subspaces[slug] = emotion_subspaces_by_layer(X[slug], labels, emotions, k)
                for row in cross_model_subspace_rows(
                    subspaces[a],
                    subspaces[b],
                    matched_stored_layers(models[a], models[b]),
                    n_random=n_random,
                    seed=seed,
                    model_a=a,
                    model_b=b,
                    kind=kind,
                ):
                    row.update(layer_a=models[a].layers[row["layer_a"]], layer_b=models[b].layers[row["layer_b"]])
                    overlap_rows.append(row)
    cka, rsa_table = frame(cka_rows, CKA_SCHEMA), frame(rsa_rows, RSA_SCHEMA)
    overlap = frame(overlap_rows, OVERLAP_SCHEMA).select(list(OVERLAP_SCHEMA))
    meta = {"variant": variant, "models": json.dumps(slugs), "n_sentences": str(len(ids))}
    result.table("cka", cka, out / "cka.parquet", meta)
    result.table("rsa", rsa_table, out / "rsa.parquet", meta)
    result.table("subspace_overlap", overlap, out / "subspace_overlap.parquet", meta)
    result.notes += sorted(reasons)
    skipped = sorted(set(skipped))
    if skipped:
        result.notes.append(
            "subspace overlap needs equal widths; skipped pairs: " + "; ".join(skipped) + " (CKA and RSA cover them)"
        )
    if heatmap:
        result.files["cka_heatmap"] = plot_cka_heatmaps(
            out / "cka_heatmap.png",
            heatmap,
            title=f"{variant}: debiased CKA ({kinds[0]})",
            layers={slug: acts.layers for slug, acts in models.items()},
        )
    result.summary.update(n_models=len(slugs), n_sentences=len(ids), skipped_overlap_pairs=len(skipped))
    cross = cka.filter((pl.col("model_a") != pl.col("model_b")) & pl.col("matched_depth"))
    if cross.height:
        result.summary["matched_depth_cka_mean"] = float(cross["cka"].mean())
        result.summary["matched_depth_cka_debiased_mean"] = float(cross["cka_debiased"].mean())
        rsa_cross = rsa_table.filter((pl.col("model_a") != pl.col("model_b")) & pl.col("matched_depth"))
        rsa_mean = rsa_cross["rsa_pearson"].drop_nans().drop_nulls().mean()
        result.summary["matched_depth_rsa_pearson_mean"] = float(rsa_mean) if rsa_mean is not None else float("nan")
    if overlap.height:
        result.summary["subspace_overlap_mean"] = float(overlap["overlap"].mean())
        result.summary["subspace_random_overlap_mean"] = float(overlap["random_overlap_mean"].mean())
    return result


def _unless_all(rows: np.ndarray, n_sentences: int) -> np.ndarray | None:
    """`rows`, or None when they are all `n_sentences` in order (a layer is then read without another copy)."""
    return None if np.array_equal(rows, np.arange(n_sentences)) else rows


def _stored_outputs(
    results_dir: Path,
    acts: ModelActivations,
    kind: str,
    X: np.ndarray,
    rows: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str],
    k: int,
) -> tuple[list[np.ndarray], list[dict[str, Subspace]]] | str:
    """One model's centred emotion cosine matrix and emotion subspaces per layer of `kind`, read from its
    `emotion_vectors` and `emotion_subspaces` outputs instead of computed again, or why they do not fit.

    `X` [n_layers, n, d] (an array or a lazy stack) holds the model's `rows` compared here, labelled `labels`. They must be all of its
    sentences with its own labels and emotion order, the files must have been written for the same model,
    dataset, emotions, reference and k, and their emotion means must be those of `X` (up to summation order):
    files of other activations are never used."""
    if len(rows) != acts.n_sentences or [acts.labels[i] for i in rows] != list(labels):
        return "not every sentence is shared"
    if tuple(emotions) != acts.emotions:
        return "its emotions are in another order"
    folder = model_analysis_dir(results_dir, acts.variant, acts.slug)
    expected = {**acts.keys(), "reference": reference_emotion(emotions), "k_requested": str(k)}
    tensors: dict[str, np.ndarray] = {}
    for name, settings in (("emotion_vectors", ("reference",)), ("emotion_subspaces", ("k_requested",))):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            return f"no {path}"
        meta, stored = _vectors(path, prefix=f"{kind}/")
        keys = [*acts.keys(), *settings]
        if any(meta.get(key) != expected[key] for key in keys) or kind not in json.loads(meta.get("kinds", "[]")):
            return f"{path} was written for other activations or settings"
        tensors.update(stored)
    y = np.asarray(labels)
    means = np.concatenate(
        [
            np.stack([chunk[:, y == emotion].mean(axis=1, dtype=np.float64) for emotion in emotions], axis=1)
            for _, chunk in layer_chunks(X)
        ]
    )
    tolerance = 1e-9 * max(float(np.abs(means).max()), 1.0)
    stored_means = tensors.get(f"{kind}/means")
    if stored_means is None or stored_means.shape != means.shape or np.abs(stored_means - means).max() > tolerance:
        return "emotion_vectors.safetensors holds other activations' means"
    counts = {emotion: int(np.sum(y == emotion)) for emotion in emotions}
    subspaces: list[dict[str, Subspace]] = []
    for layer in range(len(X)):
        by_emotion = {}
        for e, emotion in enumerate(emotions):
            prefix = f"{kind}/L{acts.layers[layer]:02d}/{emotion}"
            if f"{prefix}/basis" not in tensors:  # no variance there (see subspaces.emotion_subspaces)
                continue
            if np.abs(tensors[f"{prefix}/mean"] - means[layer, e]).max() > tolerance:
                return "emotion_subspaces.safetensors holds other activations' means"
            by_emotion[emotion] = Subspace(
                basis=tensors[f"{prefix}/basis"],
                explained_variance_ratio=tensors[f"{prefix}/explained_variance_ratio"],
                mean=tensors[f"{prefix}/mean"],
                n_samples=counts[emotion],
            )
        subspaces.append(by_emotion)
    cos = [cosine_matrix(centred) for centred in tensors[f"{kind}/centred"]]
    return cos, subspaces


STABILITY_SCHEMA = {
    "model": pl.String,
    "kind": pl.String,
    "layer": pl.Int64,
    "emotion": pl.String,
    "variant_a": pl.String,
    "variant_b": pl.String,
    "cosine_centred": pl.Float64,
    "cosine_diff_vs_reference": pl.Float64,
}


def _vectors(path: Path, prefix: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata and the tensors whose names start with `prefix`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        names = [name for name in handle.keys() if name.startswith(prefix)]
        return handle.metadata(), {name: handle.get_tensor(name) for name in names}


def stability_path(results_dir: Path) -> Path:
    return cross_variant_dir(Path(results_dir)) / "vector_stability.parquet"


def vector_stability_step(results_dir: Path, variants: Sequence[str], slugs: Sequence[str]) -> StepResult:
    """For every model and pair of variants: per kind, layer and emotion, the cosine between the two variants'
    centred emotion vectors (and their vs-reference differences), read from `emotion_vectors.safetensors`."""
    result = StepResult()
    rows = []
    for slug in slugs:
        loaded = {}
        for variant in variants:
            path = model_analysis_dir(Path(results_dir), variant, slug) / "emotion_vectors.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: materialize {variant}/emotion_vectors for {slug} first")
            loaded[variant] = _vectors(path)
        for va, vb in itertools.combinations(variants, 2):
            (meta_a, ta), (meta_b, tb) = loaded[va], loaded[vb]
            em_a, em_b = json.loads(meta_a["emotions"]), json.loads(meta_b["emotions"])
            shared = [e for e in em_a if e in em_b]
            kinds = [kd for kd in json.loads(meta_a["kinds"]) if kd in json.loads(meta_b["kinds"])]
            for kind in kinds:
                ca, cb = ta[f"{kind}/centred"], tb[f"{kind}/centred"]
                da, db = ta[f"{kind}/diff_vs_reference"], tb[f"{kind}/diff_vs_reference"]
                if ca.shape[2] != cb.shape[2]:
                    raise ValueError(f"{slug}: {va} and {vb} emotion vectors differ in shape: {ca.shape} vs {cb.shape}")
                layers_a, layers_b = stored_layers(meta_a, len(ca)), stored_layers(meta_b, len(cb))
                for layer in [layer for layer in layers_a if layer in layers_b]:  # the layers both variants stored
                    la, lb = layers_a.index(layer), layers_b.index(layer)
                    for emotion in shared:
                        i, j = em_a.index(emotion), em_b.index(emotion)
                        rows.append(
                            {
                                "model": slug,
                                "kind": kind,
                                "layer": layer,
                                "emotion": emotion,
                                "variant_a": va,
                                "variant_b": vb,
                                "cosine_centred": float(cosine_matrix(ca[la, i : i + 1], cb[lb, j : j + 1])[0, 0]),
                                "cosine_diff_vs_reference": float(
                                    cosine_matrix(da[la, i : i + 1], db[lb, j : j + 1])[0, 0]
                                ),
                            }
                        )
    table = frame(rows, STABILITY_SCHEMA)
    result.table("vector_stability", table, stability_path(results_dir), {"variants": json.dumps(list(variants))})
    if table.height:
        result.summary["mean_cosine_centred"] = float(table["cosine_centred"].mean())
        result.summary["min_cosine_centred"] = float(table["cosine_centred"].min())
        for slug in slugs:
            sub = table.filter((pl.col("model") == slug) & (pl.col("kind") == "resid_post"))
            if sub.height:
                result.summary[f"{slug}/resid_post_mean_cosine_centred"] = float(sub["cosine_centred"].mean())
    result.summary.update(n_models=len(slugs), variants=", ".join(variants))
    return result
