"""`make clean-results` empties results/ but keeps the committed results/README.md."""

import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_clean_results_keeps_the_readme(tmp_path):
    shutil.copyfile(PROJECT / "Makefile", tmp_path / "Makefile")
    readme = tmp_path / "results" / "README.md"
    readme.parent.mkdir()
    shutil.copyfile(PROJECT / "results" / "README.md", readme)
    for output in ("mlflow.db", "baseline/activations/gpt2/activations_anger.safetensors", "bench/latest.json"):
        (tmp_path / "results" / output).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / output).write_bytes(b"x")
    (tmp_path / ".dagster_home" / "history").mkdir(parents=True)
    (tmp_path / ".dagster_home" / "dagster.yaml").write_text("telemetry: {enabled: false}\n")

    subprocess.run(["make", "-s", "clean-results"], cwd=tmp_path, check=True, timeout=60)

    assert [p.name for p in (tmp_path / "results").iterdir()] == ["README.md"]
    assert readme.read_bytes() == (PROJECT / "results" / "README.md").read_bytes()
    assert [p.name for p in (tmp_path / ".dagster_home").iterdir()] == ["dagster.yaml"]
