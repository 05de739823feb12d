"""Layers in groups that fit a memory budget: how the analysis keeps O(n x d) memory for the layers at hand.

The math functions take a model's activations as [n_layers, n_sentences, d]: an array, or a lazy stack
(`inputs.LayerStack`) whose `[layer]` reads one layer from the memory-mapped files. `layer_chunks` hands them
out as consecutive groups of layers whose float64 copy stays under `CHUNK_BYTES`: at the seed's sizes every
layer fits in one group, so a stacked computation runs once over all layers as before; at 100k sentences a
group is one layer, so neither the whole [layers, sentences, d] block nor its float64 copy is ever held.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 256 * 2**20  # float64 bytes of one group of layers


def layer_chunks(X_layers, budget: int | None = None) -> Iterator[tuple[range, np.ndarray]]:
    """(layer indices, their rows [len(indices), n, d] in the source's dtype) for consecutive groups of layers
    whose float64 size is at most `budget` (default `CHUNK_BYTES`; at least one layer per group). An array is
    sliced (no copy); a lazy stack reads each layer of the group."""
    budget = CHUNK_BYTES if budget is None else budget
    n_layers, n, d = (int(v) for v in np.shape(X_layers))
    per_group = max(1, budget // max(1, n * d * 8))
    for start in range(0, n_layers, per_group):
        layers = range(start, min(n_layers, start + per_group))
        if isinstance(X_layers, np.ndarray):
            yield layers, X_layers[layers.start : layers.stop]
        else:
            yield layers, np.stack([np.asarray(X_layers[i]) for i in layers])
