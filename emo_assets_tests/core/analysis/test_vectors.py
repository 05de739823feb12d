import numpy as np
import pytest

from emo_assets.core.analysis.vectors import (
    cosine_matrix,
    emotion_vectors,
    emotion_vectors_by_layer,
    separation_rows,
    separation_score,
)
from emo_assets_tests.core.analysis.synthetic import EMOTIONS, planted_activations


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_planted_directions_are_recovered_after_centring():
    data = planted_activations()
    vec = emotion_vectors(data.X, data.labels, EMOTIONS)
    planted = data.strength * data.directions
    planted_centred = planted - planted.mean(axis=0)
    for e in range(len(EMOTIONS)):
        assert _cos(vec.centred[e], planted_centred[e]) >= 0.99
        assert np.isclose(vec.centred_norm[e], np.linalg.norm(planted_centred[e]), rtol=0.05)
    # centred vectors sum to zero; with equal norms the off-diagonal cosines are -1/(E-1)
    np.testing.assert_allclose(vec.centred.sum(axis=0), 0, atol=1e-9)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_allclose(vec.cosine[off], -1 / 3, atol=0.05)
    # the anisotropy trap: raw means all point along the common offset
    assert vec.cosine_raw[off].min() > 0.95


def test_difference_vs_neutral_recovers_planted_difference():
    data = planted_activations()
    vec = emotion_vectors(data.X, data.labels, EMOTIONS, reference="neutral")
    planted = data.strength * data.directions
    n = EMOTIONS.index("neutral")
    for e, emotion in enumerate(EMOTIONS):
        if emotion == "neutral":
            assert vec.diff_vs_reference_norm[e] == 0
            assert np.all(np.isnan(vec.diff_vs_reference_unit[e]))
            continue
        target = planted[e] - planted[n]
        assert _cos(vec.diff_vs_reference[e], target) >= 0.99
        assert np.isclose(vec.diff_vs_reference_norm[e], np.sqrt(2) * data.strength, rtol=0.05)
        np.testing.assert_allclose(np.linalg.norm(vec.diff_vs_reference_unit[e]), 1.0)


def test_statistics_are_float64_and_grand_mean_ignores_class_imbalance():
    data = planted_activations(counts=(70, 70, 70, 70))
    vec = emotion_vectors(data.X, data.labels, EMOTIONS)
    assert vec.means.dtype == np.float64 and vec.cosine.dtype == np.float64
    # triple the gratitude sentences: its mean, and the grand mean of means, stay the same
    g = [i for i, lab in enumerate(data.labels) if lab == "gratitude"]
    X3 = np.concatenate([data.X, data.X[g], data.X[g]])
    labels3 = data.labels + ["gratitude"] * (2 * len(g))
    vec3 = emotion_vectors(X3, labels3, EMOTIONS)
    np.testing.assert_allclose(vec3.grand_mean, vec.grand_mean, atol=1e-9)
    np.testing.assert_allclose(vec3.centred, vec.centred, atol=1e-9)
    assert vec3.counts.tolist() == [210, 70, 70, 70]


def test_separation_hand_computed_two_classes():
    X = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])
    labels = ["a", "a", "b", "b"]
    sep = separation_score(X, labels, emotions=("a", "b"))
    # means (1,0) and (0,5), grand mean (0.5,2.5): between = (0.25+6.25+0.25+6.25)/2 = 6.5
    # within: each class has squared deviations 1 and 1 -> 1 per class -> 1
    assert sep.between == pytest.approx(6.5)
    assert sep.within == pytest.approx(1.0)
    assert sep.ratio == pytest.approx(6.5)


def test_separation_higher_for_separated_classes():
    far = planted_activations(strength=8.0)
    near = planted_activations(strength=0.3)
    s_far = separation_score(far.X, far.labels, EMOTIONS).ratio
    s_near = separation_score(near.X, near.labels, EMOTIONS).ratio
    assert s_far > 10 * s_near
    assert s_near < 0.05


def test_by_layer_and_rows():
    layers = np.stack([planted_activations(strength=s, seed=i).X for i, s in enumerate([0.5, 4.0, 8.0])])
    labels = planted_activations().labels
    by_layer = emotion_vectors_by_layer(layers, labels, EMOTIONS)
    assert len(by_layer) == 3
    seps = [v.separation.ratio for v in by_layer]
    assert seps[0] < seps[1] < seps[2]
    rows = separation_rows(by_layer, model="m", kind="residual")
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[2]["model"] == "m" and rows[2]["separation"] == pytest.approx(seps[2])
    assert rows[2]["mean_offdiag_cosine_raw"] > 0.9 and rows[2]["mean_offdiag_cosine_centred"] < 0
    with pytest.raises(ValueError):
        emotion_vectors_by_layer(layers[0], labels, EMOTIONS)


def test_label_errors():
    data = planted_activations()
    with pytest.raises(ValueError, match="not in the emotion list"):
        emotion_vectors(data.X, data.labels[:-1] + ["joy"], EMOTIONS)
    with pytest.raises(ValueError, match="at least one sentence"):
        emotion_vectors(data.X[:70], data.labels[:70], EMOTIONS)
    with pytest.raises(ValueError, match="labels for"):
        emotion_vectors(data.X[:10], data.labels, EMOTIONS)


def test_cosine_matrix_nan_for_zero_rows():
    M = cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    assert np.isnan(M[1]).all() and np.isnan(M[:, 1]).all()
    assert M[0, 2] == pytest.approx(np.sqrt(0.5))
