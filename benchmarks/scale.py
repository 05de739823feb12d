"""Row `scale`: the whole graph at 1k, 10k and 100k synthetic sentences - wall time per step and peak memory.

For each size, `benchmarks.sentences` writes a dataset (one variant, four emotions, seed 0) and
`emo-assets materialize` runs the whole graph (datasets, extraction, per-model analysis, comparisons) on the
offline models `minilm` + `tiny-gpt2` in a fresh results folder and DAGSTER_HOME. The child is started in its
own session (`setsid`), and the resident memory of its whole process group (the run also has an MLflow child)
is summed from `ps -o rss= -g PGID` every 0.5 s; past `--rss-limit-gib` the group is killed, so a blow-up
fails fast instead of pushing the machine into swap. Seconds per step come from the run records of the
graph's DAGSTER_HOME, so the process's start-up (imports, Dagster instance) is left out of the per-sentence
cost ("fixed costs excluded").

100k runs with `EMO_ASSETS_POSITIONS=sentence_end` (one stored row per sentence) instead of storing every
token of 100k sentences.

Targets: every size completes; peak RSS at 100k <= 4 GiB; seconds of the runs per sentence at 10k within 1.5x
of 1k's and at 100k within 1.5x of 10k's.

    python -m benchmarks.scale [--sizes 1000,10000,100000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import DEFAULT_OUT, REPO_ROOT, Row, format_table, loadavg, write_results
from benchmarks.graph import _cli_command, _graph_env, run_seconds
from benchmarks.sentences import write_dataset

MODELS = "minilm,tiny-gpt2"
VARIANT = "synthetic"
SIZES = (1_000, 10_000, 100_000)
SENTENCE_END_FROM = 100_000  # sizes from here store one row per sentence
POSITIONS_VARIABLE = "EMO_ASSETS_POSITIONS"
PEAK_RSS_TARGET_GIB = 4.0  # at 100k
PER_SENTENCE_TARGET = 1.5  # ratio of seconds per sentence between consecutive sizes
STEPS = ("datasets", "activations", "analysis", "comparisons")  # each a stage job of defs.jobs


class GroupMemory(threading.Thread):
    """Peak of the summed RSS (KiB) of a process group, sampled every `interval` s; kills the group past
    `limit_kib`. Also the peak of the summed anonymous RSS (`RssAnon`): the rest is pages of memory-mapped files
    (activation files read through their maps, libraries), which the kernel can drop without writing them."""

    def __init__(self, pgid: int, limit_kib: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pgid, self.limit_kib, self.interval = pgid, limit_kib, interval
        self.peak_kib, self.peak_anon_kib, self.killed = 0, 0, False
        self.done = threading.Event()

    def sample(self) -> tuple[int, int]:
        """(RSS, anonymous RSS) in KiB, summed over the group."""
        out = subprocess.run(["ps", "-o", "pid=,rss=", "-g", str(self.pgid)], capture_output=True, text=True).stdout
        rss = anon = 0
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit():
                rss += int(fields[1])
                anon += _status_kib(fields[0], "RssAnon")
        return rss, anon

    def run(self) -> None:
        while not self.done.wait(self.interval):
            rss, anon = self.sample()
            self.peak_kib, self.peak_anon_kib = max(self.peak_kib, rss), max(self.peak_anon_kib, anon)
            if rss > self.limit_kib and not self.killed:
                self.killed = True
                _kill_group(self.pgid)


def _status_kib(pid: str, field_name: str) -> int:
    """A `field:` of /proc/<pid>/status in KiB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def step_seconds(runs: dict[str, float]) -> dict[str, float]:
    """Seconds per stage (`<variant>_<stage>` job runs summed); `other` for the rest (model loads)."""
    from emo_assets.defs.jobs import activations_job, analysis_job, comparisons_job, datasets_job

    stage_of = {
        job(VARIANT): step
        for step, job in zip(STEPS, (datasets_job, activations_job, analysis_job, comparisons_job), strict=True)
    }
    totals = dict.fromkeys((*STEPS, "other"), 0.0)
    for name, seconds in runs.items():
        totals[stage_of.get(name.partition("[")[0], "other")] += seconds
    return {k: round(v, 3) for k, v in totals.items()}


def prebuild_models(env: dict[str, str]) -> float:
    """Build the tiny model (its tokenizer is trained on the dataset's texts) into the model cache before the
    timed run, as a user's second run finds it: a one-off cost that is not the graph's. Returns its seconds."""
    from emo_assets.core.config import load_settings
    from emo_assets.core.models import hide_load_progress, load_configured_model

    hide_load_progress()
    started = time.perf_counter()
    settings = load_settings(env)
    for model_id in settings.models:
        load_configured_model(model_id, settings)
    return round(time.perf_counter() - started, 3)


def run_size(n: int, work_dir: Path, rss_limit_kib: int, timeout: float) -> dict:
    """One size: dataset, graph in its own session, peak RSS of the group, seconds per step."""
    folder = work_dir / f"scale-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    dataset = write_dataset(folder / "data" / f"{VARIANT}.jsonl", n)
    env = {**_graph_env(folder, "offline", MODELS), "EMO_ASSETS_DATASETS": f"{VARIANT}={dataset}"}
    env["EMO_ASSETS_DEVICE"] = "cpu"
    positions = "all"
    if n >= SENTENCE_END_FROM:
        env[POSITIONS_VARIABLE] = positions = "sentence_end"
    build_s = prebuild_models(env)
    log = folder / "materialize.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [*_cli_command(), "materialize", "--profile", "offline"],
            env=env,
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        memory = GroupMemory(proc.pid, rss_limit_kib)
        memory.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            code = proc.wait()
        finally:
            memory.done.set()
            memory.join()
            _kill_group(proc.pid)  # whatever the child left running in its session
    wall = time.perf_counter() - started
    result = {
        "n_sentences": n,
        "positions": positions,
        "wall_s": round(wall, 3),
        "peak_rss_mib": round(memory.peak_kib / 1024, 1),
        "peak_anon_rss_mib": round(memory.peak_anon_kib / 1024, 1),
        "exit": code,
        "model_build_s": build_s,
    }
    if code != 0:
        reason = (
            f"killed at {memory.peak_kib / 2**20:.1f} GiB (limit {rss_limit_kib / 2**20:.0f} GiB)"
            if memory.killed
            else f"killed after {timeout:.0f} s"
            if wall >= timeout
            else f"exit {code}"
        )
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        result["failed"] = f"{reason}: " + " | ".join(tail)
    else:
        runs = run_seconds(folder / "dagster_home")
        result["steps_s"] = step_seconds(runs)
        result["runs_s"] = round(sum(runs.values()), 3)
        result["outside_runs_s"] = round(wall - result["runs_s"], 3)
        result["runs_s_per_sentence"] = result["runs_s"] / n
        result.update(disk_bytes(folder / "results"))
    shutil.rmtree(folder, ignore_errors=True)
    return result


def disk_bytes(results: Path) -> dict[str, int]:
    """What a run left on disk: the activation files' bytes (`st_size`; files, shards and manifests under each
    `<variant>/activations/`) and every file's allocated bytes (`st_blocks`, the MLflow store and analysis outputs
    included)."""
    activations = allocated = 0
    for path in results.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            allocated += stat.st_blocks * 512
            if path.suffix == ".safetensors" and "activations" in path.relative_to(results).parts[1:2]:
                activations += stat.st_size
    return {"activation_bytes": activations, "results_allocated_bytes": allocated}


def scale_row(work_dir: Path, sizes=SIZES, rss_limit_gib: float = 20.0, timeout: float = 7200) -> Row:
    """The `scale` row: every size in turn (see module doc); the ratio is the largest per-sentence ratio."""
    row = Row(
        "scale",
        f"whole graph, {MODELS}, synthetic sentences at {', '.join(f'{n:,}' for n in sizes)}",
        target=(
            f"all complete; peak RSS at 100k <= {PEAK_RSS_TARGET_GIB:g} GiB; runs s/sentence "
            f"<= {PER_SENTENCE_TARGET}x the next smaller size's"
        ),
        ratio_label="max s/sentence ratio",
    )
    if _cli_command() is None:
        row.status = "unavailable: emo_assets.cli (the `emo-assets` command) is not installed"
        return row
    results, passed = [], True
    for n in sizes:
        print(f"scale: {n:,} sentences", file=sys.stderr, flush=True)
        results.append(run_size(n, work_dir, int(rss_limit_gib * 2**20), timeout))
        print(f"scale: {results[-1]}", file=sys.stderr, flush=True)
        passed &= "failed" not in results[-1]
        if n >= SENTENCE_END_FROM and "failed" not in results[-1]:
            passed &= results[-1]["peak_rss_mib"] <= PEAK_RSS_TARGET_GIB * 1024
    done = [r for r in results if "runs_s_per_sentence" in r]
    ratios, by_step = {}, {}
    for a, b in zip(done, done[1:]):
        pair = f"{b['n_sentences']}/{a['n_sentences']}"
        ratios[pair] = round(b["runs_s_per_sentence"] / a["runs_s_per_sentence"], 3)
        by_step[pair] = {
            step: round(b["steps_s"][step] / b["n_sentences"] / (a["steps_s"][step] / a["n_sentences"]), 3)
            for step in STEPS
            if a["steps_s"][step] > 0
        }
    row.extra = {
        "sizes": results,
        "per_sentence_ratios": ratios,
        "per_sentence_ratios_by_step": by_step,
        "loadavg": loadavg(),
    }
    if not done:
        row.status = "failed: " + "; ".join(r.get("failed", "") for r in results)[:300]
        return row
    row.seconds = [sum(r["wall_s"] for r in results if "wall_s" in r)]
    row.samples = sum(r["n_sentences"] for r in done)
    row.ratio = max(ratios.values()) if ratios else None
    passed = passed and all(v <= PER_SENTENCE_TARGET for v in ratios.values())
    row.passed = passed
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated sentence counts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rss-limit-gib", type=float, default=20.0, help="kill a run past this (default 20)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per size (default 7200)")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"error: --sizes {args.sizes!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    work_dir = args.out / f".work-scale-{os.getpid()}"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        row = scale_row(work_dir, sizes, args.rss_limit_gib, args.timeout)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    table = format_table([row])
    payload = {
        "meta": {"started_utc": started, "logical_cpus": os.cpu_count(), "loadavg_end": loadavg()},
        "rows": [row.as_dict()],
        "table_markdown": table,
    }
    stamped, _ = write_results(args.out, payload)
    print(table)
    print(f"wrote {stamped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
