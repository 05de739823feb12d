"""Row 5: the whole offline-profile graph through the one-command main job, vs. its extraction work alone.

`emo-assets materialize --profile offline` runs in a subprocess with its own results folder and DAGSTER_HOME
(nothing of the user's `results/` is touched) and the warm model cache. The comparison is what the graph must
do anyway: in this process, each offline model is loaded once (`load_configured_model`, as the graph does) and
every partition (dataset variant x emotion) is extracted with `extract_to_file`; the sum of those wall times is
the denominator (measured right before the graph). The models are loaded once before anything is timed, which
builds the tiny models into the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, Row, read_texts


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


def _graph_env(folder: Path, profile: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EMO_ASSETS_RESULTS_DIR=str(folder / "results"), DAGSTER_HOME=str(folder / "dagster_home"),
               EMO_ASSETS_ROOT=str(REPO_ROOT), EMO_ASSETS_PROFILE=profile)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("EMO_ASSETS_MLFLOW_URI", None)
    return env


def extraction_sum(folder: Path, profile: str, variants: list[str] | None = None, extract: bool = True) -> dict:
    """Load every model of the profile once and extract every partition; wall seconds of each part."""
    from emo_assets.core.config import load_settings
    from emo_assets.core.extraction import ExtractionOptions, extract_to_file
    from emo_assets.core.registry import load_configured_model

    env = _graph_env(folder, profile)
    settings = load_settings(env)
    ext = settings.extraction  # the options the graph's activations asset uses
    options = ExtractionOptions(batch_size=ext.batch_size, prepend_bos=ext.prepend_bos, attention=ext.attention,
                                storage_dtype=ext.storage_dtype)
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
    return {"model_loads_s": round(loads, 3), "extraction_s": round(extracts, 3), "partitions": partitions,
            "sum_s": round(loads + extracts, 3)}


def graph_row(work_dir: Path, profile: str = "offline", variants: list[str] | None = None, timeout: float = 420) -> Row:
    extra_args = [arg for variant in variants or [] for arg in ("--variant", variant)]
    row = Row("5", f"whole {profile} graph: emo-assets materialize --profile {profile} {' '.join(extra_args)}".strip(),
              target="graph / (extraction + model loads) <= 1.5", ratio_label="graph / (extract+loads)")
    command = _cli_command()
    if command is None:
        row.status = "unavailable: emo_assets.cli (the `emo-assets` command) is not installed yet"
        return row
    folder = work_dir / "graph"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        extraction_sum(folder, profile, variants, extract=False)  # warm-up: builds the tiny models into the cache
        before = extraction_sum(folder, profile, variants)
        started = time.perf_counter()
        proc = subprocess.run([*command, "materialize", "--profile", profile, *extra_args], env=_graph_env(folder, profile),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - started
    except subprocess.TimeoutExpired:
        row.status = f"failed: the graph took longer than {timeout:.0f} s"
        return row
    finally:
        shutil.rmtree(folder / "results", ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        row.status = f"failed: exit {proc.returncode}: {' | '.join(tail)}"
        return row
    denominator = before["sum_s"]
    row.seconds = [wall]
    row.samples = before["partitions"]
    row.ratio = wall / denominator
    row.passed = row.ratio <= 1.5
    row.extra = {"graph_wall_s": round(wall, 3), "extraction_plus_loads_s": round(denominator, 3),
                 "sum": before, "samples_unit": "partitions",
                 "graph_log_tail": proc.stdout.strip().splitlines()[-1:]}
    shutil.rmtree(folder, ignore_errors=True)
    return row
