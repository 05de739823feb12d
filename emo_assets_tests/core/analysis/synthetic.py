"""Synthetic activations with known structure for the analysis tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EMOTIONS = ("gratitude", "anger", "apology", "neutral")


@dataclass(frozen=True)
class Planted:
    X: np.ndarray  # [n, d] float32, like stored activations
    labels: list[str]
    directions: np.ndarray  # [E, d] orthonormal planted unit directions
    strength: float


def planted_activations(
    d: int = 64,
    per_emotion: int = 70,
    strength: float = 8.0,
    noise: float = 0.5,
    seed: int = 0,
    counts: tuple[int, ...] | None = None,
) -> Planted:
    """x = offset + strength * p_label + noise, where offset is a large common vector (anisotropy: every raw
    cosine ~1) and the noise is anisotropic (two outlier dimensions with 6x the scale)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, len(EMOTIONS))))
    directions = q.T  # orthonormal rows
    counts = counts or (per_emotion,) * len(EMOTIONS)
    labels = [e for e, c in zip(EMOTIONS, counts) for _ in range(c)]
    y = np.repeat(np.arange(len(EMOTIONS)), counts)
    scale = np.full(d, noise)
    scale[:2] = 6 * noise  # outlier dimensions
    offset = np.zeros(d)
    offset[:2] = 60.0
    offset += 5.0
    X = offset + strength * directions[y] + rng.standard_normal((len(y), d)) * scale
    return Planted(X.astype(np.float32), labels, directions, strength)
