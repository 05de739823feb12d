"""What the extraction costs over the bare forward, part by part: `python -m benchmarks.capture_costs [N] [REPS]`.

Four passes over the first N sentences (default 64) of the benchmark model's dataset, interleaved with the
order rotating every repetition (REPS, default 15), each timed in wall and CPU seconds (the CPU seconds of the
whole process, writer threads included, are what a loaded shared machine distorts least):

* `floor`: the bare forward under `torch.inference_mode` (row 1);
* `no_grad`: the same under `torch.no_grad` (what the zero-copy capture needs for its version counters);
* `hooks_keep`: `no_grad` plus the capture's hooks, every batch's outputs kept until the next batch;
* `extract`: `extract_to_file` (row 2), the file deleted after each pass.

Run it with `OMP_NUM_THREADS=1` for CPU seconds that do not count threads spinning at barriers. Prints the
medians and one JSON line with every repetition.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DEFAULT_DATASET, read_texts
from benchmarks.model import bench_model_dir
from emo_assets.core.activations import BASE_KINDS, offsets_of
from emo_assets.core.capture import Hooks, HostCapture
from emo_assets.core.extraction import ExtractionOptions, extract_to_file, plan_batches, tokenize
from emo_assets.core.extraction.stream import _padded
from emo_assets.core.layers import find_hook_points
from emo_assets.core.models import load_model


def main(n: int, reps: int) -> dict:
    records = read_texts(DEFAULT_DATASET)
    texts, ids = [r["text"] for r in records][:n], [r["id"] for r in records][:n]
    loaded = load_model(str(bench_model_dir([r["text"] for r in records])), device="cpu")
    encoded = tokenize(loaded, texts, ids, prepend_bos=False)
    lengths = [len(e) for e in encoded]
    offsets = offsets_of(lengths)
    input_ids = np.fromiter((t for e in encoded for t in e), dtype=np.int64, count=int(offsets[-1]))
    batches = plan_batches(lengths, ExtractionOptions(batch_size=32), "cpu")
    points = find_hook_points(loaded.model)
    modules = {kind: points.of_kind(kind) for kind in BASE_KINDS}
    folder = Path(tempfile.mkdtemp(prefix="capture-costs-"))

    def forward(mode, hooks: bool) -> None:
        capture = HostCapture(modules, torch.float32)
        with Hooks(capture, modules) if hooks else contextlib.nullcontext(), mode():
            for batch in batches:
                ids, mask = _padded(input_ids, offsets, batch, max(lengths[i] for i in batch))
                capture.start(torch.Size(ids.shape))
                loaded.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))

    def extract() -> None:
        path = folder / "extract.safetensors"
        extract_to_file(loaded, texts, ids, path, ExtractionOptions(batch_size=32))
        path.unlink()

    variants = {
        "floor": lambda: forward(torch.inference_mode, False),
        "no_grad": lambda: forward(torch.no_grad, False),
        "hooks_keep": lambda: forward(torch.no_grad, True),
        "extract": extract,
    }
    for run in variants.values():
        run()  # warm-up
    times = {key: {"wall": [], "cpu": []} for key in variants}
    for rep in range(reps):
        keys = list(variants)
        for key in keys[rep % len(keys) :] + keys[: rep % len(keys)]:
            wall, cpu = time.perf_counter(), time.process_time()
            variants[key]()
            times[key]["wall"].append(time.perf_counter() - wall)
            times[key]["cpu"].append(time.process_time() - cpu)
    os.rmdir(folder)
    floor_cpu = statistics.median(times["floor"]["cpu"])
    for key, value in times.items():
        cpu = statistics.median(value["cpu"])
        print(
            f"{key:12s} wall {statistics.median(value['wall']):7.3f} s  cpu {cpu:7.3f} s  cpu / floor {cpu / floor_cpu:.3f}"
        )
    return {"n": n, "reps": reps, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "times": times}


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(main(*(arguments + [64, 15][len(arguments) :]))))
