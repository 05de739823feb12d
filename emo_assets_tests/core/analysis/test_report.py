import polars as pl

from emo_assets.core.analysis.report import markdown_table, render_report


def _probe_table():
    rows = []
    for layer, acc in enumerate([0.5, 0.9, 0.8]):
        rows.append(
            {
                "model": "gpt2",
                "kind": "residual",
                "layer": layer,
                "accuracy_mean": acc,
                "accuracy_std": 0.01,
                "control_mean": 0.26,
                "selectivity": acc - 0.26,
                "bow_mean": 0.85,
                "accuracy_minus_bow": acc - 0.85,
            }
        )
    return pl.DataFrame(rows)


def test_report_contains_tables_and_links(tmp_path):
    sep = [
        {
            "model": "gpt2",
            "kind": "residual",
            "layer": i,
            "separation": s,
            "mean_offdiag_cosine_centred": -0.33,
            "mean_offdiag_cosine_raw": float("nan"),
        }
        for i, s in enumerate([0.1, 0.4, 0.3])
    ]
    text = render_report(
        title="Phase 3: Emotion vectors",
        dataset={"variant": "baseline", "sentences": 280},
        models=["gpt2", "EleutherAI/pythia-160m"],
        probe_table=_probe_table(),
        separation_table=sep,
        stability_table=[{"seed": 0, "best_layer": 1}, {"seed": 1, "best_layer": 1}],
        images={"Probe accuracy": "figures/probe.png", "Cosine": tmp_path / "figures" / "cos.png"},
        base_dir=tmp_path,
    )
    assert text.startswith("# Phase 3: Emotion vectors\n")
    assert "- **variant**: baseline" in text and "- EleutherAI/pythia-160m" in text
    assert "## Probe accuracy per layer" in text
    assert (
        "| model | kind | layer | accuracy | ± std | control (shuffled) | selectivity | bag-of-words | accuracy − bow |"
        in text
    )
    assert "| gpt2 | residual | 1 | 0.900 | 0.010 | 0.260 | 0.640 | 0.850 | 0.050 |" in text
    assert "| model | kind | layer | separation (between/within) | mean cosine (centred) | mean cosine (raw) |" in text
    assert "| gpt2 | residual | 0 | 0.100 | -0.330 | n/a |" in text
    # best layers derived from the probe table
    assert "## Best layers" in text and "| gpt2 | residual | 1 | 0.900 | 0.640 | 0.050 |" in text
    assert "## Stability" in text and "| seed | best_layer |" in text
    assert "![Probe accuracy](figures/probe.png)" in text
    assert "![Cosine](figures/cos.png)" in text  # absolute path made relative to base_dir


def test_markdown_table_edge_cases():
    assert markdown_table([]) == "_(no rows)_"
    t = markdown_table([{"a": "x|y", "b": None, "c": True}], ["a", "b", "c", "missing"])
    assert t.splitlines() == ["| a | b | c |", "|---|---|---|", "| x\\|y | n/a | yes |"]
