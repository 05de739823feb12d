"""`python -m benchmarks [--model M] [--quick] [--device cpu|cuda]`: extraction speed, overheads and memory.

All timed rows run in this one process on the same length-sorted, right-padded batches of the same model, and
are interleaved round-robin (the order rotates every repetition); each ratio is taken per repetition against
that repetition's extraction and the median is reported, because the machine is noisy. Rows:

1. floor: bare batched forward of the base model (tokenize + pad + forward, no capture);
2. `extract_to_file` of every layer's resid_post + mlp_out incl. writing, checksum and fsync;
   2b/2c what those bytes cost by themselves: the capture plus the same bytes written in arrival order and fsynced,
   no layout or checksum, through the page cache (2b) and with O_DIRECT (2c) (`benchmarks.write_bounds`);
3. the seed's one-sentence-at-a-time loop with `output_hidden_states`;
4. TransformerLens `run_with_cache` and nnsight trace/save (optional `bench` extra; else the row says why);
5. The extraction jobs of the graph (`emo-assets materialize --extraction-only`, fresh stores) vs its extraction + model loads:
   5a the offline profile, 5b the benchmark model as a one-model profile (baseline variant);
6. peak RSS of an extraction of the dataset at 1x and 8x, each in a fresh process;
7. bf16 compute vs fp32: speed and the largest relative error of the stored activations;
8. batch-size sweep (16/32/64 by default): floor and extraction, interleaved;
9-11. the paper models' full-size stand-ins, cold processes (`benchmarks.paper`): the paper profile against its
   forward floor, the extract CLI against a TransformerLens script, and a cold process's fixed costs;
12-14. storage (`benchmarks.storage`): bytes per token by capture selection, the disk estimate vs the bytes
   written, and a killed-and-resumed sharded extraction vs an uninterrupted one;
scale. the whole offline graph (minilm + tiny-gpt2) at 1k, 10k and 100k synthetic sentences: seconds per step,
   peak RSS of the process tree (`benchmarks.scale`; also `python -m benchmarks.scale`).

Prints a table and writes `results/bench/bench-<UTC time>.json` and `results/bench/latest.json` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    DEFAULT_DATASET,
    DEFAULT_OUT,
    REPO_ROOT,
    TARGETS,
    Row,
    cpu_flags,
    cpu_name,
    format_table,
    loadavg,
    median,
    read_texts,
    repeat_records,
    write_results,
)
from emo_assets.core.dtypes import DTYPES

SKIPPABLE = (
    "bounds",
    "seed",
    "tl",
    "nnsight",
    "bf16",
    "sweep",
    "rss",
    "graph",
    "paper",
    "cli-tl",
    "fixed",
    "storage",
    "resume",
    "scale",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        help="hub id, local model dir or offline model name (default: a GPT-2-small-size "
        "model with seeded random weights, built once into the model cache)",
    )
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="JSONL dataset (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the first 96 sentences, 1-rep sweep, baseline variant only for the graph",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="batch size of rows 1-4 and 6 (default: %(default)s)"
    )
    parser.add_argument(
        "--storage-dtype",
        default="float32",
        choices=DTYPES,
        help="dtype stored by the extraction rows (default: %(default)s)",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of each timed row (median; default: %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="use the dataset this many times over (default: 1)")
    parser.add_argument("--limit", type=int, help="only the first N sentences of the dataset")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--sweep", default="16,32,64", help="batch sizes of row 8 (default: %(default)s)")
    parser.add_argument("--sweep-reps", type=int, help="repetitions of the sweep (default: 1)")
    parser.add_argument(
        "--seed-fraction",
        type=float,
        default=0.15,
        help="time the one-at-a-time loop on this share of the sentences (every k-th) and scale its "
        "time to the whole workload; its cost is per sentence (default: %(default)s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds; the batch-size sweep is skipped when the run is behind this budget (default: %(default)s)",
    )
    parser.add_argument(
        "--paper-per-emotion",
        type=int,
        help="rows 9-10: only the first N sentences per emotion of each dataset (default: all)",
    )
    parser.add_argument(
        "--paper-models",
        default="gpt2,EleutherAI/pythia-160m,EleutherAI/gpt-neo-125M",
        help="rows 10-11: stand-ins to run (default: %(default)s)",
    )
    parser.add_argument(
        "--paper-tiny",
        action="store_true",
        help="rows 9-11 on 2-layer stand-ins of the same architectures (checks the harness, not speed)",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated rows to skip: {', '.join(SKIPPABLE)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder (default: %(default)s)")
    return parser


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "numpy", "xxhash", "transformer-lens", "nnsight", "dagster"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def round_robin(contenders: dict, reps: int) -> dict[str, list[float]]:
    """Run every contender once per repetition, rotating the order, so slow drifts of the machine hit all alike."""
    times = {key: [] for key in contenders}
    keys = list(contenders)
    for rep in range(reps):
        shift = rep % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds = contenders[key].run(rep)
            times[key].append(seconds)
            _echo(f"  rep {rep + 1}/{reps}  {key:<10} {seconds:7.2f} s")
    return times


def paired(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repetition ratios."""
    return median([a / b for a, b in zip(numerator, denominator)])


def rss_rows(args, model_ref: str, work_dir: Path, limit: int | None) -> Row:
    row = Row(
        "6",
        "peak RSS of extraction, 8x vs 1x the dataset (fresh processes)",
        target="8x / 1x <= 1.15",
        ratio_label="peak 8x / 1x",
    )
    results = {}
    for repeat in (1, 8):
        command = [
            sys.executable,
            "-m",
            "benchmarks.rss",
            "--model",
            model_ref,
            "--dataset",
            str(args.dataset),
            "--repeat",
            str(repeat * args.repeat),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--out-dir",
            str(work_dir),
        ]
        if limit:
            command += ["--limit", str(limit)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        _echo(f"  rss {repeat}x ...")
        proc = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        )
        if proc.returncode != 0:
            row.status = f"failed: {repeat}x: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
            return row
        results[repeat] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = results[1], results[8]
    row.seconds = [eight["seconds"]]
    row.samples = eight["n_sentences"]
    row.ratio = eight["peak_rss_kib"] / one["peak_rss_kib"]
    row.passed = row.ratio <= TARGETS["6"]
    growth = {k: (r["peak_rss_kib"] - r["baseline_rss_kib"]) / 1024 for k, r in results.items()}
    row.extra = {
        "1x": one,
        "8x": eight,
        "peak_mib": {"1x": round(one["peak_rss_kib"] / 1024, 1), "8x": round(eight["peak_rss_kib"] / 1024, 1)},
        "baseline_mib (after import + model load)": {
            "1x": round(one["baseline_rss_kib"] / 1024, 1),
            "8x": round(eight["baseline_rss_kib"] / 1024, 1),
        },
        "extraction_increment_mib": {k: round(v, 1) for k, v in growth.items()},
        "increment_ratio_8x_1x": round(growth[8] / growth[1], 3) if growth[1] > 0 else None,
        "file_mib": {"1x": one["file_mib"], "8x": eight["file_mib"]},
    }
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(SKIPPABLE)
    if unknown:
        _echo(f"error: unknown --skip {sorted(unknown)}; choose from {SKIPPABLE}")
        return 2
    started = time.perf_counter()
    # a SIGTERM unwinds like Ctrl-C: subprocesses are killed and the work folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    from emo_assets.core.models import hide_load_progress

    hide_load_progress()

    from benchmarks.contenders import (
        Extraction,
        Floor,
        Nnsight,
        SeedLoop,
        TransformerLens,
        Workload,
    )
    from benchmarks.model import bench_model_dir
    from benchmarks.write_bounds import WriteBound
    from emo_assets.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    limit = args.limit or (96 if args.quick else None)
    all_records = read_texts(args.dataset)
    records = repeat_records(all_records[:limit] if limit else all_records, args.repeat)
    texts, ids = [r["text"] for r in records], [r["id"] for r in records]
    if args.model:
        model_ref, model_label, tl_name = args.model, args.model, args.model
    else:
        model_ref = str(bench_model_dir([r["text"] for r in all_records]))
        model_label, tl_name = (
            "GPT-2-small-size, random weights (GPT2Config(), seed 0), BPE tokenizer trained on the dataset",
            "gpt2",
        )
    _echo(f"model {model_label}: loading from {model_ref} ({args.device})")
    loaded = load_model(model_ref, device=args.device, training_texts=lambda: texts)
    out_dir = args.out
    work_dir = out_dir / f".work-{os.getpid()}"
    work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    meta = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "platform": platform.platform(),
        },
        "versions": _versions(),
        "model": {
            "label": model_label,
            "ref": model_ref,
            "architecture": loaded.architecture,
            "n_layers": loaded.n_layers,
            "d_model": loaded.d_model,
            "n_params": loaded.n_params,
        },
        "dataset": {"path": str(args.dataset), "n_sentences": len(texts), "repeat": args.repeat, "limit": limit},
        "batch_size": args.batch_size,
        "storage_dtype": args.storage_dtype,
        "reps": args.reps,
        "quick": args.quick,
        "loadavg_start": loadavg(),
    }
    try:
        work = Workload(loaded, texts, ids, args.batch_size, work_dir, tl_name)
        meta["dataset"]["n_tokens"] = work.n_tokens
        meta["dataset"]["n_batches"] = len(work.batches)
        contenders = {"floor": Floor(work), "extract": Extraction(work, storage_dtype=args.storage_dtype)}
        bounds = "bounds" not in skip and args.device == "cpu"  # they write the host capture's tensors
        if bounds:
            contenders["bound-buffered"] = WriteBound(work, direct=False, storage_dtype=args.storage_dtype)
            contenders["bound-direct"] = WriteBound(work, direct=True, storage_dtype=args.storage_dtype)
        if "seed" not in skip:
            contenders["seed"] = SeedLoop(work, args.seed_fraction)
        if "tl" not in skip:
            contenders["tl"] = TransformerLens(work)
        if "nnsight" not in skip:
            contenders["nnsight"] = Nnsight(work)
        unavailable = {}
        for key, contender in list(contenders.items()):
            _echo(f"setup {key}")
            status = contender.setup()
            if status:
                _echo(f"  {status}")
                unavailable[key] = status
                del contenders[key]
        _echo(f"timing {', '.join(contenders)} x {args.reps} (round robin)")
        times = round_robin(contenders, args.reps)
        ext = times["extract"]
        n = len(texts)

        floor = Row("1", "floor: bare batched forward (no capture)", times["floor"], n)
        extraction = Row(
            "2",
            f"emo_assets extract_to_file, {_short(args.storage_dtype)} storage (incl. write + fsync)",
            ext,
            n,
            ratio=paired(times["floor"], ext),
            ratio_label="floor / extract",
            target=f"extract / floor speed >= {TARGETS['2']}",
        )
        extraction.passed = extraction.ratio >= TARGETS["2"]
        phases = contenders["extract"].timings
        extraction.extra = {
            **contenders["extract"].extra,
            "phases_median_s": {k: round(median([t[k] for t in phases]), 4) for k in phases[0]},
        }
        rows += [floor, extraction]
        for key, number, title in (
            ("bound-buffered", "2b", "capture + row 2's bytes in arrival order + fsync, page cache, no overlap"),
            ("bound-direct", "2c", "capture + row 2's bytes in arrival order + fsync, O_DIRECT, overlapped"),
        ):
            if not bounds:
                continue
            row = Row(
                number, title, target="info: the bytes alone (no layout, no checksum)", ratio_label="floor / this"
            )
            if key in unavailable:
                row.status = unavailable[key]
            else:
                row.seconds, row.samples = times[key], n
                row.ratio = paired(times["floor"], times[key])
                row.extra = contenders[key].extra
            rows.append(row)
        for key, number, title, target in (
            ("seed", "3", "seed-style loop: one sentence at a time", "extract >= 3.4x faster"),
            ("tl", "4a", "TransformerLens run_with_cache (names filter)", "extract >= 1.6x faster"),
            ("nnsight", "4b", "nnsight trace + save", "extract >= 1.15x faster"),
        ):
            if key in skip:
                continue
            row = Row(number, title, target=target, ratio_label="x slower than extract")
            if key in unavailable:
                row.status = unavailable[key]
            else:
                row.seconds, row.samples = times[key], n
                row.ratio = paired(times[key], ext)
                row.passed = row.ratio >= TARGETS[number]
                contender = contenders[key]
                if hasattr(contender, "check"):
                    contender.check(contenders["extract"].kept)
                row.extra = contender.extra
            rows.append(row)
        if "bf16" not in skip:
            rows.append(bf16_row(args, model_ref, work, texts))
        for contender in contenders.values():
            contender.close()
        del contenders
        elapsed = time.perf_counter() - started
        if "sweep" not in skip and elapsed > 0.6 * args.budget:
            _echo(f"batch-size sweep skipped: {elapsed:.0f} s spent of the {args.budget:.0f} s budget")
            rows.append(
                Row(
                    "8",
                    "batch-size sweep",
                    status=f"skipped: {elapsed:.0f} s of the {args.budget:.0f} s budget already spent (machine busy?)",
                )
            )
        elif "sweep" not in skip:
            rows += batch_sweep(args, loaded, texts, ids, work_dir, {"floor": times["floor"], "extract": ext})
        if "storage" not in skip:
            from benchmarks.storage import selection_rows

            _echo("bytes per token and the disk estimate, by capture selection")
            rows += selection_rows(loaded, texts, ids, work_dir, args.storage_dtype)
        if "resume" not in skip and args.device == "cpu":
            from benchmarks.storage import resume_row

            _echo("sharded extraction killed at half and resumed (subprocesses)")
            rows.append(resume_row(model_ref, args.dataset, work_dir, reps=1))
        if "rss" not in skip:
            _echo("peak RSS (subprocesses)")
            rows.append(rss_rows(args, model_ref, work_dir, limit))
        if "graph" not in skip and args.device == "cpu":
            from benchmarks.graph import graph_row

            variants = ["baseline"] if args.quick else None
            _echo("extraction jobs of the offline graph (subprocess) and its extraction sum")
            rows.append(graph_row(work_dir, "5a", "offline profile, extraction jobs", variants=variants))
            _echo("extraction jobs of the graph on the benchmark model (subprocess) and its extraction sum")
            rows.append(
                graph_row(
                    work_dir,
                    "5b",
                    "benchmark model as the profile, extraction jobs",
                    variants=["baseline"],
                    models=str(model_ref),
                )
            )
        rows += paper_rows(args, skip, work_dir)
        if "scale" not in skip and args.device == "cpu":
            from benchmarks.scale import scale_row

            _echo("scale: the whole offline graph at 1k, 10k and 100k synthetic sentences (subprocesses)")
            rows.append(scale_row(work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    meta["loadavg_end"] = loadavg()
    meta["total_wall_s"] = round(time.perf_counter() - started, 1)
    rows.sort(key=lambda r: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", r.key)])
    table = format_table(rows)
    payload = {"meta": meta, "rows": [r.as_dict() for r in rows], "table_markdown": table}
    stamped, latest = write_results(out_dir, payload)
    print(table)
    print(
        f"\n{meta['machine']['cpu']}, {meta['machine']['torch_threads']} torch threads, {args.device}; "
        f"{len(texts)} sentences / {meta['dataset']['n_tokens']} tokens, batch {args.batch_size}, {args.reps} reps; "
        f"load avg {meta['loadavg_start']} -> {meta['loadavg_end']}; {meta['total_wall_s']} s total"
    )
    by_key = {r.key: r for r in rows}
    for key, label in (("2", "fp32"), ("7", "bf16")):
        row = by_key.get(key)
        if row is not None and row.status == "ok" and row.samples_per_s:
            print(
                f"extraction, {label} compute, {_short(args.storage_dtype)} storage ({args.device}): "
                f"{row.samples_per_s:.1f} samples/s incl. writing, checksum and "
                f"fsync ({row.samples} sentences, median of {len(row.seconds)})"
            )
    busy = meta["loadavg_start"] and meta["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        print(
            f"warning: the machine was busy (load average {meta['loadavg_start']} on {os.cpu_count()} CPUs): "
            "absolute numbers are unreliable; the ratios are paired per repetition"
        )
    print(f"wrote {stamped} and {latest}")
    return 0


def paper_rows(args, skip: set[str], work_dir: Path) -> list[Row]:
    """Rows 9-11 (`benchmarks.paper`); the stand-ins are built into the model cache on first use."""
    if args.device != "cpu" or {"paper", "cli-tl", "fixed"} <= skip:
        return []
    from benchmarks.paper import cli_vs_tl_row, fixed_cost_row, paper_datasets, paper_profile_rows

    models = tuple(m for m in args.paper_models.split(",") if m)
    rows = []
    if "paper" not in skip:
        _echo("paper profile (stand-ins): forward floor, then emo-assets materialize --profile paper (subprocess)")
        rows += paper_profile_rows(work_dir, args.paper_per_emotion, tiny=args.paper_tiny)
    if "cli-tl" not in skip:
        _echo("extract CLI vs TransformerLens script (subprocesses)")
        dataset = paper_datasets(work_dir / "cli-tl-data", args.paper_per_emotion)["extended"]
        rows.append(cli_vs_tl_row(work_dir, dataset, models, tiny=args.paper_tiny))
    if "fixed" not in skip:
        _echo("fixed costs of a cold extraction process (subprocess)")
        rows.append(fixed_cost_row(work_dir, models, tiny=args.paper_tiny))
    return rows


def bf16_row(args, model_ref: str, work, texts: list[str]) -> Row:
    """bf16 compute (fp32 storage) vs fp32 extraction: speed and the largest relative error of what is stored.

    A probe on 4 sentences first: where bf16 is more than 3x slower than fp32 (CPUs without native bf16 matmul,
    e.g. AVX2-only: PyTorch falls back to a slow kernel for GPT-2's addmm), the probe is the measurement, so the
    row does not take many minutes; otherwise both run interleaved on the whole workload."""
    from benchmarks.contenders import Extraction, Workload, relative_errors
    from emo_assets.core.models import load_model

    row = Row(
        "7",
        f"bf16 compute ({_short(args.storage_dtype)} storage) vs fp32 extraction",
        target="info",
        ratio_label="x faster than fp32 (speedup)",
    )
    _echo("bf16: loading a bf16 copy and probing")
    try:
        loaded_bf16 = load_model(model_ref, device=args.device, compute_dtype="bfloat16", training_texts=lambda: texts)
    except Exception as exc:  # noqa: BLE001
        row.status = f"failed: {type(exc).__name__}: {exc}"
        return row
    probe = Workload(work.loaded, work.texts[:4], work.ids[:4], work.batch_size, work.work_dir, "")
    options = {"storage_dtype": args.storage_dtype}
    pair = {
        "fp32": Extraction(probe, tag="probe32", **options),
        "bf16": Extraction(probe, loaded=loaded_bf16, tag="probe16", **options),
    }
    slow = False
    if args.device == "cpu":  # accelerators compute bf16 natively; tiny probes there only measure start-up costs
        warm = Workload(work.loaded, work.texts[:1], work.ids[:1], 1, work.work_dir, "")
        Extraction(warm, loaded=loaded_bf16, tag="warm16", keep=False).run(0)
        times = {key: [contender.run(0)] for key, contender in pair.items()}
        _echo(f"  probe (4 sentences): fp32 {times['fp32'][0]:.2f} s, bf16 {times['bf16'][0]:.2f} s")
        slow = times["bf16"][0] > 3 * times["fp32"][0]
    if slow:
        row.title += " [4-sentence probe: bf16 is slow here]"
        row.extra["note"] = (
            "bf16 is more than 3x slower than fp32 on this device (no native bf16 matmul: "
            "torch.ops.mkldnn._is_mkldnn_bf16_supported() = "
            f"{_mkldnn_bf16()}); measured once on 4 sentences instead of the whole workload"
        )
        samples = 4
    else:
        pair = {
            "fp32": Extraction(work, tag="full32", **options),
            "bf16": Extraction(work, loaded=loaded_bf16, tag="full16", **options),
        }
        for contender in pair.values():
            contender.setup()
        times = round_robin(pair, args.reps)
        samples = len(texts)
    row.seconds, row.samples = times["bf16"], samples
    row.ratio = paired(times["fp32"], times["bf16"])
    row.extra.update(relative_errors(pair["bf16"].kept, pair["fp32"].kept))
    row.extra["fp32_seconds"] = [round(t, 4) for t in times["fp32"]]
    row.extra["fp32_samples_per_s"] = round(samples / median(times["fp32"]), 2)
    row.extra["phases_median_s"] = {
        k: round(median([t[k] for t in pair["bf16"].timings]), 4) for k in pair["bf16"].timings[0]
    }
    return row


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def _mkldnn_bf16() -> str:
    import torch

    try:
        return str(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except Exception:  # noqa: BLE001
        return "unknown"


def batch_sweep(args, loaded, texts, ids, work_dir: Path, main: dict[str, list[float]]) -> list[Row]:
    """Floor and extraction at each batch size, interleaved; the main batch size reuses rows 1-2 of this run."""
    from benchmarks.contenders import Extraction, Floor, Workload

    sizes = [int(s) for s in args.sweep.split(",") if s.strip()]
    reps = args.sweep_reps or 1
    contenders = {}
    for size in sizes:
        if size == args.batch_size:
            continue
        work = Workload(loaded, texts, ids, size, work_dir, "")
        contenders[f"floor@{size}"] = Floor(work)
        contenders[f"extract@{size}"] = Extraction(work, tag=f"bs{size}", keep=False, storage_dtype=args.storage_dtype)
    for contender in contenders.values():
        contender.setup()
    _echo(f"batch-size sweep {[s for s in sizes if s != args.batch_size]} x {reps} (batch {args.batch_size}: rows 1-2)")
    times = round_robin(contenders, reps) if contenders else {}
    times[f"floor@{args.batch_size}"], times[f"extract@{args.batch_size}"] = main["floor"], main["extract"]
    rows = []
    best = min(sizes, key=lambda s: median(times[f"extract@{s}"]))
    for size in sizes:
        ext, floor = times[f"extract@{size}"], times[f"floor@{size}"]
        row = Row(
            f"8.{size}",
            f"batch size {size}: extraction (floor {len(texts) / median(floor):.1f}/s)",
            ext,
            len(texts),
            ratio=paired(floor, ext),
            ratio_label="floor / extract",
            target="info" + (" <- fastest" if size == best else ""),
        )
        row.extra = {"floor_seconds": [round(s, 4) for s in floor]}
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
