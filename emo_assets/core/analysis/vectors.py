"""Sentence-end emotion vectors ("mass-mean" directions) for one layer or all layers.

For one layer and one activation kind, `X` holds one row per sentence (the activation at the sentence-end
token) and `labels` the sentence's emotion. The vectors are:

- `means[e]`            mean activation of emotion e's sentences;
- `diff_vs_reference`   means[e] - means[reference] (emotion minus neutral);
- `centred`             means[e] - grand_mean, where grand_mean = mean of the per-emotion means (unweighted),
                        so an emotion with more sentences does not pull the origin towards itself;
- unit-normalised versions and the norms of both differences;
- `cosine`              cosine similarities between the *centred* vectors.

Why centre: GPT-2-like models are highly anisotropic (unrelated sentences have cosine > 0.96, up to 0.998 in
the last layer, dominated by a few outlier dimensions), so raw cosines between emotion means are all ~0.99
and say nothing. `cosine_raw` is kept only to show that trap in reports.

The centred vectors sum to zero, so only their pattern is informative: with E equal norms the mean
off-diagonal cosine is exactly -1/(E-1) (-1/3 for four emotions). A planted direction p_e is recovered as
p_e - mean_f p_f (the part common to all emotions is indistinguishable from the shared offset).

Zero vectors (e.g. the reference's own difference vs itself) have an undefined direction: their unit vector
and every cosine involving them is NaN rather than a made-up 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emo_assets.core.analysis.blas import single_blas_thread
from emo_assets.core.analysis.labels import (
    DEFAULT_EMOTIONS,
    REFERENCE_EMOTION,
    as_float64_2d,
    encode_labels,
)
from emo_assets.core.analysis.layerwise import layer_chunks


def unit_rows(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalise `V` [..., m, d] in float64; returns (unit rows, norms). Zero rows become NaN rows."""
    V = np.asarray(V, dtype=np.float64)
    norms = np.linalg.norm(V, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = V / norms[..., None]
    unit[norms == 0] = np.nan
    return unit, norms


def cosine_matrix(A: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarities between rows of `A` [..., m, d] and rows of `B` [..., p, d] (default `A`); NaN for
    zero rows. Leading axes (e.g. layers) are a stack of independent matrices."""
    ua, _ = unit_rows(A)
    ub = ua if B is None else unit_rows(B)[0]
    cos = ua @ np.swapaxes(ub, -1, -2)
    return np.clip(cos, -1.0, 1.0)  # NaN passes through clip


def class_means(X: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means [..., n_classes, d] of `X` [..., n, d] and counts; a class without samples raises (its
    mean is undefined). Sums accumulate in float64, row after row, whatever the input's float type."""
    counts = np.bincount(y, minlength=n_classes)
    if np.any(counts == 0):
        raise ValueError(f"every emotion needs at least one sentence; counts per emotion: {counts.tolist()}")
    sums = np.stack([X[..., y == c, :].sum(axis=-2, dtype=np.float64) for c in range(n_classes)], axis=-2)
    return sums / counts[:, None], counts


@dataclass(frozen=True)
class Separation:
    """Between- / within-emotion variance, trace form (see `separation_score`)."""

    between: float
    within: float
    ratio: float


def separation_score(X: np.ndarray, labels: Sequence[str], emotions: Sequence[str] = DEFAULT_EMOTIONS) -> Separation:
    """Fisher-like separation: trace of the between-emotion covariance over trace of the within-emotion one.

    With per-emotion means mu_e, n_e sentences in emotion e, E emotions and m = (1/E) sum_e mu_e:

        between = (1/E) sum_e ||mu_e - m||^2
        within  = (1/E) sum_e (1/n_e) sum_{i in e} ||x_i - mu_e||^2
        ratio   = between / within

    Every emotion is weighted equally in both terms (matching the unweighted grand mean), so class imbalance
    does not change the score. Traces make it basis-free and defined with d > n (no matrix inverse, unlike a
    full Fisher criterion, which is meaningless when the within-class covariance is singular). ratio is inf
    when every emotion's sentences coincide with their mean, NaN when also between == 0.
    """
    X = as_float64_2d(X)
    y = encode_labels(labels, emotions)
    return _separation(X, y, len(emotions))


def _separation(X: np.ndarray, y: np.ndarray, n_classes: int) -> Separation:
    return _separations(X[None], y, n_classes)[0]


def _separations(X: np.ndarray, y: np.ndarray, n_classes: int, means=None, counts=None) -> list[Separation]:
    """`separation_score` of every layer of `X` [L, n, d] (`means`, `counts` from `class_means` if known)."""
    if means is None:
        means, counts = class_means(X, y, n_classes)
    grand = means.mean(axis=-2)
    between = np.mean(np.sum((means - grand[:, None]) ** 2, axis=-1), axis=-1)
    out = []
    for layer in range(len(X)):  # layer by layer: the float64 differences stay in cache
        squares = X[layer] - means[layer, y]
        np.square(squares, out=squares)
        within = float(np.mean(np.bincount(y, weights=squares.sum(axis=-1), minlength=n_classes) / counts))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = float(np.float64(between[layer]) / np.float64(within))
        out.append(Separation(between=float(between[layer]), within=within, ratio=ratio))
    return out


@dataclass(frozen=True)
class EmotionVectors:
    """Sentence-end emotion vectors of one layer and kind. Arrays are float64, rows follow `emotions`."""

    emotions: tuple[str, ...]
    reference: str
    counts: np.ndarray  # [E] sentences per emotion
    means: np.ndarray  # [E, d]
    grand_mean: np.ndarray  # [d] mean of the per-emotion means
    diff_vs_reference: np.ndarray  # [E, d] means - means[reference]
    diff_vs_reference_unit: np.ndarray  # [E, d] (NaN row for the reference itself)
    diff_vs_reference_norm: np.ndarray  # [E]
    centred: np.ndarray  # [E, d] means - grand_mean
    centred_unit: np.ndarray  # [E, d]
    centred_norm: np.ndarray  # [E]
    cosine: np.ndarray  # [E, E] cosine between centred vectors (the meaningful one)
    cosine_raw: np.ndarray  # [E, E] cosine between raw means (anisotropy trap; for reports only)
    separation: Separation

    def index(self, emotion: str) -> int:
        return self.emotions.index(emotion)


def emotion_vectors(
    X: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    reference: str = REFERENCE_EMOTION,
) -> EmotionVectors:
    """Emotion vectors of one layer: `X` [n_sentences, d] sentence-end activations, `labels` per sentence.

    `emotions` fixes the row order; every emotion must occur in `labels` and every label must be an emotion.
    """
    return _vectors_of_layers(as_float64_2d(X)[None], labels, emotions, reference)[0]


@single_blas_thread
def emotion_vectors_by_layer(
    X_layers: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    reference: str = REFERENCE_EMOTION,
) -> list[EmotionVectors]:
    """`emotion_vectors` for each layer of `X_layers` [n_layers, n_sentences, d] (an array or a lazy stack), the
    layers of each `layerwise.layer_chunks` group at once (float32 input is not copied to float64: the sums
    accumulate in float64)."""
    if np.ndim(X_layers) != 3:
        raise ValueError(f"X_layers must be [n_layers, n_sentences, d], got shape {np.shape(X_layers)}")
    return [
        vectors
        for _, chunk in layer_chunks(X_layers)
        for vectors in _vectors_of_layers(chunk, labels, emotions, reference)
    ]


def _vectors_of_layers(
    X: np.ndarray, labels: Sequence[str], emotions: Sequence[str], reference: str
) -> list[EmotionVectors]:
    emotions = tuple(emotions)
    if reference not in emotions:
        raise ValueError(f"reference emotion {reference!r} is not in {list(emotions)}")
    y = encode_labels(labels, emotions)
    if len(y) != X.shape[1]:
        raise ValueError(f"{len(y)} labels for {X.shape[1]} rows of activations")
    means, counts = class_means(X, y, len(emotions))
    grand = means.mean(axis=-2)
    diff_ref = means - means[:, emotions.index(reference), None]
    centred = means - grand[:, None]
    diff_ref_unit, diff_ref_norm = unit_rows(diff_ref)
    centred_unit, centred_norm = unit_rows(centred)
    cosine, cosine_raw = cosine_matrix(centred), cosine_matrix(means)
    separations = _separations(X, y, len(emotions), means, counts)
    return [
        EmotionVectors(
            emotions=emotions,
            reference=reference,
            counts=counts,
            means=means[layer],
            grand_mean=grand[layer],
            diff_vs_reference=diff_ref[layer],
            diff_vs_reference_unit=diff_ref_unit[layer],
            diff_vs_reference_norm=diff_ref_norm[layer],
            centred=centred[layer],
            centred_unit=centred_unit[layer],
            centred_norm=centred_norm[layer],
            cosine=cosine[layer],
            cosine_raw=cosine_raw[layer],
            separation=separations[layer],
        )
        for layer in range(len(X))
    ]


def separation_rows(vectors_by_layer: Sequence[EmotionVectors], **keys: object) -> list[dict]:
    """Tidy rows (one per layer) with separation and centred-vector norms; `keys` (e.g. model, kind) are
    copied into every row. Also records the mean off-diagonal raw vs centred cosine (anisotropy check)."""
    rows = []
    for layer, vec in enumerate(vectors_by_layer):
        off = ~np.eye(len(vec.emotions), dtype=bool)
        row = dict(keys)
        row.update(
            layer=layer,
            separation=vec.separation.ratio,
            between_variance=vec.separation.between,
            within_variance=vec.separation.within,
            mean_offdiag_cosine_centred=float(np.nanmean(vec.cosine[off])),
            mean_offdiag_cosine_raw=float(np.nanmean(vec.cosine_raw[off])),
        )
        for emotion, norm in zip(vec.emotions, vec.centred_norm):
            row[f"norm_centred_{emotion}"] = float(norm)
        rows.append(row)
    return rows
