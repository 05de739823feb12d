"""Per-layer linear probes: can a 4-way L2 logistic regression read the emotion from one layer's activations?

Design (see the science notes):
- one set of StratifiedKFold(n_splits, shuffle=True, seed) folds, built from the true labels, is shared by the
  activation probes, the bag-of-words baseline and the control task, so their accuracies differ only in the
  features/labels and not in the split;
- probe = standardisation fitted on the training fold, then an L2 multinomial logistic regression (C = 1):
  scikit-learn's Pipeline(StandardScaler, LogisticRegression). The scaler's statistics come from the training
  fold only (no test-fold statistics leak) and tame the few huge outlier dimensions of GPT-2-like residual
  streams, which would otherwise dominate the L2 penalty. When the standardised rows are wider than the
  training fold (d = 768 > 224 sentences), the regression is fitted on their coordinates in the span of the
  training rows instead (`row_space_features`): the L2-regularised minimiser lies in that span and the map is an
  isometry, so it is the same regression on n_train instead of d features; with more training rows than
  features it is solved on the standardised features themselves (the primal problem, linear in n). It is
  solved by `logistic.fit_multinomial` (scikit-learn's objective, batched Newton-CG) for all folds of a layer
  (groups of folds past a memory budget) and both the true and the control labels at once, to a gradient ten
  times smaller than where scikit-learn's lbfgs stops (its tol 1e-4), so the held-out predictions are the
  optimum's but for points on a decision boundary;
- bag-of-words baseline = word counts (scikit-learn CountVectorizer's tokens, vocabulary from the training fold
  only) then the same regression, fitted per fold: scikit-learn's Pipeline(CountVectorizer, LogisticRegression)
  on the sentence texts. Gratitude, apology and anger are lexically marked ("thanks", "sorry", "furious"), so
  a probe must be read against this baseline, not against chance. Counts are not standardised: scaling would
  blow up the weight of words seen once;
- control task (in the spirit of Hewitt & Liang 2019): the same probe on labels shuffled once with a fixed
  seed, same folds; selectivity = accuracy - control accuracy. With d = 768 > 224 training sentences any
  labelling is linearly separable on the training fold, so training accuracy means nothing; on the held-out
  folds the shuffled-label probe should sit at chance. A control clearly above chance flags leakage (e.g.
  duplicate sentences across folds, or statistics fitted on all data), and selectivity discounts it.

BLAS is limited to one thread while probing and the layers are probed side by side, a thread per core (see
`blas`): the fits are many small matrix products.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from emo_assets.core.analysis import layerwise
from emo_assets.core.analysis.blas import side_by_side, single_blas_thread
from emo_assets.core.analysis.labels import DEFAULT_EMOTIONS, encode_labels
from emo_assets.core.analysis.logistic import fit_multinomial

Folds = list[tuple[np.ndarray, np.ndarray]]
# float64-sized copies of a batch of features that a fit holds (the padded batch, the design matrix and its
# transpose, their float32 copies, the per-row work arrays): what the folds fitted at once are budgeted by
SOLVER_COPIES = 6


@dataclass(frozen=True)
class ProbeSettings:
    n_splits: int = 5
    seed: int = 0  # folds and the control-task shuffle
    C: float = 1.0  # inverse L2 strength (on standardised features)
    max_iter: int = 100  # Newton steps of `logistic.fit_multinomial`
    tol: float = 1e-5  # its stop: largest gradient entry of the mean objective (scikit-learn's lbfgs: 1e-4)


def make_folds(y: np.ndarray, n_splits: int = 5, seed: int = 0) -> Folds:
    """Stratified, shuffled folds with a fixed seed; the one split every probe in a run shares."""
    y = np.asarray(y)
    _, counts = np.unique(y, return_counts=True)
    if counts.min() < n_splits:
        raise ValueError(f"every class needs >= n_splits={n_splits} samples for stratified CV, got {counts.tolist()}")
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(y)), y)]


def shuffled_labels(y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Control-task labels: a fixed-seed permutation of `y` (same class counts, no link to the input)."""
    return np.random.default_rng(seed).permutation(np.asarray(y))


def row_space_features(X: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training, test) features of one fold: the rows standardised with the training fold's mean and std
    (ddof 0, a constant column keeps scale 1, as `StandardScaler`), in `row_space` coordinates."""
    Z_train, Z_test = (np.asarray(X[rows], dtype=np.float64) for rows in (train, test))  # standardised in place
    mean, std = Z_train.mean(axis=0), Z_train.std(axis=0)
    std[std == 0] = 1.0
    for Z in (Z_train, Z_test):
        Z -= mean
        Z /= std
    return row_space(Z_train, Z_test)


def row_space(Z_train: np.ndarray, Z_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When the rows are wider than the training fold, their coordinates in the span of the training rows.
    With Z Z^T = U diag(s^2) U^T (eigenvalues above rounding), training rows map to U s and test rows to
    Z_test Z^T U / s, which preserves every inner product with a weight vector in that span."""
    if Z_train.shape[1] <= len(Z_train):
        return Z_train, Z_test
    values, vectors = np.linalg.eigh(Z_train @ Z_train.T)
    keep = values > values[-1] * len(Z_train) * np.finfo(np.float64).eps
    U, root = vectors[:, keep], np.sqrt(values[keep])
    return U * root, (Z_test @ Z_train.T) @ U / root


def bow_probe(texts: Sequence[str], train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bag-of-words baseline's (training, test) features of one fold: scikit-learn CountVectorizer's word
    counts of the lowercased texts over the training fold's vocabulary, in `row_space` coordinates. Counts are
    not standardised."""
    from sklearn.feature_extraction.text import CountVectorizer

    texts = [str(text) for text in texts]
    vectorizer = CountVectorizer(lowercase=True).fit([texts[i] for i in train])
    counts = vectorizer.transform(texts).toarray().astype(np.float64)
    return row_space(counts[train], counts[test])


@dataclass(frozen=True)
class CVScore:
    fold_accuracies: np.ndarray
    converged: bool  # every fold's fit met the solver's stopping test within max_iter Newton steps

    @property
    def mean(self) -> float:
        return float(self.fold_accuracies.mean())

    @property
    def std(self) -> float:
        return float(self.fold_accuracies.std())


FeaturesOfFold = Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@single_blas_thread
def cross_validate(
    features_of_fold: FeaturesOfFold, X, y: np.ndarray, folds: Folds, settings: ProbeSettings
) -> CVScore:
    """Accuracy on each fold of the regression fitted on `features_of_fold(X, train, test)` (`row_space_features`
    for activations, `bow_probe` for a list of texts)."""
    return cross_validate_labelings(features_of_fold, X, [np.asarray(y)], folds, settings)[0]


@single_blas_thread
def cross_validate_labelings(
    features_of_fold: FeaturesOfFold, X, labelings: Sequence[np.ndarray], folds: Folds, settings: ProbeSettings
) -> list[CVScore]:
    """`cross_validate` for several labelings of the same rows (the true labels and the control), on the same
    folds and features: one batched fit (`logistic.fit_multinomial`) for every fold and labeling, or, where the
    folds' features, times the copies the solver makes of them, exceed `layerwise.CHUNK_BYTES` (thousands of
    sentences), one per group of folds that fits, so that memory stays that of a few copies of one fold's
    features."""
    accuracies = np.zeros((len(labelings), len(folds)))
    converged = np.ones(len(labelings), dtype=bool)
    group: list[tuple[int, tuple[np.ndarray, np.ndarray]]] = []
    for b, (train, test) in enumerate(folds):
        group.append((b, features_of_fold(X, train, test)))
        size = sum(F_train.size for _, (F_train, _) in group) * 8 * SOLVER_COPIES
        if b == len(folds) - 1 or size + size // len(group) > layerwise.CHUNK_BYTES:
            converged &= _fit_folds(group, folds, labelings, settings, accuracies)
            group = []
    return [CVScore(accuracies[j], bool(converged[j])) for j in range(len(labelings))]


def _fit_folds(
    group: list[tuple[int, tuple[np.ndarray, np.ndarray]]],
    folds: Folds,
    labelings: Sequence[np.ndarray],
    settings: ProbeSettings,
    accuracies: np.ndarray,
) -> np.ndarray:
    """One batched fit of the folds `group` [(fold index, (training, test) features)]: their held-out accuracies
    into `accuracies` [labeling, fold]; returns per labeling whether every fit converged."""
    n = max(len(folds[b][0]) for b, _ in group)
    r = max(F_train.shape[1] for _, (F_train, _) in group)
    n_classes = int(max(labels.max() for labels in labelings)) + 1
    # a group of one fold needs no padding: its features are the batch as they are
    batch = group[0][1][0][None] if len(group) == 1 else np.zeros((len(group), n, r))
    onehot = np.zeros((len(group), len(labelings), n_classes, n))
    rows = np.zeros((len(group), n))
    for g, (b, (F_train, _)) in enumerate(group):
        train = folds[b][0]
        if len(group) > 1:
            batch[g, : len(train), : F_train.shape[1]] = F_train
        rows[g, : len(train)] = 1
        for j, labels in enumerate(labelings):
            onehot[g, j, labels[train], np.arange(len(train))] = 1
    fit = fit_multinomial(batch, onehot, rows, settings.C, settings.tol, settings.max_iter)
    for g, (b, (_, F_test)) in enumerate(group):
        predicted = fit.decision(g, F_test).argmax(axis=1)
        for j, labels in enumerate(labelings):
            accuracies[j, b] = np.mean(predicted[j] == labels[folds[b][1]])
    return fit.converged.all(axis=0)


@dataclass(frozen=True)
class ProbeResults:
    """`table`: one row per (kind, layer). `best`: kind -> {"layer", "accuracy_mean", "selectivity"}."""

    table: pl.DataFrame
    bow: CVScore | None
    chance: float  # majority-class rate
    best: dict[str, dict[str, float]]
    n_samples: int
    seconds: float
    settings: ProbeSettings = field(default_factory=ProbeSettings)


def probe_layers(
    activations: Mapping[str, np.ndarray],
    labels: Sequence[str],
    texts: Sequence[str] | None = None,
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    settings: ProbeSettings = ProbeSettings(),
) -> ProbeResults:
    """Probe every layer of every activation kind.

    `activations`: kind (e.g. "residual", "mlp") -> [n_layers, n_sentences, d] (an array or a lazy stack;
    read a layer at a time, each fold's rows converted to float64). `labels` / `texts`: per sentence, same order. Without `texts` the bow columns are null.
    Table columns: kind, layer, accuracy_mean, accuracy_std, control_mean, control_std, selectivity,
    bow_mean, bow_std, accuracy_minus_bow, chance, n_samples, n_folds, converged.
    """
    start = time.perf_counter()
    y = encode_labels(labels, emotions)
    n = len(y)
    if texts is not None and len(texts) != n:
        raise ValueError(f"{len(texts)} texts for {n} labels")
    folds = make_folds(y, settings.n_splits, settings.seed)
    y_control = shuffled_labels(y, settings.seed)
    chance = float(np.bincount(y).max() / n)
    layers = []
    for kind, X_layers in activations.items():
        if np.ndim(X_layers) != 3 or np.shape(X_layers)[1] != n:
            raise ValueError(f"{kind}: expected [n_layers, {n}, d], got shape {np.shape(X_layers)}")
        layers += [(kind, layer) for layer in range(len(X_layers))]

    def probe(kind_layer: tuple[str, int]) -> list[CVScore]:
        # the layer as stored (float32): each fold's rows become float64 in `row_space_features`
        X = np.asarray(activations[kind_layer[0]][kind_layer[1]])
        if X.ndim != 2:
            raise ValueError(f"{kind_layer[0]} layer {kind_layer[1]} must be 2-D [n, d], got shape {X.shape}")
        return cross_validate_labelings(row_space_features, X, (y, y_control), folds, settings)

    scores = [future.result() for future in side_by_side(probe, layers)]
    bow = cross_validate(bow_probe, texts, y, folds, settings) if texts is not None else None
    rows = []
    for (kind, layer), (score, control) in zip(layers, scores):
        rows.append(
            {
                "kind": kind,
                "layer": layer,
                "accuracy_mean": score.mean,
                "accuracy_std": score.std,
                "control_mean": control.mean,
                "control_std": control.std,
                "selectivity": score.mean - control.mean,
                "bow_mean": bow.mean if bow else None,
                "bow_std": bow.std if bow else None,
                "accuracy_minus_bow": score.mean - bow.mean if bow else None,
                "chance": chance,
                "n_samples": n,
                "n_folds": len(folds),
                "converged": score.converged and control.converged,
            }
        )
    schema = {
        "kind": pl.String,
        "layer": pl.Int64,
        "accuracy_mean": pl.Float64,
        "accuracy_std": pl.Float64,
        "control_mean": pl.Float64,
        "control_std": pl.Float64,
        "selectivity": pl.Float64,
        "bow_mean": pl.Float64,
        "bow_std": pl.Float64,
        "accuracy_minus_bow": pl.Float64,
        "chance": pl.Float64,
        "n_samples": pl.Int64,
        "n_folds": pl.Int64,
        "converged": pl.Boolean,
    }
    table = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    return ProbeResults(
        table=table,
        bow=bow,
        chance=chance,
        best=best_layers(table),
        n_samples=n,
        seconds=time.perf_counter() - start,
        settings=settings,
    )


def best_layers(table: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Per kind, the layer with the highest mean CV accuracy (ties: the earliest layer)."""
    best = {}
    for kind in table["kind"].unique(maintain_order=True).to_list():
        sub = table.filter(pl.col("kind") == kind).sort(["accuracy_mean", "layer"], descending=[True, False])
        top = sub.row(0, named=True)
        best[kind] = {"layer": top["layer"], "accuracy_mean": top["accuracy_mean"], "selectivity": top["selectivity"]}
    return best
