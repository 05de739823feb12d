import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from emo_assets.core.analysis import plots
from emo_assets.core.analysis.plots import plot_cka_heatmaps, plot_cosine_heatmap, plot_layer_profile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMOTIONS = ["gratitude", "anger", "apology", "neutral"]


def _probe_rows():
    rows = []
    for kind in ("residual", "mlp"):
        for layer in range(13):
            acc = 0.4 + 0.04 * layer
            rows.append(
                {
                    "kind": kind,
                    "layer": layer,
                    "accuracy_mean": acc,
                    "accuracy_std": 0.02,
                    "control_mean": 0.25,
                    "selectivity": acc - 0.25,
                    "bow_mean": 0.8,
                    "chance": 0.25,
                }
            )
    return rows


def _check_png(path, min_px=100):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > min_px and image.shape[1] > min_px
    return image.shape


def _no_temp_files(folder, expected):
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)


def test_three_plots_are_valid_pngs_written_atomically(tmp_path):
    sep = [{"kind": "residual", "layer": i, "separation": 0.1 * i} for i in range(13)]
    p1 = plot_layer_profile(tmp_path / "profile.png", _probe_rows(), sep, title="gpt2 / baseline")
    cos = np.array([[1, -0.3, -0.4, -0.3], [-0.3, 1, -0.2, -0.5], [-0.4, -0.2, 1, -0.4], [-0.3, -0.5, -0.4, 1.0]])
    cos[0, 3] = np.nan  # NaN cells are drawn as "n/a"
    p2 = plot_cosine_heatmap(tmp_path / "cosine.png", cos, EMOTIONS, title="layer 6")
    rng = np.random.default_rng(0)
    p3 = plot_cka_heatmaps(
        tmp_path / "cka.png",
        {("gpt2", "pythia"): rng.uniform(size=(13, 13)), ("gpt2", "neo"): rng.uniform(size=(13, 13))},
    )
    assert [p.name for p in (p1, p2, p3)] == ["profile.png", "cosine.png", "cka.png"]
    h, w, _ = _check_png(p1)
    assert w > h  # two panels side by side
    _check_png(p2)
    _check_png(p3)
    _no_temp_files(tmp_path, ["profile.png", "cosine.png", "cka.png"])


def test_plots_are_deterministic_and_accept_mapping_separation(tmp_path):
    a = plot_layer_profile(tmp_path / "a.png", _probe_rows(), {"residual": [0.1, 0.5, 0.3]})
    b = plot_layer_profile(tmp_path / "b.png", _probe_rows(), {"residual": [0.1, 0.5, 0.3]})
    assert a.read_bytes() == b.read_bytes()
    assert b"matplotlib" not in a.read_bytes()  # no Software metadata


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    final = tmp_path / "cosine.png"
    final.write_bytes(b"old")

    def broken(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plot_cosine_heatmap(final, np.eye(4), EMOTIONS)
    assert final.read_bytes() == b"old"
    _no_temp_files(tmp_path, ["cosine.png"])


def test_shape_errors():
    with pytest.raises(ValueError):
        plot_cosine_heatmap("unused.png", np.eye(3), EMOTIONS)
    with pytest.raises(ValueError):
        plot_cka_heatmaps("unused.png", {})
    assert plots.DPI == 100
