import warnings

import numpy as np
import pytest

from emo_assets.core.analysis.subspaces import (
    NoVarianceError,
    _pca_subspaces,
    effective_k,
    emotion_subspaces,
    emotion_subspaces_by_layer,
    empirical_random_overlap,
    expected_random_overlap,
    orthonormalise,
    overlap_matrix,
    pca_subspace,
    principal_angles,
    random_orthonormal_basis,
    subspace_overlap,
    subspace_rows,
)
from emo_assets_tests.core.analysis.synthetic import EMOTIONS, planted_activations


def test_angles_identical_orthogonal_and_known():
    rng = np.random.default_rng(0)
    U = random_orthonormal_basis(40, 5, rng)
    R, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    np.testing.assert_allclose(principal_angles(U, U @ R), 0, atol=1e-5)  # same span, other basis
    assert subspace_overlap(U, U @ R) == pytest.approx(1.0)
    eye = np.eye(40)
    np.testing.assert_allclose(principal_angles(eye[:, :5], eye[:, 5:10]), 90.0, atol=1e-9)
    assert subspace_overlap(eye[:, :5], eye[:, 5:10]) == pytest.approx(0.0)
    t = np.radians(30)
    a = eye[:, :1]
    b = np.cos(t) * eye[:, :1] + np.sin(t) * eye[:, 1:2]
    np.testing.assert_allclose(principal_angles(a, b), [30.0], atol=1e-9)
    assert subspace_overlap(a, b) == pytest.approx(np.cos(t) ** 2)
    # overlap = mean squared cosine of the principal angles
    V = random_orthonormal_basis(40, 5, rng)
    assert subspace_overlap(U, V) == pytest.approx(np.mean(np.cos(np.radians(principal_angles(U, V))) ** 2))


def test_random_overlap_matches_k_over_d():
    d, k = 64, 8
    rng = np.random.default_rng(1)
    draws = [
        subspace_overlap(random_orthonormal_basis(d, k, rng), random_orthonormal_basis(d, k, rng)) for _ in range(400)
    ]
    # one draw has std ~0.018 here, so the mean of 400 has std ~0.001; tolerance 0.01 (10 sigma)
    assert np.mean(draws) == pytest.approx(k / d, abs=0.01)
    base = empirical_random_overlap(d, k, n_draws=300, seed=2)
    assert base.analytical == pytest.approx(0.125)
    assert base.mean == pytest.approx(0.125, abs=0.01)
    assert expected_random_overlap(4, 100, 10) == pytest.approx(0.1)  # max(k1, k2) / d


def test_pca_recovers_planted_plane_and_clips_k():
    rng = np.random.default_rng(3)
    d = 30
    plane = random_orthonormal_basis(d, 2, rng)
    X = 3 + rng.standard_normal((200, 2)) * [10.0, 6.0] @ plane.T + 0.1 * rng.standard_normal((200, d))
    sub = pca_subspace(X, k=2)
    assert principal_angles(sub, plane).max() < 2.0
    assert sub.explained_variance_ratio.sum() > 0.98
    assert sub.explained_variance_ratio[0] > sub.explained_variance_ratio[1]
    np.testing.assert_allclose(sub.basis.T @ sub.basis, np.eye(2), atol=1e-10)
    assert pca_subspace(X[:5], k=8).k == 4  # n_samples - 1
    assert effective_k(8, 100, 3) == 3  # d
    with pytest.raises(ValueError):
        effective_k(8, 1, 3)


def test_k_is_clipped_to_the_rank_of_the_data():
    """Rows from three distinct float32 vectors (Pythia's layer-0 MLP output at sentence ends that share three
    end tokens), with float32 rounding noise: they span 2 dimensions once centred, whatever k asks for."""
    rng = np.random.default_rng(4)
    points = rng.standard_normal((3, 48)).astype(np.float32) * 20
    X = points[rng.integers(0, 3, size=40)]
    X = X * (1 + rng.standard_normal(X.shape).astype(np.float32) * np.finfo(np.float32).eps)  # rounding noise
    assert X.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sub = pca_subspace(X, k=8)
    assert sub.k == 2
    assert sub.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-9)
    # the basis spans the plane through the three points
    plane = orthonormalise((points[1:] - points[0]).T.astype(np.float64))
    assert principal_angles(sub, plane).max() < 1e-3


def test_an_emotion_without_variance_has_no_subspace():
    data = planted_activations(d=32, per_emotion=30)
    X = data.X.copy()
    labels = np.asarray(data.labels)
    X[labels == "anger"] = X[labels == "anger"][0]  # every anger sentence gives the same vector
    with pytest.raises(NoVarianceError, match="same vector"):
        pca_subspace(X[labels == "anger"], k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's 0/0 explained-variance warning must not happen
        one = emotion_subspaces(X, data.labels, EMOTIONS, k=4)
    assert set(one) == set(EMOTIONS) - {"anger"}
    rows = subspace_rows([one], model="m")
    assert {r["emotion"] for r in rows} == set(EMOTIONS) - {"anger"}
    assert all(np.isfinite(r["explained_variance_total"]) for r in rows)


def test_emotion_subspaces_and_rows():
    data = planted_activations(d=32, per_emotion=30)
    per_layer = emotion_subspaces_by_layer(np.stack([data.X, data.X]), data.labels, EMOTIONS, k=4)
    assert len(per_layer) == 2 and set(per_layer[0]) == set(EMOTIONS)
    assert all(s.k == 4 and s.d == 32 for s in per_layer[0].values())
    one = emotion_subspaces(data.X, data.labels, EMOTIONS, k=4)
    np.testing.assert_allclose(subspace_overlap(one["anger"], per_layer[1]["anger"]), 1.0)
    names, M = overlap_matrix(one)
    assert names == EMOTIONS and np.allclose(np.diag(M), 1.0) and np.allclose(M, M.T)
    rows = subspace_rows(per_layer, model="m")
    assert len(rows) == 8 and rows[0]["random_overlap_analytical"] == pytest.approx(4 / 32)


def test_subspaces_from_the_scatter_matrix_equal_the_gram_route_and_the_svd():
    """More sentences than dimensions (n_e = 90 > d = 24): the [d, d] scatter-matrix route gives the bases and
    explained variances of the [n, n] Gram route and of the exact SVD (`pca_subspace`)."""
    data = planted_activations(d=24, per_emotion=90, seed=3)
    labels = np.asarray(data.labels)
    layers = np.stack([data.X, data.X * 3 - 1, np.roll(data.X, 5, axis=1)]).astype(np.float32)
    for emotion in EMOTIONS:
        X = layers[:, labels == emotion]
        scatter, gram = _pca_subspaces(X, 6, "covariance"), _pca_subspaces(X, 6, "gram")
        assert [s.k for s in scatter] == [6, 6, 6]
        for layer, (a, b) in enumerate(zip(scatter, gram)):
            exact = pca_subspace(X[layer], 6)
            for sub in (a, b):
                np.testing.assert_allclose(sub.basis, exact.basis, atol=1e-10)
                np.testing.assert_allclose(sub.explained_variance_ratio, exact.explained_variance_ratio, atol=1e-12)
                np.testing.assert_allclose(sub.mean, exact.mean, atol=1e-12)
    by_layer = emotion_subspaces_by_layer(layers, data.labels, EMOTIONS, k=6)  # takes the scatter route here
    np.testing.assert_allclose(
        by_layer[2]["anger"].basis, pca_subspace(layers[2, labels == "anger"], 6).basis, atol=1e-10
    )
    with pytest.raises(ValueError, match="form"):
        _pca_subspaces(layers, 6, "svd")
