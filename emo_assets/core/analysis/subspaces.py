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

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from emo_assets.core.analysis.blas import single_blas_thread
from emo_assets.core.analysis.labels import DEFAULT_EMOTIONS, as_float64_2d, encode_labels
from emo_assets.core.analysis.layerwise import layer_chunks

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
    X = as_float64_2d(source)
    k_eff = effective_k(k, X.shape[0], X.shape[1])
    if not np.any(X != X[0]):  # checked first: the explained variance ratio would be 0 / 0
        raise NoVarianceError(f"all {X.shape[0]} rows are the same vector: no subspace")
    from scipy.linalg import svd  # imported on use: loading the Dagster definitions stays fast

    # scikit-learn's PCA(svd_solver="full") written out (same SVD call and sign rule: each component's largest
    # entry is positive): its estimator checks and copies cost more than this SVD of a few dozen rows.
    mean = X.mean(axis=0)
    _, singular_values, components = svd(X - mean, full_matrices=False)
    variance = singular_values**2 / (X.shape[0] - 1)
    rank = int(np.sum(singular_values[:k_eff] > _rank_tolerance(source.dtype, X)))
    if rank == 0:
        raise NoVarianceError(f"the {X.shape[0]} rows differ only by rounding: no subspace")
    (basis,) = _sign_fixed_bases([components[:rank]])
    return Subspace(basis, variance[:rank] / variance.sum(), mean, X.shape[0])


def _rank_tolerance(dtype: np.dtype, X: np.ndarray) -> float:
    """Singular values at or below this are rounding. Rounding each value to the input's precision moves X by E
    with ||E||_2 <= ||E||_F <= eps ||X||_F, and centring at most doubles that."""
    eps = np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).eps
    return 2 * eps * np.linalg.norm(X)


def _sign_fixed_bases(components: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Orthonormal bases [d, rank] of principal components [rank, d], each component's sign fixed first so that
    its largest entry is positive (scikit-learn's rule); components of equal shapes share one stacked QR."""
    fixed = []
    for c in components:
        rows = np.arange(len(c))
        fixed.append((c * np.sign(c[rows, np.argmax(np.abs(c), axis=1)])[:, None]).T)
    return _orthonormal_all(fixed)


def _orthonormal_all(bases: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`orthonormalise` of each basis; bases of the same shape in one stacked QR (the same LAPACK calls)."""
    out: list[np.ndarray] = [np.empty(0)] * len(bases)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, basis in enumerate(bases):
        groups.setdefault(np.shape(basis), []).append(i)
    for members in groups.values():
        q = np.linalg.qr(np.stack([np.asarray(bases[i], dtype=np.float64) for i in members]))[0]
        for j, i in enumerate(members):
            out[i] = q[j]
    return out


# The eigenvalue routes below are trusted where every kept singular value is at least this fraction of the
# largest: there their eigenvalues carry ~eps * (s_1 / s_i)^2 <= 1e-8 relative error. Below it, the exact SVD
# decides.
_GRAM_MIN_RATIO = 1e-4
PCA_FORMS = ("auto", "gram", "covariance")


def _pca_subspaces(X_layers: np.ndarray, k: int, form: str = "auto") -> list[Subspace | None]:
    """`pca_subspace` of every layer of `X_layers` [L, n, d] (None where it has no variance) in a few stacked
    operations: a small symmetric eigenproblem per layer instead of an SVD of [n, d]. With fewer rows than
    columns (n <= d) its matrix is the [n, n] Gram matrix of the centred rows, whose eigenvectors give the
    principal components through one matrix product; with more rows it is the [d, d] scatter matrix, whose
    eigenvectors are the components, so the cost stays O(n d min(n, d)). `form` forces one ("gram" /
    "covariance"). Components agree with the SVD's to rounding (~1e-13); layers whose kept singular values span
    more than 1 / _GRAM_MIN_RATIO, or lie within rounding of the rank tolerance, take the exact SVD instead."""
    if form not in PCA_FORMS:
        raise ValueError(f"form must be one of {PCA_FORMS}, got {form!r}")
    source = np.asarray(X_layers)
    X = np.asarray(source, dtype=np.float64)
    n_layers, n, d = X.shape
    k_eff = effective_k(k, n, d)
    mean = X.mean(axis=1)
    centred = X - mean[:, None]
    scatter = form == "covariance" or (form == "auto" and n > d)
    square = centred.transpose(0, 2, 1) @ centred if scatter else centred @ centred.transpose(0, 2, 1)
    from scipy.linalg import eigh  # imported on use, as in `pca_subspace`

    # the k_eff largest eigenpairs only, descending as the SVD's
    m = square.shape[1]
    top = [eigh(g, subset_by_index=[m - k_eff, m - 1], driver="evr") for g in square]
    values, vectors = np.stack([w[::-1] for w, _ in top]), np.stack([v[:, ::-1] for _, v in top])
    singular = np.sqrt(np.maximum(values, 0))
    totals = np.trace(square, axis1=1, axis2=2)
    out: list[Subspace | None] = [None] * n_layers
    fast: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # layer -> (components [rank, d], squared singular values)
    for layer in range(n_layers):
        if not np.any(X[layer] != X[layer, 0]):
            continue
        s, tol = singular[layer], _rank_tolerance(source.dtype, X[layer])
        rank = int(np.sum(s > tol))
        if rank == 0 or s[-1] < _GRAM_MIN_RATIO * s[0] or np.any(np.abs(s - tol) <= 1e-6 * tol):
            try:
                out[layer] = pca_subspace(source[layer], k)
            except NoVarianceError:
                pass
            continue
        if scatter:
            components = vectors[layer, :, :rank].T
        else:
            components = (centred[layer].T @ vectors[layer, :, :rank] / s[:rank]).T
        fast[layer] = (components, values[layer, :rank])
    bases = _sign_fixed_bases([components for components, _ in fast.values()])
    for (layer, (_, squares)), basis in zip(fast.items(), bases):
        out[layer] = Subspace(basis, squares / totals[layer], mean[layer], n)
    return out


def emotion_subspaces(
    X: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    k: int = DEFAULT_K,
) -> dict[str, Subspace]:
    """One PCA subspace per emotion for one layer: `X` [n_sentences, d], `labels` per sentence. An emotion whose
    rows are all the same vector has no subspace and is left out (callers report the missing ones)."""
    return emotion_subspaces_by_layer(as_float64_2d(X)[None], labels, emotions, k)[0]


@single_blas_thread
def emotion_subspaces_by_layer(
    X_layers: np.ndarray,
    labels: Sequence[str],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    k: int = DEFAULT_K,
) -> list[dict[str, Subspace]]:
    """`emotion_subspaces` for each layer of `X_layers` [n_layers, n_sentences, d] (an array or a lazy stack), the
    layers of each `layerwise.layer_chunks` group of an emotion at once (see `_pca_subspaces`)."""
    if np.ndim(X_layers) != 3:
        raise ValueError(f"X_layers must be [n_layers, n_sentences, d], got shape {np.shape(X_layers)}")
    y = encode_labels(labels, emotions)
    if len(y) != np.shape(X_layers)[1]:
        raise ValueError(f"{len(y)} labels for {np.shape(X_layers)[1]} rows of activations")
    by_layer: list[dict[str, Subspace]] = [{} for _ in range(len(X_layers))]
    for layers, chunk in layer_chunks(X_layers):
        chunk = np.asarray(chunk, dtype=np.float64)  # float64 before the rank tolerance, as `emotion_subspaces`
        for e, emotion in enumerate(emotions):
            for layer, sub in zip(layers, _pca_subspaces(chunk[:, y == e], k)):
                if sub is not None:
                    by_layer[layer][emotion] = sub
    return by_layer


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


def empirical_random_overlap(
    d: int, k: int, k2: int | None = None, n_draws: int = 200, seed: int = 0
) -> RandomBaseline:
    """Overlap of pairs of independent random subspaces (fixed seed): mean, std and the analytical value.
    Computed once per process for each (d, k, k2, n_draws, seed); every model and layer of a width asks again."""
    return _random_overlap(int(d), int(k), int(k if k2 is None else k2), int(n_draws), int(seed))


@functools.lru_cache(maxsize=64)
@single_blas_thread
def _random_overlap(d: int, k: int, k2: int, n_draws: int, seed: int) -> RandomBaseline:
    # One draw of all the Gaussian matrices is the same stream as draw after draw (A_i [d, k], then B_i [d, k2]).
    # With A = Q_A R_A, ||Q_A^T Q_B||_F^2 = ||L_A^-1 A^T B L_B^-T||_F^2 for the Cholesky factors L L^T = A^T A:
    # small [k, k] products instead of a QR of every [d, k] draw (Gaussian draws are well conditioned, so this
    # agrees with the QR route to rounding).
    gaussian = np.random.default_rng(seed).standard_normal((n_draws, d * (k + k2)))
    A = gaussian[:, : d * k].reshape(n_draws, d, k)
    B = gaussian[:, d * k :].reshape(n_draws, d, k2)
    At = A.transpose(0, 2, 1)
    L_A, L_B = np.linalg.cholesky(At @ A), np.linalg.cholesky(B.transpose(0, 2, 1) @ B)
    M = np.linalg.solve(L_A, At @ B)  # L_A^-1 A^T B
    M = np.linalg.solve(L_B, M.transpose(0, 2, 1))  # (L_A^-1 A^T B L_B^-T)^T: the same Frobenius norm
    values = np.sum(M**2, axis=(1, 2)) / min(k, k2)
    return RandomBaseline(float(values.mean()), float(values.std()), expected_random_overlap(k, d, k2), n_draws)


def _overlaps(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """`subspace_overlap` of each pair of a stack of bases [P, d, k1] and [P, d, k2]."""
    A, B = np.linalg.qr(A)[0], np.linalg.qr(B)[0]
    return np.sum((A.transpose(0, 2, 1) @ B) ** 2, axis=(1, 2)) / min(A.shape[2], B.shape[2])


def _orth(A: np.ndarray) -> np.ndarray | None:
    """scipy.linalg.orth of each basis of a stack [P, d, k]; None if any of them has a lower rank."""
    u, s, _ = np.linalg.svd(A, full_matrices=False)
    tol = np.max(s, axis=1, initial=0.0) * np.finfo(s.dtype).eps * max(A.shape[1:])
    return u if np.all(s > tol[:, None]) else None


def _angles(A: np.ndarray, B: np.ndarray) -> np.ndarray | None:
    """`principal_angles` of each pair of a stack of bases [P, d, k1] and [P, d, k2]: scipy's subspace_angles
    (cosines from the SVD of QA^T QB, sines from the residual where cos^2 >= 1/2) on stacks; None where a
    basis is rank-deficient (the caller takes scipy's own path)."""
    QA, QB = _orth(A), _orth(B)
    if QA is None or QB is None:
        return None
    product = QA.transpose(0, 2, 1) @ QB
    sigma = np.linalg.svd(product, compute_uv=False)
    if QA.shape[2] >= QB.shape[2]:
        residual = QB - QA @ product
    else:
        residual = QA - QB @ product.transpose(0, 2, 1)
    mask = sigma**2 >= 0.5
    sines = np.arcsin(np.clip(np.linalg.svd(residual, compute_uv=False), -1.0, 1.0))
    radians = np.where(mask, sines, np.arccos(np.clip(sigma[:, ::-1], -1.0, 1.0)))
    return np.sort(np.degrees(radians), axis=1)


@single_blas_thread
def overlaps_and_angles(
    first: Sequence[Subspace | np.ndarray], second: Sequence[Subspace | np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(`subspace_overlap`, `principal_angles`) of every pair (first[i], second[i]); pairs of the same
    dimensions are computed as one stack."""
    A, B = [_as_basis(U) for U in first], [_as_basis(U) for U in second]
    if len(A) != len(B):
        raise ValueError(f"{len(A)} first subspaces vs {len(B)} second ones")
    overlaps, angles = np.empty(len(A)), [np.empty(0)] * len(A)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (a, b) in enumerate(zip(A, B)):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"subspaces live in different spaces: d={a.shape[0]} vs d={b.shape[0]}")
        groups.setdefault((*a.shape, b.shape[1]), []).append(i)
    for members in groups.values():
        stack_a, stack_b = np.stack([A[i] for i in members]), np.stack([B[i] for i in members])
        overlaps[members] = _overlaps(stack_a, stack_b)
        stacked = _angles(stack_a, stack_b)
        for j, i in enumerate(members):
            angles[i] = stacked[j] if stacked is not None else principal_angles(A[i], B[i])
    return overlaps, angles


def overlap_matrix(subspaces: dict[str, Subspace]) -> tuple[tuple[str, ...], np.ndarray]:
    """Pairwise overlap between the emotions' subspaces of one model and layer: (emotions, [E, E])."""
    names = tuple(subspaces)
    bases = _orthonormal_all([_as_basis(subspaces[name]) for name in names])  # as `subspace_overlap`, once each
    M = np.array([[np.sum((a.T @ b) ** 2) / min(a.shape[1], b.shape[1]) for b in bases] for a in bases])
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
