"""Label handling shared by the analysis modules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_EMOTIONS: tuple[str, ...] = ("gratitude", "anger", "apology", "neutral")
REFERENCE_EMOTION = "neutral"


def encode_labels(labels: Sequence[str], emotions: Sequence[str]) -> np.ndarray:
    """Map string labels to indices into `emotions`; unknown labels raise instead of being dropped silently."""
    index = {emotion: i for i, emotion in enumerate(emotions)}
    if len(index) != len(emotions):
        raise ValueError(f"duplicate emotions in {list(emotions)}")
    unknown = sorted({str(label) for label in labels} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the emotion list {list(emotions)}")
    return np.fromiter((index[str(label)] for label in labels), dtype=np.int64, count=len(labels))


def as_float64_2d(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Activations as a float64 [n, d] array (statistics in float64 even for float32/bfloat16 storage)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {X.shape}")
    return X
