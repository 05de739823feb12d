import numpy as np
import pytest

from emo_assets.core.analysis.alignment import (
    LayerSet,
    cka_matrix,
    cross_model_subspace_rows,
    linear_cka,
    rsa,
    upper_triangle,
)
from emo_assets.core.analysis.subspaces import emotion_subspaces_by_layer
from emo_assets_tests.core.analysis.synthetic import EMOTIONS, planted_activations


def _orthogonal(d, rng):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


@pytest.mark.parametrize("n,d", [(100, 20), (60, 200)])  # feature form (d <= n) and Gram form (d > n)
def test_cka_invariant_to_rotation_and_scale(n, d):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)) @ np.diag(np.linspace(0.1, 5, d)) + 7.0
    R = _orthogonal(d, rng)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, 3.7 * X @ R) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(X, X @ R + 100.0) == pytest.approx(1.0, abs=1e-6)  # centring inside


def test_cka_independent_small_symmetric_and_forms_agree():
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((500, 10)), rng.standard_normal((500, 12))
    assert linear_cka(X, Y) < 0.05
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), abs=1e-12)
    # Gram form (cka_matrix) agrees with the feature form (linear_cka with d <= n)
    M = cka_matrix(X[None], Y[None])
    assert M[0, 0] == pytest.approx(linear_cka(X, Y), abs=1e-10)
    # not invariant to arbitrary invertible maps (that is the point of CKA with d > n)
    A = rng.standard_normal((10, 10)) @ np.diag(np.logspace(-2, 2, 10))
    assert linear_cka(X, X @ A) < 0.95


def test_cka_matrix_layers():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((3, 50, 80))
    R = _orthogonal(80, rng)
    B = [2 * A[2] @ R, rng.standard_normal((50, 40))]  # layers of different widths are allowed
    M = cka_matrix(A, B)
    assert M.shape == (3, 2)
    assert M[2, 0] == pytest.approx(1.0, abs=1e-6)
    assert M[0, 0] < 0.9
    S = cka_matrix(A, A)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-9)
    np.testing.assert_allclose(S, S.T, atol=1e-12)
    with pytest.raises(ValueError):
        cka_matrix(A, rng.standard_normal((2, 49, 80)))


def test_rsa():
    a = np.array([[1, 0.2, -0.5, 0.1], [0.2, 1, 0.3, -0.4], [-0.5, 0.3, 1, 0.0], [0.1, -0.4, 0.0, 1]])
    assert upper_triangle(a).tolist() == [0.2, -0.5, 0.1, 0.3, -0.4, 0.0]
    same = rsa(a, a)
    assert same.pearson == pytest.approx(1.0) and same.spearman == pytest.approx(1.0) and same.n_pairs == 6
    monotone = rsa(a, np.sign(a) * a**2)
    assert monotone.spearman == pytest.approx(1.0) and monotone.pearson < 1.0
    assert rsa(a, -a).pearson == pytest.approx(-1.0)
    flat = rsa(a, np.ones((4, 4)))
    assert np.isnan(flat.pearson) and np.isnan(flat.spearman)


def test_cross_model_subspace_overlap_with_baseline():
    data = planted_activations(d=32, per_emotion=30)
    other = planted_activations(d=32, per_emotion=30, seed=9)
    subs_a = emotion_subspaces_by_layer(data.X[None], data.labels, EMOTIONS, k=4)
    subs_b = emotion_subspaces_by_layer(other.X[None], other.labels, EMOTIONS, k=4)
    rows = cross_model_subspace_rows(subs_a, subs_a, n_random=300, seed=0, pair="a-a")
    assert len(rows) == 4 and rows[0]["pair"] == "a-a"
    for row in rows:
        assert row["overlap"] == pytest.approx(1.0)
        assert row["mean_angle_deg"] == pytest.approx(0.0, abs=1e-3)
        assert row["random_overlap_analytical"] == pytest.approx(4 / 32)
        assert row["random_overlap_mean"] == pytest.approx(4 / 32, abs=0.015)
    rows_ab = cross_model_subspace_rows(subs_a, subs_b, layer_pairs=[(0, 0)])
    assert all(0.0 <= r["overlap"] < 1.0 for r in rows_ab)
    with pytest.raises(ValueError, match="layer_pairs"):
        cross_model_subspace_rows(subs_a, subs_a + subs_a)


def _hsic_unbiased(K, L):
    """Song et al. (2012) unbiased HSIC, written out independently of the implementation."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (
        np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def test_debiased_cka():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((280, 768)), rng.standard_normal((280, 768))
    # the trap: with d > n the plain estimator is far from 0 for unrelated representations
    assert linear_cka(X, Y) > 0.6
    assert abs(linear_cka(X, Y, debiased=True)) < 0.02
    R = _orthogonal(768, rng)
    assert linear_cka(X, 0.3 * X @ R + 5.0, debiased=True) == pytest.approx(1.0, abs=1e-6)
    # matches the textbook unbiased-HSIC formula
    A, B = rng.standard_normal((30, 8)), rng.standard_normal((30, 5))
    A[:, :5] += B
    K, L = A @ A.T, B @ B.T
    expected = _hsic_unbiased(K, L) / np.sqrt(_hsic_unbiased(K, K) * _hsic_unbiased(L, L))
    assert linear_cka(A, B, debiased=True) == pytest.approx(expected, abs=1e-10)
    assert cka_matrix(A[None], B[None], debiased=True)[0, 0] == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_feature_and_gram_forms_agree(debiased):
    """Both paths on data where either applies (n = 90 sentences, widths 12-40), layers of mixed widths,
    related and unrelated, with a large offset and one outlier dimension (as GPT-2's residual stream)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((90, 40)) * np.linspace(0.2, 4, 40) + 30.0
    base[:, 0] *= 50
    A = [base, base[:, :12] @ rng.standard_normal((12, 12)), rng.standard_normal((90, 25))]
    B = np.stack([base @ _orthogonal(40, rng) * 0.1 - 4.0, base + rng.standard_normal((90, 40))])
    for first, second in ((A, B), (A, A), (B, B)):
        gram = cka_matrix(first, second, debiased=debiased, form="gram")
        features = cka_matrix(first, second, debiased=debiased, form="features")
        np.testing.assert_allclose(features, gram, rtol=0, atol=1e-10)
    # the reference: the U-centred (or centred) n x n Gram matrices of each pair, built independently
    for la, X in enumerate(A):
        for lb, Y in enumerate(B):
            K, L = [(Z - Z.mean(axis=0)) @ (Z - Z.mean(axis=0)).T for Z in (X, Y)]
            if debiased:
                expected = _hsic_unbiased(K, L) / np.sqrt(_hsic_unbiased(K, K) * _hsic_unbiased(L, L))
            else:
                expected = np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))
            assert cka_matrix(A, B, debiased=debiased)[la, lb] == pytest.approx(expected, abs=1e-10)


def test_cka_reads_one_layer_at_a_time():
    """A `LayerSet` over a sequence that reads each layer on demand gives the array's values, and the feature
    path never asks for more than the two layers of the pair at hand."""
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((3, 120, 16)), rng.standard_normal((2, 120, 30))
    B[1] += A[0] @ rng.standard_normal((16, 30))

    class Layers:
        shape = A.shape

        def __init__(self):
            self.reads = []

        def __len__(self):
            return len(A)

        def __getitem__(self, layer):
            self.reads.append(layer)
            return A[layer].astype(np.float32)

    lazy = Layers()
    plain, debiased = LayerSet(lazy, "A").ckas(LayerSet(B, "B"))
    np.testing.assert_allclose(plain, cka_matrix(A.astype(np.float32), B), atol=1e-12)
    np.testing.assert_allclose(debiased, cka_matrix(A.astype(np.float32), B, debiased=True), atol=1e-12)
    assert sorted(lazy.reads) == [0, 1, 2]  # each layer of A read once, B's layers in the inner loop
    assert plain[0, 1] > 0.5 > plain[1, 1]
    with pytest.raises(ValueError, match="form"):
        LayerSet(A, form="svd")
