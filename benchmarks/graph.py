"""Rows 5a/5b: the extraction stage jobs of the graph through `emo-assets materialize`, vs. their extraction work alone.

`emo-assets materialize --extraction-only` runs in a subprocess with its own fresh results folder and DAGSTER_HOME
(nothing of the user's `results/` is touched; the first run's costs, such as creating the MLflow and Dagster
stores, are included) and the warm model cache. The comparison is what the graph must do anyway: in this
process, each model is loaded once (`load_configured_model`, as the graph does) and every partition (dataset
variant x emotion) is extracted with `extract_to_file`; the sum of those wall times is the denominator
(measured right before the graph). The seconds of each job come from the run records of the graph's
DAGSTER_HOME. 5a is the offline profile (tiny models: the process's fixed costs dominate);
5b is the benchmark's GPT-2-small-size model as a one-model profile (a local model directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, TARGETS, Row, read_texts


def _cli_command() -> list[str] | None:
    script = Path(sys.executable).with_name("emo-assets")
    if script.exists():
        return [str(script)]
    found = shutil.which("emo-assets")
    if found:
        return [found]
    try:
        import emo_assets.cli  # noqa: F401
    except Exception:  # noqa: BLE001
        return None
    return [sys.executable, "-c", "import sys; from emo_assets.cli import main; sys.exit(main())"]


def _graph_env(folder: Path, profile: str, models: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EMO_ASSETS_RESULTS_DIR=str(folder / "results"),
        DAGSTER_HOME=str(folder / "dagster_home"),
        EMO_ASSETS_ROOT=str(REPO_ROOT),
        EMO_ASSETS_PROFILE=profile,
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("EMO_ASSETS_MLFLOW_URI", None)
    if models:
        env["EMO_ASSETS_MODELS"] = models
    else:
        env.pop("EMO_ASSETS_MODELS", None)
    return env


def extraction_sum(
    folder: Path, profile: str, variants: list[str] | None = None, extract: bool = True, models: str | None = None
) -> dict:
    """Load every model of the profile once and extract every partition; wall seconds of each part."""
    from emo_assets.core.config import load_settings
    from emo_assets.core.extraction import ExtractionOptions, extract_to_file
    from emo_assets.core.models import load_configured_model

    env = _graph_env(folder, profile, models)
    settings = load_settings(env)
    options = ExtractionOptions.from_settings(settings.extraction)  # the options the graph's activations asset uses
    loads, extracts, partitions = 0.0, 0.0, 0
    for model_id in settings.models:
        started = time.perf_counter()
        loaded = load_configured_model(model_id, settings)
        loads += time.perf_counter() - started
        for variant, path in settings.datasets.items() if extract else ():
            if variants and variant not in variants:
                continue
            records = read_texts(path)
            for emotion in settings.emotions:
                part = [r for r in records if r["emotion"] == emotion]
                if not part:
                    continue
                target = folder / "sum" / variant / loaded.slug / f"{emotion}.safetensors"
                started = time.perf_counter()
                extract_to_file(loaded, [r["text"] for r in part], [r["id"] for r in part], target, options)
                extracts += time.perf_counter() - started
                partitions += 1
        del loaded
    shutil.rmtree(folder / "sum", ignore_errors=True)
    return {
        "model_loads_s": round(loads, 3),
        "extraction_s": round(extracts, 3),
        "partitions": partitions,
        "sum_s": round(loads + extracts, 3),
    }


def run_seconds(dagster_home: Path) -> dict[str, float]:
    """`{run name: seconds}` of every run recorded on the instance in `dagster_home`, from its run records; a run
    name is its job's, with the partition in brackets for a single-partition run (`load_models[gpt2]`)."""
    import dagster as dg
    from dagster._core.storage.tags import PARTITION_NAME_TAG

    def name(run) -> str:
        partition = run.tags.get(PARTITION_NAME_TAG)
        return f"{run.job_name}[{partition}]" if partition else run.job_name

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {
            name(record.dagster_run): round(record.end_time - record.start_time, 3)
            for record in instance.get_run_records(ascending=True)
            if record.start_time is not None and record.end_time is not None
        }


def graph_row(
    work_dir: Path,
    key: str,
    label: str,
    profile: str = "offline",
    variants: list[str] | None = None,
    models: str | None = None,
    timeout: float = 300,
) -> Row:
    """`emo-assets materialize --extraction-only` on a fresh results folder and DAGSTER_HOME, vs. the same model
    loads and extractions run directly in this process (the analysis has no counterpart there)."""
    extra_args = ["--extraction-only", *(arg for variant in variants or [] for arg in ("--variant", variant))]
    row = Row(
        key,
        f"{label}: emo-assets materialize {' '.join(extra_args)}",
        target=f"graph / (extraction + model loads) <= {TARGETS[key]}",
        ratio_label="graph / (extract+loads)",
    )
    command = _cli_command()
    if command is None:
        row.status = "unavailable: emo_assets.cli (the `emo-assets` command) is not installed yet"
        return row
    folder = work_dir / f"graph-{key}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        extraction_sum(folder, profile, variants, extract=False, models=models)  # builds offline models into the cache
        before = extraction_sum(folder, profile, variants, models=models)
        started = time.perf_counter()
        proc = subprocess.run(
            [*command, "materialize", "--profile", profile, *extra_args],
            env=_graph_env(folder, profile, models),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - started
        runs = run_seconds(folder / "dagster_home") if proc.returncode == 0 else {}
    except subprocess.TimeoutExpired:
        row.status = f"failed: the graph took longer than {timeout:.0f} s"
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row.status = f"failed: exit {proc.returncode}: {' | '.join(tail)}"
        return row
    denominator = before["sum_s"]
    row.seconds = [wall]
    row.samples = before["partitions"]
    row.ratio = wall / denominator
    row.passed = row.ratio <= TARGETS[key]
    row.extra = {
        "graph_wall_s": round(wall, 3),
        "extraction_plus_loads_s": round(denominator, 3),
        "sum": before,
        "samples_unit": "partitions",
        "runs_s": runs,
        # imports, the Dagster instance and definitions: what the process does outside its runs
        "outside_runs_s": round(wall - sum(runs.values()), 3),
    }
    return row
