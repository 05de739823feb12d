"""Per-emotion PCA subspaces, principal angles between subspaces, and their overlap with a random baseline.

For each emotion and layer, the sentence-end activations of that emotion's sentences are centred (its own
mean subtracted; PCA does this) and the top-k principal directions span the emotion's subspace (8-10
components are usual in published work). k is clipped to n_samples - 1 (the rank of n centred points) and d.

Subspaces are compared by principal angles theta_1..theta_k and by

    overlap(U1, U2) = ||U1^T U2||_F^2 / k = mean_i cos^2(theta_i),   k = min(k1, k2),

which is 1 for identical subspaces and 0 for orthogonal ones. For two independent uniformly random subspaces
of dimensions k1, k2 in R^d, E||U1^T U2||_F^2 = k1 k2 / d, so the expected overlap is max(k1, k2) / d
(= k/d for equal dimensions). Low-dimensional subspaces (k << n) are used on purpose: with d = 768 > n,
CCA-like comparisons of the full activation spaces are meaningless (Kornblith et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emo_assets.core.analysis.blas import single_blas_thread
from emo_assets.core.analysis.labels import DEFAULT_EMOTIONS, as_float64_2d, encode_labels

try:  # scipy is a scikit-learn dependency, but the fallback keeps this module importable without it
    from scipy.linalg import subspace_angles as _scipy_subspace_angles
except ImportError:  # pragma: no cover
    _scipy_subspace_angles = None

DEFAULT_K = 8


@dataclass(frozen=True)
class Subspace:
    """Top-k principal subspace of one emotion's centred activations."""

    basis: np.ndarray  # [d, k] orthonormal columns
    explained_variance_ratio: np.ndarray  # [k]
    mean: np.ndarray  # [d]
    n_samples: int

    @property
    def k(self) -> int:
        return self.basis.shape[1]

    @property
    def d(self) -> int:
        return self.basis.shape[0]


def effective_k(k: int, n_samples: int, d: int) -> int:
    """k clipped to what the data can support: n_samples - 1 (rank of centred data) and d."""
    k_eff = min(int(k), n_samples - 1, d)
    if k_eff < 1:
        raise ValueError(f"cannot fit a subspace: k={k}, n_samples={n_samples}, d={d}")
    return k_eff


class NoVarianceError(ValueError):
    """All rows are the same vector: the centred data spans no subspace."""


@single_blas_thread
def pca_subspace(X: np.ndarray, k: int = DEFAULT_K) -> Subspace:
    """PCA subspace of `X` [n, d] (centred here). Full SVD: deterministic, no random state.

    k is also clipped to the numerical rank of the centred data: directions beyond it carry no variance and
    would only be arbitrary completions of the basis (this happens for real: Pythia's layer-0 MLP output at a
    sentence end depends on the last token alone, so an emotion whose sentences end in three different tokens
    spans two dimensions there). Data without any variance raises `NoVarianceError`.
    """
    source = np.asarray(X)
    eps = np.finfo(source.dtype if np.issubdtype(source.dtype, np.floating) else np.float64).eps
    X = as_float64_2d(source)
    k_eff = effective_k(k, X.shape[0], X.shape[1])
    if not np.any(X != X[0]):  # checked first: the explained variance ratio would be 0 / 0
        raise NoVarianceError(f"all {X.shape[0]} rows are the same vector: no subspace")
    from scipy.linalg import svd  # imported on use: loading the Dagster definitions stays fast

    # scikit-learn's PCA(svd_solver="full") written out (same SVD call and sign rule: each component's largest
    # entry is positive): its estimator checks and copies cost more than this SVD of a few dozen rows.
    mean = X.mean(axis=0)
    _, singular_values, components = svd(X - mean, full_matrices=False)
    rows = np.arange(len(components))
    components *= np.sign(components[rows, np.argmax(np.abs(components), axis=1)])[:, None]
    variance = singular_values**2 / (X.shape[0] - 1)
    # Rounding each value to the input's precision moves X by E with ||E||_2 <= ||E||_F <= eps ||X||_F, and
    # centring at most doubles that: singular values below it are indistinguishable from rounding.
    rank = int(np.sum(singular_values[:k_eff] > 2 * eps * np.linalg.norm(X)))
    if rank == 0:
        raise NoVarianceError(f"the {X.shape[0]} rows differ only by rounding: no subspace")
    return Subspace(
        basis=orthonormalise(components[:rank].T),
        explained_variance_ratio=variance[:rank] / variance.sum(),
        mean=mean,
        n_samples=X.shape[0],
    )


def emotion_subspaces(
    X: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    k: int = DEFAULT_K,
) -> dict[str, Subspace]:
    """One PCA subspace per emotion for one layer: `X` [n_sentences, d], `labels` per sentence. An emotion whose
    rows are all the same vector has no subspace and is left out (callers report the missing ones)."""
    X = as_float64_2d(X)
    y = encode_labels(labels, emotions)
    if len(y) != X.shape[0]:
        raise ValueError(f"{len(y)} labels for {X.shape[0]} rows of activations")
    subspaces = {}
    for e, emotion in enumerate(emotions):
        try:
            subspaces[emotion] = pca_subspace(X[y == e], k)
        except NoVarianceError:
            continue
    return subspaces


@single_blas_thread
def emotion_subspaces_by_layer(
    X_layers: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    k: int = DEFAULT_K,
) -> list[dict[str, Subspace]]:
    """`emotion_subspaces` for each layer of `X_layers` [n_layers, n_sentences, d]."""
    if np.ndim(X_layers) != 3:
        raise ValueError(f"X_layers must be [n_layers, n_sentences, d], got shape {np.shape(X_layers)}")
    return [emotion_subspaces(X_layers[layer], labels, emotions, k) for layer in range(len(X_layers))]


def orthonormalise(A: np.ndarray) -> np.ndarray:
    """Orthonormal basis [d, k] of the column span of `A` [d, k] (reduced QR, float64)."""
    q, _ = np.linalg.qr(np.asarray(A, dtype=np.float64))
    return q


def _as_basis(U: Subspace | np.ndarray) -> np.ndarray:
    return U.basis if isinstance(U, Subspace) else np.asarray(U, dtype=np.float64)


def principal_angles(U1: Subspace | np.ndarray, U2: Subspace | np.ndarray) -> np.ndarray:
    """Principal angles in degrees, ascending, between the column spans of two [d, k] bases (min(k1, k2)
    angles). Uses scipy.linalg.subspace_angles (accurate for small angles), else the SVD of U1^T U2."""
    A, B = _as_basis(U1), _as_basis(U2)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: d={A.shape[0]} vs d={B.shape[0]}")
    if _scipy_subspace_angles is not None:
        radians = _scipy_subspace_angles(A, B)
    else:  # pragma: no cover
        s = np.linalg.svd(orthonormalise(A).T @ orthonormalise(B), compute_uv=False)
        radians = np.arccos(np.clip(s, -1.0, 1.0))
    return np.sort(np.degrees(radians))


def subspace_overlap(U1: Subspace | np.ndarray, U2: Subspace | np.ndarray) -> float:
    """||U1^T U2||_F^2 / min(k1, k2): the mean squared cosine of the principal angles, in [0, 1]."""
    A, B = orthonormalise(_as_basis(U1)), orthonormalise(_as_basis(U2))
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: d={A.shape[0]} vs d={B.shape[0]}")
    return float(np.sum((A.T @ B) ** 2) / min(A.shape[1], B.shape[1]))


def expected_random_overlap(k: int, d: int, k2: int | None = None) -> float:
    """Analytical expected overlap of two independent uniformly random subspaces of dims k, k2 in R^d:
    E||U1^T U2||_F^2 = k k2 / d, divided by min(k, k2), i.e. max(k, k2) / d (= k/d for equal dims)."""
    k2 = k if k2 is None else k2
    return k * k2 / (d * min(k, k2))


def random_orthonormal_basis(d: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random k-dim subspace of R^d: QR of a Gaussian matrix (Haar up to the sign convention)."""
    return orthonormalise(rng.standard_normal((d, k)))


@dataclass(frozen=True)
class RandomBaseline:
    mean: float
    std: float
    analytical: float
    n_draws: int


@single_blas_thread
def empirical_random_overlap(
    d: int, k: int, k2: int | None = None, n_draws: int = 200, seed: int = 0
) -> RandomBaseline:
    """Overlap of pairs of independent random subspaces (fixed seed): mean, std and the analytical value."""
    k2 = k if k2 is None else k2
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            subspace_overlap(random_orthonormal_basis(d, k, rng), random_orthonormal_basis(d, k2, rng))
            for _ in range(n_draws)
        ]
    )
    return RandomBaseline(float(values.mean()), float(values.std()), expected_random_overlap(k, d, k2), n_draws)


def overlap_matrix(subspaces: dict[str, Subspace]) -> tuple[tuple[str, ...], np.ndarray]:
    """Pairwise overlap between the emotions' subspaces of one model and layer: (emotions, [E, E])."""
    names = tuple(subspaces)
    M = np.array([[subspace_overlap(subspaces[a], subspaces[b]) for b in names] for a in names])
    return names, M


def subspace_rows(subspaces_by_layer: Sequence[dict[str, Subspace]], **keys: object) -> list[dict]:
    """Tidy rows (layer x emotion): k, explained variance (total and of the first component), and the mean
    overlap with the other emotions' subspaces next to the random baseline max(k)/d."""
    rows = []
    for layer, subspaces in enumerate(subspaces_by_layer):
        names, M = overlap_matrix(subspaces)
        for i, emotion in enumerate(names):
            sub = subspaces[emotion]
            others = [j for j in range(len(names)) if j != i]
            row = dict(keys)
            row.update(
                layer=layer,
                emotion=emotion,
                k=sub.k,
                n_samples=sub.n_samples,
                explained_variance_total=float(sub.explained_variance_ratio.sum()),
                explained_variance_pc1=float(sub.explained_variance_ratio[0]),
                mean_overlap_other_emotions=float(M[i, others].mean()) if others else float("nan"),
                random_overlap_analytical=expected_random_overlap(sub.k, sub.d),
            )
            rows.append(row)
    return rows
