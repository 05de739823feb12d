"""The activation probes against scikit-learn's own pipeline on real activations.

`probe_layers` fits its regressions on row-space coordinates (see `probes`). This checks the results against
an independent reference written here: scikit-learn's Pipeline(StandardScaler, LogisticRegression) fitted on
the raw activations of every layer and kind, on the same stratified folds built directly from
`StratifiedKFold`, for the true labels and the shuffled control. The activations are real MiniLM ones (the
offline model with real weights) on sentences of the committed baseline dataset, 160 of them, so each
training fold (128 rows) is narrower than the model (d = 384) and the row-space path is the one exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from emo_assets.core.activations import ActivationFile
from emo_assets.core.analysis.probes import ProbeSettings, probe_layers
from emo_assets.core.extraction import ExtractionOptions, extract_to_file
from emo_assets_tests.conftest import BASELINE, cut_dataset, read_records

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
PER_EMOTION = 40
TOLERANCE = 0.01  # accuracies may differ by where lbfgs stops, not by more


@pytest.fixture(scope="module")
def minilm_sentence_ends(tmp_path_factory):
    from emo_assets.core.models import load_model

    folder = tmp_path_factory.mktemp("minilm")
    records = read_records(cut_dataset(BASELINE, folder / "baseline.jsonl", PER_EMOTION))
    loaded = load_model("minilm", device="cpu")
    path = folder / "activations.safetensors"
    extract_to_file(
        loaded, [r["text"] for r in records], [r["id"] for r in records], path, ExtractionOptions(batch_size=32)
    )
    stored = ActivationFile(path)
    activations = {
        kind: np.stack([stored.sentence_end(kind, layer) for layer in range(stored.n_layers)])
        for kind in ("resid_post", "mlp_out")
    }
    return activations, [r["emotion"] for r in records]


def _reference_accuracy(X: np.ndarray, y: np.ndarray, folds: list, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    accuracies = []
    for train, test in folds:
        model = Pipeline(
            [
                ("scale", StandardScaler()),
                ("logreg", LogisticRegression(C=1.0, solver="lbfgs", max_iter=5000, tol=1e-4, random_state=seed)),
            ]
        )
        model.fit(X[train], y[train])
        accuracies.append(np.mean(model.predict(X[test]) == y[test]))
    return float(np.mean(accuracies))


def reference_differences(activations: dict[str, np.ndarray], labels: list[str]) -> dict[str, float]:
    """Largest |probe_layers - scikit-learn| over layers and kinds, for the probe and for the control."""
    from sklearn.model_selection import StratifiedKFold

    table = probe_layers(activations, labels, None, EMOTIONS, ProbeSettings()).table
    y = np.array([EMOTIONS.index(label) for label in labels])
    y_control = np.random.default_rng(0).permutation(y)
    # one split, stratified on the true labels, shared by the probe and its control (as `probes` promises)
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    worst = {"accuracy_mean": 0.0, "control_mean": 0.0}
    for row in table.iter_rows(named=True):
        X = activations[row["kind"]][row["layer"]].astype(np.float64)
        for column, target in (("accuracy_mean", y), ("control_mean", y_control)):
            worst[column] = max(worst[column], abs(row[column] - _reference_accuracy(X, target, folds)))
    return worst


def test_probe_accuracies_match_scikit_learn_on_minilm(minilm_sentence_ends):
    activations, labels = minilm_sentence_ends
    assert activations["resid_post"].shape[1:] == (4 * PER_EMOTION, 384)
    table = probe_layers(activations, labels, None, EMOTIONS).table
    assert table["converged"].all()
    assert table["accuracy_mean"].max() >= 0.6  # real signal, so agreement is not agreement on noise
    worst = reference_differences(activations, labels)
    assert worst["accuracy_mean"] <= TOLERANCE and worst["control_mean"] <= TOLERANCE, worst


def test_primal_probe_matches_scikit_learn_when_rows_outnumber_features(minilm_sentence_ends):
    """The large-n path: the first 96 MiniLM dimensions, so each training fold (128 rows) is wider than the
    features and the regression is solved on the standardised features themselves, with the covariance
    preconditioner of `logistic` (the one that keeps conjugate gradients' steps independent of n)."""
    activations, labels = minilm_sentence_ends
    narrow = {kind: X[:, :, :96] for kind, X in activations.items()}
    table = probe_layers(narrow, labels, None, EMOTIONS).table
    assert table["converged"].all()
    assert table["accuracy_mean"].max() >= 0.6
    worst = reference_differences(narrow, labels)
    assert worst["accuracy_mean"] <= TOLERANCE and worst["control_mean"] <= TOLERANCE, worst
