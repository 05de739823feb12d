"""The benchmark harness runs end to end (on a tiny model, so in seconds) and reports what it measured.

Speed itself is never asserted here (that is what `make bench` is for): these tests check that every row runs,
that the extraction row wrote the file it should have, that the optional contenders either agree with the
extraction or say why they did not run, and that the graph rows read each job's time from the run records.
"""

import json
import os
import subprocess
import sys
import time

from benchmarks.graph import run_seconds
from emo_assets_tests.conftest import REPO_ROOT


def test_harness_writes_the_table_and_json(tmp_path, offline_models):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--limit", "24", "--model", "tiny-gpt2", "--reps", "1",
         "--skip", "graph,rss,sweep,bf16", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = json.loads((out / "latest.json").read_text())
    stamped = [p for p in out.iterdir() if p.name.startswith("bench-")]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    rows = {row["key"]: row for row in latest["rows"]}
    assert list(rows) == ["1", "2", "3", "4a", "4b"]
    for key in ("1", "2", "3"):
        assert rows[key]["status"] == "ok" and len(rows[key]["seconds"]) == 1 and rows[key]["seconds"][0] > 0
    meta = latest["meta"]
    assert meta["dataset"]["n_sentences"] == 24
    # every layer's resid_post + mlp_out of every token, fp32, in MiB (the header and token ids are small)
    model, n_tokens = meta["model"], meta["dataset"]["n_tokens"]
    expected_mib = 2 * model["n_layers"] * n_tokens * model["d_model"] * 4 / 2**20
    assert abs(rows["2"]["extra"]["file_mib"] - expected_mib) <= 0.1
    assert rows["2"]["ratio"] > 0 and rows["3"]["ratio"] > 0
    for key, package in (("4a", "transformer-lens"), ("4b", "nnsight")):
        row = rows[key]
        if row["status"] == "ok":
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

    defs = dg.Definitions(assets=[one], jobs=[dg.define_asset_job("first", [one]), dg.define_asset_job("second", [one])])
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
