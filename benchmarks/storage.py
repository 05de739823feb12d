"""Rows 12-14: what each capture selection costs on disk, how exact the up-front estimate is, and what a kill
costs a sharded extraction.

12. bytes per token per selection: the benchmark model's files, written (`os.stat` / tokens); a 1B-size model
    (GPT-NeoX, 16 layers, d = 2048, Pythia-1B's shape) computed without running it: `ActivationWriter.file_bytes`
    of the same tokens under that header (the writer's own layout, the number the disk check uses);
13. the estimate (computed before writing) against the written bytes, per selection: written / estimated;
14. resume: a sharded extraction in a child process killed with SIGKILL once half its shards are published, then
    rerun to completion, against one uninterrupted run (both cold processes, model load included): wall seconds
    killed + resumed / uninterrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, Row, read_texts

SELECTIONS = (
    ("all", "all"),
    ("sentence_end", "all"),
    ("mean", "all"),
    ("last:4", "all"),
    ("all", "-4--1"),
    ("sentence_end", "0,-1"),
)
ONE_B = {"n_layers": 16, "d_model": 2048}  # Pythia-1B's shape (GPT-NeoX); see /work notes scale-up.md


def selection_rows(loaded, texts: list[str], ids: list[str], work_dir: Path, storage_dtype: str) -> list[Row]:
    """Rows 12 and 13 from one extraction per selection on the benchmark model."""
    from emo_assets.core.activations import ActivationHeader, ActivationWriter, offsets_of
    from emo_assets.core.extraction import ExtractionOptions, extract_to_file, tokenize
    from emo_assets.core.selection import resolve_layers, rows_per_sentence

    lengths = [len(ids_) for ids_ in tokenize(loaded, texts, ids, prepend_bos=False)]
    n_tokens = sum(lengths)
    per_token, one_b, exactness = {}, {}, {}
    worst = 0.0
    for positions, layers in SELECTIONS:
        label = f"positions={positions} layers={layers}"
        path = work_dir / "selection.safetensors"
        options = ExtractionOptions(batch_size=32, positions=positions, layers=layers, storage_dtype=storage_dtype)
        result = extract_to_file(loaded, texts, ids, path, options)
        written = os.stat(path).st_size
        path.unlink()
        per_token[label] = round(written / n_tokens, 1)
        exactness[label] = {"estimated": result.estimated_bytes, "written": written}
        worst = max(worst, abs(written / result.estimated_bytes - 1))
        rows = rows_per_sentence(positions, lengths)
        kept = resolve_layers(layers, ONE_B["n_layers"])
        header = ActivationHeader(
            n_layers=ONE_B["n_layers"],
            d_model=ONE_B["d_model"],
            kinds=("resid_post", "mlp_out"),
            storage_dtype=storage_dtype,
            positions=positions,
            layers=kept,
        )
        writer = ActivationWriter(
            work_dir / "never-written.safetensors",
            header,
            offsets=offsets_of(rows),
            input_ids=np.zeros(n_tokens, dtype=np.int64),
            token_offsets=None if positions == "all" else offsets_of(lengths),
        )
        one_b[label] = round(writer.file_bytes / n_tokens, 1)
    bytes_row = Row(
        "12",
        f"bytes per token by selection ({storage_dtype}; GPT-2 size written, 1B size computed)",
        samples=len(texts),
        ratio=per_token["positions=sentence_end layers=all"] / per_token["positions=all layers=all"],
        ratio_label="sentence_end / all",
        extra={
            "n_tokens": n_tokens,
            "gpt2_size_written_bytes_per_token": per_token,
            "1b_size_computed_bytes_per_token": one_b,
            "1b_size_how": "ActivationWriter.file_bytes of the same tokens under a 16-layer, d=2048 header "
            "(the writer's layout; no 1B forward)",
        },
    )
    estimate_row = Row(
        "13",
        "disk estimate (before writing) vs bytes written, every selection",
        samples=len(texts),
        ratio=1 + worst,
        ratio_label="worst written / estimated",
        target="within 1 %",
        passed=worst <= 0.01,
        extra={"bytes": exactness},
    )
    return [bytes_row, estimate_row]


# The child of row 14: extract every emotion of the dataset into OUT with a shard bound, print the wall seconds.
RESUME_CHILD = """
import json, sys, time
started = time.perf_counter()
from benchmarks.common import read_texts
from emo_assets.core.models import load_model
from emo_assets.core.extraction import ExtractionJob, ExtractionOptions, extract_files
from emo_assets.core.paths import activation_file
model, dataset, out, shard = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
records = read_texts(dataset)
loaded = load_model(model, device="cpu", training_texts=lambda: [r["text"] for r in records])
emotions = sorted({r["emotion"] for r in records})
paths = {e: activation_file(__import__("pathlib").Path(out), e) for e in emotions}
jobs = [
    ExtractionJob([r["text"] for r in records if r["emotion"] == e], [r["id"] for r in records if r["emotion"] == e],
                  paths[e], reuse_from=[paths[e]])
    for e in emotions
]
extract_files(loaded, jobs, ExtractionOptions(batch_size=32, shard_sentences=shard, shard_max_bytes=0))
print(json.dumps({"wall_s": time.perf_counter() - started}))
"""


def _child(model_ref: str, dataset: Path, out: Path, shard: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", RESUME_CHILD, model_ref, str(dataset), str(out), str(shard)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


def _shards(out: Path) -> int:
    return sum(1 for _ in out.glob("*.shards/shard-*.safetensors"))


def resume_row(model_ref: str, dataset: Path, work_dir: Path, reps: int) -> Row:
    """Row 14 (see the module docstring): every emotion's partition cut into 4 shards."""
    counts: dict[str, int] = {}
    for record in read_texts(dataset):
        counts[record["emotion"]] = counts.get(record["emotion"], 0) + 1
    shard = -(-max(counts.values()) // 4)
    half = sum(-(-n // shard) for n in counts.values()) // 2
    row = Row("14", f"killed at half + resumed vs uninterrupted, sharded ({shard} sentences per shard)")
    resumed, plain, at_kill = [], [], []
    for rep in range(reps):
        out = work_dir / f"resume-{rep}"
        started = time.perf_counter()
        child = _child(model_ref, dataset, out, shard)
        while child.poll() is None and _shards(out) < half:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed_s = time.perf_counter() - started
        if child.returncode != -signal.SIGKILL:
            row.status = (
                f"failed: the run ended before the kill (exit {child.returncode}): {child.stderr.read()[-300:]}"
            )
            return row
        done = _shards(out)
        second = _child(model_ref, dataset, out, shard)
        output, error = second.communicate()
        if second.returncode != 0:
            row.status = f"failed: resume exit {second.returncode}: {error[-300:]}"
            return row
        resumed.append(killed_s + json.loads(output.strip().splitlines()[-1])["wall_s"])
        at_kill.append(done)
        scratch = work_dir / f"plain-{rep}"
        third = _child(model_ref, dataset, scratch, shard)
        output, error = third.communicate()
        if third.returncode != 0:
            row.status = f"failed: uninterrupted exit {third.returncode}: {error[-300:]}"
            return row
        plain.append(json.loads(output.strip().splitlines()[-1])["wall_s"])
    row.seconds = resumed
    row.ratio = float(np.median([a / b for a, b in zip(resumed, plain)]))
    row.ratio_label = "killed + resumed / uninterrupted"
    row.target = "about 1 + (a cold start + at most the shards in flight) / total"
    row.extra = {
        "uninterrupted_s": [round(s, 3) for s in plain],
        "shards_total": 2 * half,
        "shards_published_at_kill": at_kill,
    }
    return row
