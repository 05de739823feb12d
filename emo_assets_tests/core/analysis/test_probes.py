import numpy as np
import pytest

from emo_assets.core.analysis import layerwise
from emo_assets.core.analysis.probes import (
    ProbeSettings,
    bow_probe,
    cross_validate,
    cross_validate_labelings,
    make_folds,
    probe_layers,
    row_space_features,
    shuffled_labels,
)
from emo_assets_tests.core.analysis.synthetic import EMOTIONS, planted_activations

FILLER = "the a day long we walked home after lunch train station window rain coffee table book city".split()
MARKERS = {"gratitude": "thanks", "anger": "furious", "apology": "sorry", "neutral": "schedule"}


def _texts(labels, with_label_words, seed=0):
    rng = np.random.default_rng(seed)
    texts = []
    for label in labels:
        words = list(rng.choice(FILLER, size=8))
        if with_label_words:
            words.insert(int(rng.integers(0, 9)), MARKERS[label])
        texts.append(" ".join(words))
    return texts


def test_probe_separable_high_and_shuffled_at_chance():
    data = planted_activations(d=64, strength=3.0)
    noise = np.random.default_rng(5).standard_normal(data.X.shape).astype(np.float32)
    layers = np.stack([noise, data.X])  # layer 0: no signal, layer 1: planted
    res = probe_layers({"residual": layers}, data.labels, _texts(data.labels, True), EMOTIONS)
    t = {row["layer"]: row for row in res.table.to_dicts()}
    assert t[1]["accuracy_mean"] >= 0.95
    assert t[1]["control_mean"] == pytest.approx(0.25, abs=0.1)
    assert t[1]["selectivity"] >= 0.6
    assert t[0]["accuracy_mean"] == pytest.approx(0.25, abs=0.1)
    assert res.chance == pytest.approx(0.25)
    assert res.best == {
        "residual": {"layer": 1, "accuracy_mean": t[1]["accuracy_mean"], "selectivity": t[1]["selectivity"]}
    }
    assert res.bow is not None and res.bow.mean >= 0.95
    assert t[1]["bow_mean"] == pytest.approx(res.bow.mean)
    assert t[1]["converged"]
    assert res.table.columns[:7] == [
        "kind",
        "layer",
        "accuracy_mean",
        "accuracy_std",
        "control_mean",
        "control_std",
        "selectivity",
    ]


def test_bow_on_label_free_texts_is_near_chance():
    labels = [e for e in EMOTIONS for _ in range(70)]
    y = np.repeat(np.arange(4), 70)
    folds = make_folds(y, 5, 0)
    score = cross_validate(bow_probe, _texts(labels, False, seed=3), y, folds, ProbeSettings())
    assert score.mean == pytest.approx(0.25, abs=0.1)
    marked = cross_validate(bow_probe, _texts(labels, True, seed=3), y, folds, ProbeSettings())
    assert marked.mean >= 0.95


def test_folds_and_control_are_deterministic_and_shared():
    y = np.repeat(np.arange(4), 20)
    a, b = make_folds(y, 5, 7), make_folds(y, 5, 7)
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b))
    assert sorted(np.concatenate([test for _, test in a]).tolist()) == list(range(80))
    for _, test in a:  # stratified: 4 per class per fold
        assert np.bincount(y[test]).tolist() == [4, 4, 4, 4]
    s = shuffled_labels(y, 0)
    assert np.array_equal(s, shuffled_labels(y, 0)) and not np.array_equal(s, y)
    assert np.bincount(s).tolist() == np.bincount(y).tolist()
    with pytest.raises(ValueError, match="n_splits"):
        make_folds(np.array([0, 0, 1, 1, 1, 1, 1]), 5, 0)


def test_probe_without_texts_and_shape_errors():
    data = planted_activations(d=16, per_emotion=20)
    res = probe_layers({"mlp": data.X[None]}, data.labels, None, EMOTIONS)
    row = res.table.row(0, named=True)
    assert row["bow_mean"] is None and row["kind"] == "mlp" and row["accuracy_mean"] >= 0.95
    with pytest.raises(ValueError, match="expected"):
        probe_layers({"mlp": data.X[None, :10]}, data.labels, None, EMOTIONS)


def test_folds_fitted_in_groups_under_the_memory_budget_score_as_one_batch(monkeypatch):
    """Past `layerwise.CHUNK_BYTES` the folds are fitted a group at a time (one fold per group here): the same
    optimum, so the same held-out accuracies, fold by fold, as the one batched fit."""
    data = planted_activations(d=16, per_emotion=40, strength=1.0)
    X = data.X.astype(np.float64)
    y = np.repeat(np.arange(4), 40)
    folds = make_folds(y)
    labelings = (y, shuffled_labels(y))
    batched = cross_validate_labelings(row_space_features, X, labelings, folds, ProbeSettings())
    monkeypatch.setattr(layerwise, "CHUNK_BYTES", 1)
    one_by_one = cross_validate_labelings(row_space_features, X, labelings, folds, ProbeSettings())
    for a, b in zip(batched, one_by_one):
        assert a.converged and b.converged
        np.testing.assert_array_equal(a.fold_accuracies, b.fold_accuracies)
    assert 0.5 < batched[0].mean < 1.0  # a problem where fits can disagree: not every row is separable
