"""The benchmark harness runs end to end (on a tiny model, so in seconds) and reports what it measured.

Speed itself is never asserted here (that is what `make bench` is for): these tests check that every row runs,
that the extraction row wrote the file it should have, that the optional contenders either agree with the
extraction or say why they did not run, and that the graph rows read each job's time from the run records.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks.graph import run_seconds
from benchmarks.paper import DATASETS, paper_datasets
from emo_assets_tests.conftest import REPO_ROOT, read_records


def test_harness_writes_the_table_and_json(tmp_path, offline_models):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--limit",
            "24",
            "--model",
            "tiny-gpt2",
            "--reps",
            "1",
            "--skip",
            "graph,rss,sweep,bf16,paper,cli-tl,fixed,storage,resume,scale",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = json.loads((out / "latest.json").read_text())
    stamped = [p for p in out.iterdir() if p.name.startswith("bench-")]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    rows = {row["key"]: row for row in latest["rows"]}
    assert list(rows) == ["1", "2", "2b", "2c", "3", "4a", "4b"]
    for key in ("1", "2", "3"):
        assert rows[key]["status"] == "ok" and len(rows[key]["seconds"]) == 1 and rows[key]["seconds"][0] > 0
    meta = latest["meta"]
    assert meta["dataset"]["n_sentences"] == 24
    # every layer's resid_post + mlp_out of every token, fp32, in MiB (the header and token ids are small)
    model, n_tokens = meta["model"], meta["dataset"]["n_tokens"]
    expected_mib = 2 * model["n_layers"] * n_tokens * model["d_model"] * 4 / 2**20
    assert abs(rows["2"]["extra"]["file_mib"] - expected_mib) <= 0.1
    # rows 2b and 2c write exactly the activation bytes of row 2's file (O_DIRECT may be refused, e.g. by tmpfs)
    activation_bytes = 2 * model["n_layers"] * n_tokens * model["d_model"] * 4
    assert rows["2b"]["status"] == "ok" and rows["2b"]["extra"]["bytes_written"] == activation_bytes
    if rows["2c"]["status"] == "ok":
        assert rows["2c"]["extra"]["bytes_written"] == activation_bytes
    else:
        assert rows["2c"]["status"].startswith("unavailable: O_DIRECT writes in"), rows["2c"]["status"]
    assert rows["2"]["ratio"] > 0 and rows["3"]["ratio"] > 0
    for key, package, module in (("4a", "transformer-lens", "transformer_lens"), ("4b", "nnsight", "nnsight")):
        row = rows[key]
        if importlib.util.find_spec(module) is not None:  # installed (`make setup-bench`, as CI does): it must run
            assert row["status"] == "ok", row["status"]
            assert row["extra"]["max_abs_diff_vs_extraction"] <= 1e-4  # the same activations, other tool
        else:
            assert row["status"].startswith(f"unavailable: {package} not installed"), row["status"]
    table = latest["table_markdown"]
    assert table in proc.stdout and "emo_assets extract_to_file" in table


def test_graph_rows_read_each_run_time_from_the_run_records(tmp_path):
    """`run_seconds` gives each job's wall time as the instance's run storage recorded it (read here from
    the sqlite database itself)."""
    import sqlite3

    import dagster as dg

    @dg.asset
    def one() -> None:
        time.sleep(0.2)

    defs = dg.Definitions(
        assets=[one], jobs=[dg.define_asset_job("first", [one]), dg.define_asset_job("second", [one])]
    )
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        for name in ("first", "second"):
            assert defs.resolve_job_def(name).execute_in_process(instance=instance).success
    seconds = run_seconds(tmp_path)
    database = next(tmp_path.rglob("runs.db"))
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT pipeline_name, start_time, end_time FROM runs ORDER BY id").fetchall()
    assert list(seconds) == ["first", "second"] == [name for name, _, _ in rows]
    for name, start, end in rows:
        assert seconds[name] == round(end - start, 3) and seconds[name] >= 0.2


@pytest.mark.slow
def test_paper_rows_on_tiny_stand_ins(tmp_path):
    """Rows 9-11 end to end on 2-layer stand-ins of the paper architectures, loaded by their hub ids."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--limit",
            "8",
            "--model",
            "tiny-gpt2",
            "--reps",
            "1",
            "--skip",
            "bounds,seed,tl,nnsight,graph,rss,sweep,bf16,storage,resume,scale",
            "--paper-tiny",
            "--paper-per-emotion",
            "6",
            "--paper-models",
            "gpt2",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["key"]: row for row in json.loads((out / "latest.json").read_text())["rows"]}
    assert list(rows) == ["1", "2", "9", "9a", "10", "11"]
    cut = paper_datasets(tmp_path / "cut", 6)
    n_cut = {variant: len(read_records(path)) for variant, path in cut.items()}
    assert n_cut == {variant: 6 * len({r["emotion"] for r in read_records(path)}) for variant, path in DATASETS.items()}

    paper = rows["9"]
    assert paper["status"] == "ok", paper["status"]
    floor = paper["extra"]["floor"]
    assert set(floor["per_model_s"]) == {"gpt2", "EleutherAI/pythia-160m", "EleutherAI/gpt-neo-125M"}
    assert floor["sentences_per_model"] == sum(n_cut.values())
    assert paper["samples"] == 3 * floor["sentences_per_model"]
    assert abs(paper["ratio"] - paper["seconds"][0] / floor["sum_s"]) <= 1e-3 * paper["ratio"]
    runs_s = paper["extra"]["runs_s"]
    assert {"load_models[gpt2]", "load_models[EleutherAI-pythia-160m]", "baseline_activations"} <= set(runs_s)
    analysis = rows["9a"]
    analysis_runs = [runs_s[name] for name in ("baseline_analysis", "extended_analysis", "baseline_comparisons")]
    assert analysis["seconds"][0] >= sum(analysis_runs) and analysis["seconds"][0] < paper["seconds"][0]
    assert abs(analysis["ratio"] - analysis["seconds"][0] / floor["sum_s"]) <= 1e-3 * analysis["ratio"]

    cli_tl = rows["10"]
    if cli_tl["status"] == "ok":
        assert cli_tl["samples"] == n_cut["extended"] and len(cli_tl["extra"]["tl_seconds"]) == 1
        assert cli_tl["extra"]["peak_rss_mib"]["cli"] > 0 and cli_tl["extra"]["peak_rss_mib"]["tl"] > 0
        assert abs(cli_tl["ratio"] - cli_tl["extra"]["tl_seconds"][0] / cli_tl["seconds"][0]) <= 1e-3 * cli_tl["ratio"]
    else:
        assert cli_tl["status"].startswith("unavailable: transformer-lens not installed"), cli_tl["status"]

    fixed = rows["11"]
    assert fixed["status"] == "ok", fixed["status"]
    phases = fixed["extra"]["phases"]
    assert {"import torch", "import transformers model code", "load gpt2", "total"} <= set(phases)
    parts = sum(p["wall_s"] for name, p in phases.items() if name != "total")
    assert abs(parts - phases["total"]["wall_s"]) <= 0.01 + 1e-3 * parts
    assert fixed["extra"]["imports_inside_transformers_s"]["torch"] > 0


def test_storage_rows_measure_bytes_per_token_and_the_estimate(tmp_path, offline_models):
    """Rows 12-13 on tiny-gpt2: the written bytes per token (`os.stat`) of the default selection are the layout's
    (every layer's two kinds, fp32, plus the 8-byte token id); every estimate equals the written size."""
    from benchmarks.storage import selection_rows

    loaded = offline_models["tiny-gpt2"]
    texts = [r["text"] for r in read_records(DATASETS["baseline"])][:40]
    ids = [f"s{i}" for i in range(len(texts))]
    bytes_row, estimate_row = selection_rows(loaded, texts, ids, tmp_path, "float32")
    per_token = bytes_row.extra["gpt2_size_written_bytes_per_token"]
    payload = 2 * loaded.n_layers * loaded.d_model * 4 + 8
    assert payload <= per_token["positions=all layers=all"] <= payload * 1.05  # + the header and offsets
    assert per_token["positions=sentence_end layers=all"] < per_token["positions=all layers=all"] / 5
    assert estimate_row.passed and estimate_row.ratio == 1.0
    for sizes in estimate_row.extra["bytes"].values():
        assert sizes["estimated"] == sizes["written"] > 0
    one_b = bytes_row.extra["1b_size_computed_bytes_per_token"]["positions=all layers=all"]
    assert 2 * 16 * 2048 * 4 < one_b < 2 * 16 * 2048 * 4 * 1.01
