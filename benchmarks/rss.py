"""Peak memory of one extraction, measured in a fresh process: `python -m benchmarks.rss --repeat K ...`.

The process imports, loads the model, then resets its peak-RSS counter (Linux: `5 > /proc/self/clear_refs`, so
the transient peak of model loading does not hide the extraction's) and records the RSS as the baseline; it
then extracts the dataset repeated K times and reads the peak (VmHWM). Without clear_refs the peak is
`ru_maxrss`, which includes model loading. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def measure(
    model: str,
    dataset: Path,
    repeat: int,
    batch_size: int,
    device: str,
    out_dir: Path,
    limit: int | None,
    threads: int | None = None,
) -> dict:
    import torch

    from benchmarks.common import proc_status_kib, read_texts, repeat_records, reset_peak_rss
    from emo_assets.core.extraction import ExtractionOptions, extract_to_file
    from emo_assets.core.models import load_model

    if threads:
        torch.set_num_threads(threads)
    records = read_texts(dataset)[:limit] if limit else read_texts(dataset)
    texts = [r["text"] for r in records]
    loaded = load_model(model, device=device, training_texts=lambda: texts)
    data = repeat_records(records, repeat)
    after_load_hwm = proc_status_kib("VmHWM")
    reset_ok = reset_peak_rss()
    baseline = proc_status_kib("VmRSS")
    path = out_dir / f"rss-{repeat}x.safetensors"
    started = time.perf_counter()
    result = extract_to_file(
        loaded, [r["text"] for r in data], [r["id"] for r in data], path, ExtractionOptions(batch_size=batch_size)
    )
    seconds = time.perf_counter() - started
    peak = proc_status_kib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    path.unlink()
    return {
        "repeat": repeat,
        "n_sentences": len(data),
        "n_tokens": result.n_tokens,
        "file_mib": round(result.file_bytes / 2**20, 1),
        "seconds": round(seconds, 3),
        "baseline_rss_kib": baseline,
        "after_load_hwm_kib": after_load_hwm,
        "peak_rss_kib": peak if reset_ok and peak else maxrss,
        "ru_maxrss_kib": maxrss,
        "hwm_reset": reset_ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="only the first N sentences of the dataset")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(
        json.dumps(
            measure(
                args.model,
                args.dataset,
                args.repeat,
                args.batch_size,
                args.device,
                args.out_dir,
                args.limit,
                args.threads,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
