"""Cross-model comparison on the same sentences: linear CKA, RSA of emotion cosine matrices, subspace overlap.

Why these: with d = 768 and only 280-400 sentences, similarity indices invariant to any invertible linear map
(CCA, SVCCA with many components) return ~1 for *any* two models, because n points in general position in
d >= n dimensions can be mapped onto any other n points (Kornblith et al. 2019). Linear CKA is invariant only
to orthogonal maps and isotropic scaling, so it still discriminates; RSA compares only emotion-by-emotion
geometry, which does not depend on the models' coordinate systems at all.

Linear CKA of centred X [n, d1], Y [n, d2]:

    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) = <K, L>_F / (||K||_F ||L||_F),  K = X X^T, L = Y Y^T

The first (feature-space) form costs O(n d1 d2) time and O(d1 d2) memory beyond the data; it is used whenever
the sentences outnumber both widths. The second (n x n Gram) form costs O(n^2 d) and n^2 memory per layer, and
is used only where n <= max(d1, d2), where it is the cheaper one.

Caveat for d > n: the plain (biased) estimator is far from 0 for unrelated representations - two independent
isotropic Gaussian matrices of 280 x 768 give CKA ~0.73, because both centred Gram matrices are then close to
a multiple of the centring matrix. `debiased=True` replaces the HSIC estimates by their unbiased U-statistic
versions (Song et al. 2012, as in Kornblith's reference code), which puts unrelated representations near 0
and keeps CKA(X, X R s) = 1; report it next to the plain value when comparing models at d = 768.

The unbiased HSIC has an exact feature-space form too. With K = X X^T, L = Y Y^T (centred X, Y) and K~, L~
their copies with zero diagonal, the inner product of the U-centred Gram matrices is

    n (n - 3) HSIC_u = tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1
    tr(K~ L~) = ||X^T Y||_F^2 - sum_i ||x_i||^2 ||y_i||^2,   1^T K~ 1 = -sum_i ||x_i||^2,   K~ 1 = -(||x_i||^2)_i

(the last two because the columns are centred), so the debiased CKA costs what the plain one does.

Cross-model subspace overlap compares the raw coordinate systems of two models, which are unrelated unless a
map is fitted between them, so raw values sit close to chance. It is
reported next to an empirical random baseline (random orthonormal bases, fixed seed) and the analytical k/d.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from emo_assets.core.analysis.blas import single_blas_thread
from emo_assets.core.analysis.labels import as_float64_2d
from emo_assets.core.analysis.subspaces import (
    Subspace,
    empirical_random_overlap,
    expected_random_overlap,
    overlaps_and_angles,
)


def _u_centre(K: np.ndarray) -> np.ndarray:
    """U-centred copy of a Gram matrix (the unbiased HSIC estimator's centring, Song et al. 2012)."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 samples, got {n}")
    K = K.copy()
    np.fill_diagonal(K, 0.0)
    means = K.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    K -= means[:, None]
    K -= means[None, :]
    np.fill_diagonal(K, 0.0)
    return K


def _unbiased_hsic(cross: float, sq_x: np.ndarray, sq_y: np.ndarray) -> float:
    """n (n - 3) times the unbiased HSIC of centred X, Y (the inner product of their U-centred Gram matrices)
    from `cross` = ||X^T Y||_F^2 and the squared row norms: the feature-space form of the module doc, where
    centred columns make 1^T K~ 1 = -sum ||x_i||^2 and K~ 1 = -(||x_i||^2)_i."""
    n = len(sq_x)
    both = float(sq_x @ sq_y)
    return cross - both + float(sq_x.sum()) * float(sq_y.sum()) / ((n - 1) * (n - 2)) - 2 * both / (n - 2)


FORMS = ("auto", "gram", "features")


class LayerSet:
    """One model's layers for linear CKA against another model's (or its own) layers on the same sentences.

    `X_layers`: [n_layers, n_sentences, d] - an array, a list of [n, d_layer] arrays (widths may differ), or any
    sequence with `.shape` whose `[layer]` reads one layer (`inputs.LayerStack`), so that only the layers at hand
    are in memory. A layer pair is computed in the feature space (d1 x d2 cross-covariance, O(n d1 d2) time,
    O(n d) memory) when the sentences outnumber both widths, else from the n x n Gram matrices, which are built
    once per layer and kept (they are small exactly then). `form` forces one path ("gram" / "features")."""

    def __init__(self, X_layers, name: str = "X", form: str = "auto"):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        shape = getattr(X_layers, "shape", None)
        if shape is not None and len(shape) != 3:
            raise ValueError(f"{name} must be [n_layers, n_sentences, d], got shape {tuple(shape)}")
        self.layers, self.name, self.form = X_layers, name, form
        self.n_layers = len(X_layers)
        if shape is not None:
            self.n_sentences, self.widths = int(shape[1]), [int(shape[2])] * self.n_layers
        else:
            self.n_sentences = len(X_layers[0]) if self.n_layers else 0
            self.widths = [int(np.shape(layer)[-1]) for layer in X_layers]
            if any(len(layer) != self.n_sentences for layer in X_layers):
                raise ValueError(f"every layer of {name} must hold the same sentences")
        self._grams: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._norms: dict[int, tuple[np.ndarray, float, float]] = {}

    def centred(self, layer: int, out: np.ndarray | None = None) -> np.ndarray:
        """One layer, float64 with its columns centred [n, d], written into `out` when it has that shape: the
        feature path reuses two buffers for all its layers, as a fresh array of 100k x 384 floats costs more in
        page faults than its centring."""
        source = np.asarray(self.layers[layer])
        if source.ndim != 2 or len(source) != self.n_sentences:
            raise ValueError(f"every layer of {self.name} must hold the same sentences, as [n, d]: {source.shape}")
        if out is None or out.shape != source.shape:
            out = np.empty(source.shape)
        np.copyto(out, source)
        out -= out.mean(axis=0)
        return out

    def gram(self, layer: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's centred and U-centred (None below 4 sentences) Gram matrices, flattened, of unit norm."""
        if layer not in self._grams:
            K = self.centred(layer)
            K = K @ K.T
            self._grams[layer] = (_unit(K), _unit(_u_centre(K)) if self.n_sentences >= 4 else None)
        return self._grams[layer]

    def norms(self, layer: int, X: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
        """(squared row norms, ||X^T X||_F, sqrt of the unbiased self-HSIC (times n (n-3))) of the centred layer."""
        if layer not in self._norms:
            X = self.centred(layer) if X is None else X
            sq = np.einsum("ij,ij->i", X, X)
            self_cross = float(np.sum((X.T @ X) ** 2))
            unbiased = _unbiased_hsic(self_cross, sq, sq) if self.n_sentences >= 4 else float("nan")
            self._norms[layer] = (sq, np.sqrt(self_cross), np.sqrt(max(unbiased, 0.0)))
        return self._norms[layer]

    def _uses_grams(self, other: LayerSet, la: int, lb: int) -> bool:
        if self.form != "auto":
            return self.form == "gram"
        return self.n_sentences <= max(self.widths[la], other.widths[lb])

    def ckas(self, other: LayerSet) -> tuple[np.ndarray, np.ndarray]:
        """Plain and debiased linear CKA [self's layers, other's layers] (see `cka_matrix`); the debiased one is
        NaN below 4 sentences. Pairs of a set with itself are computed once per unordered pair."""
        if self.n_sentences != other.n_sentences:
            raise ValueError(
                "every layer of both models must hold the same sentences; row counts: "
                f"{sorted({self.n_sentences, other.n_sentences})}"
            )
        plain = np.full((self.n_layers, other.n_layers), np.nan)
        debiased = plain.copy()
        same = other is self
        X = Y = None  # the buffers of the feature path
        for la in range(self.n_layers):
            pairs = range(la if same else 0, other.n_layers)
            gram_pairs = [lb for lb in pairs if self._uses_grams(other, la, lb)]
            feature_pairs = [lb for lb in pairs if lb not in gram_pairs]
            for lb in gram_pairs:
                (ka, ua), (kb, ub) = self.gram(la), other.gram(lb)
                plain[la, lb] = ka @ kb
                debiased[la, lb] = ua @ ub if ua is not None and ub is not None else np.nan
            if feature_pairs:
                X = self.centred(la, X)
                sq_x, norm_x, unbiased_x = self.norms(la, X)
                for lb in feature_pairs:
                    if same and lb == la:
                        cross, (sq_y, norm_y, unbiased_y) = norm_x**2, (sq_x, norm_x, unbiased_x)
                    else:
                        Y = other.centred(lb, Y)
                        sq_y, norm_y, unbiased_y = other.norms(lb, Y)
                        cross = float(np.sum((Y.T @ X) ** 2))
                    with np.errstate(invalid="ignore", divide="ignore"):
                        plain[la, lb] = cross / (norm_x * norm_y) if norm_x * norm_y > 0 else np.nan
                        if self.n_sentences >= 4:
                            scale = unbiased_x * unbiased_y
                            debiased[la, lb] = _unbiased_hsic(cross, sq_x, sq_y) / scale if scale > 0 else np.nan
        if same:
            lower = np.tril_indices(self.n_layers, k=-1)
            plain[lower], debiased[lower] = plain.T[lower], debiased.T[lower]
        return np.clip(plain, 0.0, 1.0), np.clip(debiased, -1.0, 1.0)

    def cka(self, other: LayerSet, *, debiased: bool = False) -> np.ndarray:
        """Linear CKA [self's layers, other's layers], plain or debiased (see `ckas`)."""
        if debiased and self.n_sentences < 4:
            raise ValueError(f"debiased CKA needs at least 4 samples, got {self.n_sentences}")
        return self.ckas(other)[1 if debiased else 0]


def _unit(K: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(K)
    return (K / norm if norm > 0 else np.full_like(K, np.nan)).ravel()


@single_blas_thread
def linear_cka(X: np.ndarray, Y: np.ndarray, *, debiased: bool = False) -> float:
    """Linear CKA between two activation matrices for the same n sentences (rows); columns are centred here.

    `debiased`: unbiased HSIC estimator (see module doc; can be slightly negative). Returns NaN if either
    matrix is constant (zero after centring)."""
    X, Y = as_float64_2d(X, "X"), as_float64_2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same rows (sentences): {X.shape[0]} vs {Y.shape[0]}")
    return float(LayerSet([X], "X").cka(LayerSet([Y], "Y"), debiased=debiased)[0, 0])


@single_blas_thread
def cka_matrix(
    A_layers: np.ndarray | Sequence[np.ndarray],
    B_layers: np.ndarray | Sequence[np.ndarray],
    *,
    debiased: bool = False,
    form: str = "auto",
) -> np.ndarray:
    """Linear CKA for every layer pair: A [La, n, da], B [Lb, n, db] -> [La, Lb] (rows: A's layers).

    A and B may also be lists of [n, d_layer] arrays (widths may differ between layers). Each pair costs
    O(n da db) in the feature space, or O(n^2) once the Gram matrices (O(n^2 d) per layer) exist when n is at
    most the larger width; with several models, build one `LayerSet` per model and pair those instead."""
    return LayerSet(A_layers, "A", form).cka(LayerSet(B_layers, "B", form), debiased=debiased)


@dataclass(frozen=True)
class RSAResult:
    pearson: float
    spearman: float
    n_pairs: int  # E(E-1)/2: 6 for four emotions, so these correlations are descriptive, not tests


def upper_triangle(M: np.ndarray) -> np.ndarray:
    """Entries strictly above the diagonal of a square matrix, row-major."""
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {M.shape}")
    return M[np.triu_indices(M.shape[0], k=1)]


def rsa(cos_a: np.ndarray, cos_b: np.ndarray) -> RSAResult:
    """Correlation of the upper triangles of two models' emotion-by-emotion (centred) cosine matrices, which
    must list the emotions in the same order. NaN where a triangle is constant or contains NaN."""
    pearson, spearman, n_pairs = rsa_matrix([cos_a], [cos_b])
    return RSAResult(float(pearson[0, 0]), float(spearman[0, 0]), n_pairs)


def rsa_matrix(cos_a: Sequence[np.ndarray], cos_b: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """`rsa` for every layer pair of two models: per-layer cosine matrices -> (Pearson [La, Lb], Spearman
    [La, Lb], number of pairs per triangle)."""
    a, b = _triangles(cos_a), _triangles(cos_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine matrices differ in size: {np.shape(cos_a[0])} vs {np.shape(cos_b[0])}")
    if a.shape[1] < 2:
        undefined = np.full((len(a), len(b)), np.nan)
        return undefined, undefined.copy(), a.shape[1]
    pearson = _row_correlations(a, b)
    spearman = _row_correlations(average_ranks(a), average_ranks(b))
    undefined = ~_varies(a)[:, None] | ~_varies(b)[None, :]
    pearson[undefined] = np.nan
    spearman[undefined] = np.nan
    return pearson, spearman, a.shape[1]


def _triangles(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """[n_layers, m]: each layer's upper triangle."""
    return np.stack([upper_triangle(M) for M in matrices])


def _varies(T: np.ndarray) -> np.ndarray:
    """Per row: all finite and not constant (else its correlations are undefined)."""
    finite = np.all(np.isfinite(T), axis=1)
    return finite & (np.ptp(np.where(finite[:, None], T, 0.0), axis=1) > 0)


def _row_correlations(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of A [p, m] with every row of B [q, m] -> [p, q]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        Ac, Bc = A - A.mean(axis=1, keepdims=True), B - B.mean(axis=1, keepdims=True)
        Ac /= np.linalg.norm(Ac, axis=1, keepdims=True)
        Bc /= np.linalg.norm(Bc, axis=1, keepdims=True)
        return np.clip(Ac @ Bc.T, -1.0, 1.0)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..m along the last axis with ties given their average rank (`scipy.stats.rankdata`'s default).
    Pairwise comparison: the triangles hold a handful of values and this runs for every layer of every model,
    where importing and calling scipy.stats costs more than the ranking."""
    v = np.asarray(values, dtype=np.float64)
    below = (v[..., None, :] < v[..., :, None]).sum(axis=-1)
    equal = (v[..., None, :] == v[..., :, None]).sum(axis=-1)
    return below + (equal + 1) / 2.0


@single_blas_thread
def cross_model_subspace_rows(
    subspaces_a: Sequence[Mapping[str, Subspace]],
    subspaces_b: Sequence[Mapping[str, Subspace]],
    layer_pairs: Sequence[tuple[int, int]] | None = None,
    *,
    n_random: int = 200,
    seed: int = 0,
    **keys: object,
) -> list[dict]:
    """Overlap and principal angles between model A's and model B's subspace of the same emotion.

    `subspaces_a/b`: per layer, emotion -> Subspace (from `subspaces.emotion_subspaces_by_layer`). Layers are
    paired by index unless `layer_pairs` [(layer_a, layer_b), ...] is given. Each row carries the empirical
    random baseline (mean and std over `n_random` pairs of random orthonormal bases of the same dimensions,
    fixed `seed`) and the analytical max(k_a, k_b)/d. Both models must have the same width d."""
    if layer_pairs is None:
        if len(subspaces_a) != len(subspaces_b):
            raise ValueError(f"{len(subspaces_a)} vs {len(subspaces_b)} layers: pass layer_pairs explicitly")
        layer_pairs = [(i, i) for i in range(len(subspaces_a))]
    pairs = []
    for layer_a, layer_b in layer_pairs:
        for emotion, sub_a in subspaces_a[layer_a].items():
            sub_b = subspaces_b[layer_b].get(emotion)
            if sub_b is None:  # no variance in model B there (see subspaces.emotion_subspaces)
                continue
            if sub_a.d != sub_b.d:
                raise ValueError(f"models have different widths ({sub_a.d} vs {sub_b.d}); overlap is undefined")
            pairs.append((layer_a, layer_b, emotion, sub_a, sub_b))
    overlaps, angles = overlaps_and_angles([p[3] for p in pairs], [p[4] for p in pairs])
    rows = []
    for (layer_a, layer_b, emotion, sub_a, sub_b), overlap, pair_angles in zip(pairs, overlaps, angles):
        base = empirical_random_overlap(sub_a.d, sub_a.k, sub_b.k, n_draws=n_random, seed=seed)
        row = dict(keys)
        row.update(
            layer_a=layer_a,
            layer_b=layer_b,
            emotion=emotion,
            k=min(sub_a.k, sub_b.k),
            overlap=float(overlap),
            mean_angle_deg=float(pair_angles.mean()),
            min_angle_deg=float(pair_angles.min()),
            random_overlap_mean=base.mean,
            random_overlap_std=base.std,
            random_overlap_analytical=expected_random_overlap(sub_a.k, sub_a.d, sub_b.k),
        )
        rows.append(row)
    return rows
