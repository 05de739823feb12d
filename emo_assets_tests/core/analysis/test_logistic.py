"""The probes' own solver and row-space features against scikit-learn, computed independently here.

`logistic.fit_multinomial` must reach the minimiser of scikit-learn's LogisticRegression objective (checked
against lbfgs run to a far tighter tolerance than its default), and `bow_probe`'s row-space coordinates must
keep the inner products of CountVectorizer's counts and give the same held-out accuracies as scikit-learn's
Pipeline on the committed dataset.
"""

from __future__ import annotations

import numpy as np
import pytest

from emo_assets.core.analysis.logistic import fit_multinomial
from emo_assets.core.analysis.probes import (
    ProbeSettings,
    bow_probe,
    cross_validate,
    make_folds,
    row_space_features,
    shuffled_labels,
)
from emo_assets_tests.conftest import BASELINE, read_records


def _sklearn_fit(F: np.ndarray, y: np.ndarray, C: float = 1.0):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=100_000, tol=1e-10).fit(F, y)


def _problem(seed: int, n: int = 90, d: int = 40, k: int = 4):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers = rng.standard_normal((k, d))
    X = centers[y] * 0.7 + rng.standard_normal((n, d)) * np.linspace(0.2, 5.0, d)  # badly scaled columns
    return X, y


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_fit_reaches_scikit_learn_optimum_with_padding(C):
    """Two problems of different sizes in one batch (the smaller padded with zero rows and columns), each
    with two labelings, against scikit-learn fitted on each alone."""
    problems = [_problem(0), _problem(1, n=70, d=30)]
    labelings = [(y, shuffled_labels(y, 3)) for _, y in problems]
    n, r = max(len(X) for X, _ in problems), max(X.shape[1] for X, _ in problems)
    batch, onehot, rows = np.zeros((2, n, r)), np.zeros((2, 2, 4, n)), np.zeros((2, n))
    for b, (X, _) in enumerate(problems):
        batch[b, : len(X), : X.shape[1]] = X
        rows[b, : len(X)] = 1
        for j, labels in enumerate(labelings[b]):
            onehot[b, j, labels, np.arange(len(X))] = 1
    fit = fit_multinomial(batch, onehot, rows, C=C, tol=1e-9, max_iter=100)
    assert fit.converged.all()
    for b, (X, _) in enumerate(problems):
        for j, labels in enumerate(labelings[b]):
            reference = _sklearn_fit(X, labels, C)
            coef = fit.coef[b, j, :, : X.shape[1]]
            assert np.abs(coef - reference.coef_).max() <= 1e-5 * max(1.0, np.abs(reference.coef_).max())
            assert np.all(fit.coef[b, j, :, X.shape[1] :] == 0)
            # the intercept is defined up to a shift shared by the classes (scikit-learn's sums to zero)
            intercept = fit.intercept[b, j] - fit.intercept[b, j].mean()
            assert np.abs(intercept - reference.intercept_).max() <= 1e-5 * max(1.0, np.abs(reference.coef_).max())
            logits = fit.decision(b, X)[j].T
            assert np.array_equal(logits.argmax(axis=1), reference.predict(X))


def test_not_converged_when_newton_steps_run_out():
    X, y = _problem(2)
    onehot = np.zeros((1, 1, 4, len(y)))
    onehot[0, 0, y, np.arange(len(y))] = 1
    fit = fit_multinomial(X[None], onehot, np.ones((1, len(y))), C=1.0, tol=1e-9, max_iter=1)
    assert not fit.converged.any() and fit.n_iter == 1


@pytest.fixture(scope="module")
def baseline_texts():
    records = read_records(BASELINE)
    emotions = sorted({r["emotion"] for r in records})
    return [r["text"] for r in records], np.array([emotions.index(r["emotion"]) for r in records])


def test_bow_features_preserve_countvectorizer_inner_products(baseline_texts):
    from sklearn.feature_extraction.text import CountVectorizer

    texts, y = baseline_texts
    train, test = make_folds(y, 5, 0)[0]
    vectorizer = CountVectorizer(lowercase=True).fit([texts[i] for i in train])
    counts_train = vectorizer.transform([texts[i] for i in train]).toarray().astype(np.float64)
    counts_test = vectorizer.transform([texts[i] for i in test]).toarray().astype(np.float64)
    F_train, F_test = bow_probe(texts, train, test)
    assert F_train.shape[1] < counts_train.shape[1]  # fewer training rows than words: row-space coordinates
    scale = (counts_train @ counts_train.T).max()
    assert np.abs(F_train @ F_train.T - counts_train @ counts_train.T).max() <= 1e-9 * scale
    assert np.abs(F_test @ F_train.T - counts_test @ counts_train.T).max() <= 1e-9 * scale


def test_bow_accuracies_match_scikit_learn_pipeline(baseline_texts):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    texts, y = baseline_texts
    folds = make_folds(y, 5, 0)
    score = cross_validate(bow_probe, texts, y, folds, ProbeSettings())
    assert score.converged
    for (train, test), accuracy in zip(folds, score.fold_accuracies, strict=True):
        model = Pipeline([("bow", CountVectorizer()), ("logreg", LogisticRegression(max_iter=100_000, tol=1e-10))])
        model.fit([texts[i] for i in train], y[train])
        assert accuracy == np.mean(model.predict([texts[i] for i in test]) == y[test])


def test_row_space_features_keep_standardised_inner_products():
    X, _ = _problem(4, n=60, d=100)
    train, test = np.arange(45), np.arange(45, 60)
    F_train, F_test = row_space_features(X, train, test)
    mean, std = X[train].mean(axis=0), X[train].std(axis=0)
    Z_train, Z_test = (X[train] - mean) / std, (X[test] - mean) / std
    assert F_train.shape == (45, 44)  # centred training rows span n_train - 1 dimensions
    assert np.allclose(F_train @ F_train.T, Z_train @ Z_train.T, atol=1e-9 * len(train) * X.shape[1])
    assert np.allclose(F_test @ F_train.T, Z_test @ Z_train.T, atol=1e-9 * len(train) * X.shape[1])
