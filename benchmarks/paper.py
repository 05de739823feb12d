"""Rows 9-11: the paper models (full-size stand-ins from `benchmarks.paper_models`), each process cold.

9. `emo-assets materialize --profile paper` (every variant, extraction + analysis) in a fresh process, results
   folder and DAGSTER_HOME, against the compute floor of its sentences: the bare batched forward (length-sorted
   batches of 32, fp32, no capture) of every variant's sentences through every model, measured in this process
   right before. `extended` holds `baseline`'s sentences, so with reuse of those rows the graph can go below
   that floor.
10. The extract CLI (`python -m emo_assets.extract`) against `benchmarks.tl_script` (TransformerLens
   `run_with_cache`), both cold processes doing the same job per model: load, every layer's resid_post + mlp_out
   of every sentence, save with safetensors. Wall time and peak RSS of each process (wait4), order alternating.
11. Fixed costs of a cold CLI process (`benchmarks.fixed_costs`): imports and model loads, by phase.

`per_emotion` cuts each dataset to its first sentences of each emotion (a smoke run); None keeps them whole.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, TARGETS, Row, median, read_texts
from benchmarks.graph import _cli_command, _graph_env, run_seconds
from benchmarks.paper_models import PAPER_CONFIGS, paper_env, paper_hub_cache

DATASETS = {
    "baseline": REPO_ROOT / "data" / "emotion_dataset.jsonl",
    "extended": REPO_ROOT / "data" / "emotion_dataset_extended.jsonl",
}


def paper_datasets(folder: Path, per_emotion: int | None) -> dict[str, Path]:
    """The committed dataset files, or each cut to its first `per_emotion` sentences per emotion."""
    if per_emotion is None:
        return dict(DATASETS)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for variant, path in DATASETS.items():
        counts: dict[str, int] = {}
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            emotion = json.loads(line)["emotion"] if line.strip() else None
            if emotion is not None and counts.get(emotion, 0) < per_emotion:
                counts[emotion] = counts.get(emotion, 0) + 1
                lines.append(line)
        out[variant] = folder / path.name
        out[variant].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def stand_in_cache(tiny: bool = False) -> Path:
    """The stand-ins' hub cache; the tokenizer is trained on (shuffled) sentences of both dataset files."""
    texts = [r["text"] for path in DATASETS.values() for r in read_texts(path)]
    return paper_hub_cache(texts, tiny=tiny)


def snapshot_dir(hub_cache: Path, hub_id: str) -> Path:
    repo = hub_cache / f"models--{hub_id.replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()


def forward_floor(hub_cache: Path, datasets: dict[str, Path], work_dir: Path, batch_size: int = 32) -> dict:
    """Seconds of the bare batched forward of every variant's sentences through each model (loads not timed)."""
    from benchmarks.contenders import Floor, Workload
    from emo_assets.core.models import load_model

    records = [r for path in datasets.values() for r in read_texts(path)]
    texts, ids = [r["text"] for r in records], [f"{i}" for i in range(len(records))]
    seconds = {}
    for hub_id in PAPER_CONFIGS:
        loaded = load_model(str(snapshot_dir(hub_cache, hub_id)), device="cpu")
        floor = Floor(Workload(loaded, texts, ids, batch_size, work_dir, ""))
        floor.setup()
        seconds[hub_id] = floor.run(0)
        del floor, loaded
    return {
        "per_model_s": {k: round(v, 3) for k, v in seconds.items()},
        "sum_s": round(sum(seconds.values()), 3),
        "sentences_per_model": len(texts),
    }


def analysis_seconds(runs_s: dict[str, float], variants) -> float:
    """Seconds of the analysis runs of `variants` among `run_seconds`' runs (job names, maybe `[partition]`)."""
    from emo_assets.defs.jobs import CROSS_VARIANT, analysis_job, comparisons_job

    jobs = {CROSS_VARIANT, *(job(variant) for variant in variants for job in (analysis_job, comparisons_job))}
    return sum(s for name, s in runs_s.items() if name.partition("[")[0] in jobs)


def paper_profile_rows(
    work_dir: Path, per_emotion: int | None = None, tiny: bool = False, timeout: float = 3600
) -> list[Row]:
    """Row 9 (the whole graph against the floor) and 9a (its analysis runs against the same floor)."""
    row = Row(
        "9",
        "paper profile (stand-ins): emo-assets materialize --profile paper, cold process, all variants",
        target=f"graph / floor <= {TARGETS['9']} (<= {TARGETS['9-reuse']} with baseline rows reused)",
        ratio_label="graph / forward floor",
    )
    command = _cli_command()
    if command is None:
        row.status = "unavailable: emo_assets.cli (the `emo-assets` command) is not installed"
        return [row]
    folder = work_dir / "paper-graph"
    shutil.rmtree(folder, ignore_errors=True)
    hub_cache = stand_in_cache(tiny)
    datasets = paper_datasets(folder / "data", per_emotion)
    try:
        floor = forward_floor(hub_cache, datasets, work_dir)
        env = {
            **_graph_env(folder, "paper"),
            **paper_env(hub_cache),
            "EMO_ASSETS_DEVICE": "cpu",
            "EMO_ASSETS_DATASETS": ",".join(f"{v}={p}" for v, p in datasets.items()),
        }
        wall, peak, proc = _timed_process(
            [*command, "materialize", "--profile", "paper"], env, folder / "logs", timeout
        )
        steps = run_seconds(folder / "dagster_home") if proc.returncode == 0 else {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0:
        failed = f"killed after {timeout:.0f} s" if wall >= timeout else f"exit {proc.returncode}"
        row.status = f"failed: {failed}: " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return [row]
    row.seconds, row.samples = [wall], floor["sentences_per_model"] * len(PAPER_CONFIGS)
    row.ratio = wall / floor["sum_s"]
    row.passed = row.ratio <= TARGETS["9"]
    row.extra = {
        "graph_wall_s": round(wall, 3),
        "graph_peak_rss_mib": round(peak / 1024, 1),
        "floor": floor,
        "runs_s": steps,
        "per_emotion": per_emotion,
        "outside_runs_s": round(wall - sum(steps.values()), 3),
    }
    analysis = Row(
        "9a",
        "paper profile: its analysis runs (per-model analysis, comparisons) against the same forward floor",
        target=f"analysis / floor <= {TARGETS['9a']}",
        ratio_label="analysis / forward floor",
    )
    analysis.seconds, analysis.samples = [analysis_seconds(steps, datasets)], row.samples
    analysis.ratio = analysis.seconds[0] / floor["sum_s"]
    analysis.passed = analysis.ratio <= TARGETS["9a"]
    return [row, analysis]


def _timed_process(
    command: list[str], env: dict, log_dir: Path, timeout: float | None = None
) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds and peak RSS (KiB) of one child process, killed after `timeout` seconds.

    The peak is the child's own high-water mark (`VmHWM` in /proc/<pid>/status, read every 20 ms until it
    exits; it only grows, so the last reading is the peak up to then). Not wait4's `ru_maxrss`: a child
    started by fork or vfork from this process inherits its high-water mark at exec, so every child of a large
    benchmark process would report the parent's size. Where /proc is missing, `ru_maxrss` it is."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout", "w+") as out, open(log_dir / "stderr", "w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        high_water = [0]
        done = threading.Event()
        watcher = threading.Thread(target=_watch_high_water, args=(proc.pid, high_water, done), daemon=True)
        watcher.start()
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
            watcher.join()
            if timer:
                timer.cancel()
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        completed = subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())
    return wall, high_water[0] or usage.ru_maxrss, completed


def _watch_high_water(pid: int, high_water: list[int], done: threading.Event) -> None:
    """Keep `high_water[0]` at the last VmHWM (KiB) read for `pid` until `done` is set or /proc lacks it."""
    status = Path(f"/proc/{pid}/status")
    while not done.is_set():
        try:
            line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        except (OSError, StopIteration):  # no /proc, or the process has exited (a zombie has no VmHWM)
            return
        high_water[0] = int(line.split()[1])
        done.wait(0.02)


def cli_vs_tl_row(
    work_dir: Path, dataset: Path, hub_ids=tuple(PAPER_CONFIGS), reps: int = 1, tiny: bool = False
) -> Row:
    row = Row(
        "10",
        "extract CLI vs a TransformerLens run_with_cache script, cold processes, paper stand-ins",
        target=f"CLI >= {TARGETS['10']}x faster",
        ratio_label="x faster than the TL script (wall)",
    )
    try:
        import transformer_lens  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        row.status = f"unavailable: transformer-lens not installed ({type(exc).__name__}); pip install '.[bench]'"
        return row
    hub_cache = stand_in_cache(tiny)
    env = {**os.environ, **paper_env(hub_cache), "PYTHONPATH": str(REPO_ROOT)}
    commands = {
        "cli": lambda m, out: [
            sys.executable,
            "-m",
            "emo_assets.extract",
            "--model",
            m,
            "--dataset",
            str(dataset),
            "--output",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
        ],
        "tl": lambda m, out: [
            sys.executable,
            "-m",
            "benchmarks.tl_script",
            "--model",
            m,
            "--dataset",
            str(dataset),
            "--output",
            str(out),
        ],
    }
    walls: dict[str, list[float]] = {"cli": [], "tl": []}
    peaks: dict[str, list[int]] = {"cli": [], "tl": []}
    for rep in range(reps):
        order = ["cli", "tl"] if rep % 2 == 0 else ["tl", "cli"]
        totals = dict.fromkeys(order, 0.0)
        for hub_id in hub_ids:
            for key in order:
                out = work_dir / f"cli-vs-tl-{key}"
                shutil.rmtree(out, ignore_errors=True)
                wall, peak, proc = _timed_process(commands[key](hub_id, out), env, work_dir / "logs")
                shutil.rmtree(out, ignore_errors=True)
                if proc.returncode != 0:
                    row.status = f"failed: {key} on {hub_id}: exit {proc.returncode}: " + " | ".join(
                        (proc.stderr or proc.stdout).strip().splitlines()[-2:]
                    )
                    return row
                totals[key] += wall
                peaks[key].append(peak)
                print(
                    f"  rep {rep + 1}/{reps}  {key:<4} {hub_id:<26} {wall:7.2f} s  peak {peak / 1024:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        for key in order:
            walls[key].append(totals[key])
    row.seconds, row.samples = walls["cli"], len(read_texts(dataset)) * len(hub_ids)
    row.ratio = median([t / c for t, c in zip(walls["tl"], walls["cli"])])
    row.passed = row.ratio >= TARGETS["10"]
    row.extra = {
        "tl_seconds": [round(s, 3) for s in walls["tl"]],
        "models": list(hub_ids),
        "dataset": str(dataset),
        "peak_rss_mib": {key: round(max(v) / 1024, 1) for key, v in peaks.items()},
        "peak_rss_cli_over_tl": round(max(peaks["cli"]) / max(peaks["tl"]), 3),
    }
    return row


def fixed_cost_row(work_dir: Path, hub_ids=tuple(PAPER_CONFIGS), tiny: bool = False) -> Row:
    """Row 11: `benchmarks.fixed_costs` in a cold process: what a CLI process pays before its first forward."""
    row = Row("11", "fixed costs of a cold extraction process (imports + paper model loads)", target="info")
    hub_cache = stand_in_cache(tiny)
    env = {**os.environ, **paper_env(hub_cache), "PYTHONPATH": str(REPO_ROOT)}
    _, _, proc = _timed_process(
        [sys.executable, "-X", "importtime", "-m", "benchmarks.fixed_costs", *hub_ids], env, work_dir / "logs"
    )
    if proc.returncode != 0:
        row.status = f"failed: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        return row
    from benchmarks.fixed_costs import heavy_imports

    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    row.seconds, row.samples = [phases["total"]["wall_s"]], 0
    row.extra = {"phases": phases, "imports_inside_transformers_s": heavy_imports(proc.stderr)}
    return row
