"""Figures of the analysis as PNG files.

Every function draws on its own `matplotlib.figure.Figure` (no pyplot figure registry, so nothing leaks between
calls or threads), writes the PNG atomically through `emo_assets.core.atomic.atomic_path` (temp file in the
same folder, fsync, rename; the temp file is removed on error) and returns the final path. PNG metadata
("Software" with the matplotlib version) is dropped so that identical inputs give identical bytes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; set before anything could import pyplot through this module

import numpy as np  # noqa: E402
from matplotlib import path as mpath  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.textpath import TextPath  # noqa: E402
from matplotlib.transforms import Affine2D  # noqa: E402

from emo_assets.core.analysis.tables import Table, as_rows  # noqa: E402
from emo_assets.core.atomic import atomic_path  # noqa: E402

DPI = 100
_PNG_METADATA = {"Software": None}


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as PNG atomically and deterministically; returns the final path."""
    final = Path(path)
    with atomic_path(final) as temp:
        fig.savefig(temp, format="png", dpi=DPI, metadata=_PNG_METADATA)
    return final


def _by_kind(rows: list[dict], value: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (layers, values) sorted by layer; rows without a kind are grouped under ""."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get(value) is None:
            continue
        out.setdefault(str(row.get("kind", "")), []).append((int(row["layer"]), float(row[value])))
    return {k: tuple(np.array(v) for v in zip(*sorted(pairs))) for k, pairs in out.items()}


def plot_layer_profile(
    path: str | os.PathLike,
    probe_table: Table | None = None,
    separation: Table | Mapping[str, Sequence[float]] | None = None,
    *,
    title: str = "",
) -> Path:
    """Left: separation score vs layer per kind. Right: probe accuracy (mean +- std over folds) vs layer per
    kind, its shuffled-label control (dashed), the bag-of-words baseline and chance (horizontal lines).

    `probe_table`: rows with kind, layer, accuracy_mean, accuracy_std, control_mean, bow_mean, chance (the
    `probes.probe_layers` table). `separation`: rows with [kind,] layer, separation (`vectors.separation_rows`)
    or a mapping kind -> per-layer values."""
    fig = Figure(figsize=(11, 4.2))
    ax_sep, ax_acc = fig.subplots(1, 2)
    if isinstance(separation, Mapping):
        sep = {k: (np.arange(len(v)), np.asarray(v, dtype=float)) for k, v in separation.items()}
    else:
        sep = _by_kind(as_rows(separation), "separation")
    for kind, (layers, values) in sep.items():
        ax_sep.plot(layers, values, marker="o", label=kind or None)
    ax_sep.set(xlabel="layer", ylabel="between / within variance", title="emotion separation")
    if any(sep):
        ax_sep.legend(loc="best", fontsize=8)
    ax_sep.grid(alpha=0.3)

    rows = as_rows(probe_table)
    acc, acc_std, ctrl = _by_kind(rows, "accuracy_mean"), _by_kind(rows, "accuracy_std"), _by_kind(rows, "control_mean")
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (kind, (layers, values)) in enumerate(acc.items()):
        colour = colours[i % len(colours)]
        err = acc_std.get(kind, (None, None))[1]
        ax_acc.errorbar(layers, values, yerr=err, marker="o", capsize=2, color=colour, label=f"{kind} probe")
        if kind in ctrl:
            ax_acc.plot(*ctrl[kind], linestyle="--", color=colour, alpha=0.7, label=f"{kind} control")
    bow = next((r["bow_mean"] for r in rows if r.get("bow_mean") is not None), None)
    chance = next((r["chance"] for r in rows if r.get("chance") is not None), None)
    if bow is not None:
        ax_acc.axhline(bow, color="black", linestyle=":", label=f"bag of words ({bow:.2f})")
    if chance is not None:
        ax_acc.axhline(chance, color="grey", linewidth=0.8, label=f"chance ({chance:.2f})")
    ax_acc.set(xlabel="layer", ylabel="CV accuracy", title="linear probe", ylim=(0, 1.05))
    if rows:
        ax_acc.legend(loc="best", fontsize=8)
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_cosine_heatmap(
    path: str | os.PathLike,
    cosine: np.ndarray,
    emotions: Sequence[str],
    *,
    title: str = "",
) -> Path:
    """Heatmap of an emotion-by-emotion cosine matrix on a fixed [-1, 1] scale, values annotated (NaN: "n/a").
    Pass the centred cosines: raw ones are ~0.99 everywhere because of anisotropy."""
    cosine = np.asarray(cosine, dtype=float)
    if cosine.shape != (len(emotions), len(emotions)):
        raise ValueError(f"cosine shape {cosine.shape} does not match {len(emotions)} emotions")
    fig = Figure(figsize=(1.2 * len(emotions) + 2.4, 1.1 * len(emotions) + 1.4))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(cosine), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(emotions)), labels=list(emotions), rotation=30, ha="right")
    ax.set_yticks(range(len(emotions)), labels=list(emotions))
    for i in range(len(emotions)):
        for j in range(len(emotions)):
            value = cosine[i, j]
            text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_cka_heatmaps(
    path: str | os.PathLike,
    matrices: Mapping[tuple[str, str], np.ndarray],
    *,
    title: str = "",
    annotate: bool | None = None,
    layers: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """One panel per model pair: linear CKA [layers of A, layers of B] on a [0, 1] scale (extended below 0
    for debiased CKA).

    `matrices`: (model_a, model_b) -> `alignment.cka_matrix` result. Values are annotated when every matrix
    is at most 13 x 13 unless `annotate` says otherwise. `layers`: model -> the model layer index of each row
    (the layers it stored), the tick labels where they are not 0, 1, 2, ..."""
    if not matrices:
        raise ValueError("no CKA matrices to plot")
    items = [(names, np.asarray(M, dtype=float)) for names, M in matrices.items()]
    if annotate is None:
        annotate = all(max(M.shape) <= 13 for _, M in items)
    fig = Figure(figsize=(5.2 * len(items), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(items)))
    im = None
    for ax, ((model_a, model_b), M) in zip(axes, items):
        vmin = min(0.0, float(np.nanmin(M))) if np.isfinite(M).any() else 0.0  # debiased CKA can be < 0
        im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=vmin, vmax=1, origin="lower")
        ax.set(xlabel=f"{model_b} layer", ylabel=f"{model_a} layer", title=f"{model_a} vs {model_b}")
        for axis, model, size in ((ax.xaxis, model_b, M.shape[1]), (ax.yaxis, model_a, M.shape[0])):
            stored = list((layers or {}).get(model, range(size)))
            if stored != list(range(size)):
                axis.set_ticks(range(size), [str(layer) for layer in stored])
        if annotate:
            _annotate_cells(ax, M)
    fig.colorbar(im, ax=list(axes), label="linear CKA", shrink=0.85)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def _annotate_cells(ax, M: np.ndarray) -> None:
    """Each finite value of `M` written in its cell (5 pt, black on light cells, white on dark ones) as one
    collection of glyph outlines: a text artist per cell made drawing hundreds of them the slow part."""
    rows, cols = np.nonzero(np.isfinite(M))
    values = M[rows, cols]
    points_to_pixels = Affine2D().scale(1 / 72) + ax.figure.dpi_scale_trans  # DPI-independent glyph size
    labels = PathCollection(
        [_centred_label(f"{value:.2f}") for value in values],
        offsets=np.column_stack([cols, rows]),
        offset_transform=ax.transData,
        transform=points_to_pixels,
        facecolors=np.where(values > 0.6, "black", "white"),
        edgecolors="none",
        in_layout=False,
    )
    ax.add_collection(labels, autolim=False)


@functools.lru_cache(maxsize=512)
def _centred_label(text: str) -> mpath.Path:
    """Outline of `text` at 5 pt, in points, centred on the origin."""
    outline = TextPath((0, 0), text, prop=FontProperties(size=5))
    # the box of the control points: the exact one (Path.get_extents) solves every curve, to move it a fraction
    # of a pixel
    points = outline.vertices[outline.codes != mpath.Path.CLOSEPOLY]
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    return outline.transformed(Affine2D().translate(*-centre))
