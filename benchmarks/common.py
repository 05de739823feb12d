"""Shared pieces of the benchmark: the workload (texts, model, batches), timing helpers, RSS, output files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO_ROOT / "data" / "emotion_dataset.jsonl"
DEFAULT_OUT = REPO_ROOT / "results" / "bench"
# the targets for this CPU, by row: ratios of the same run (>= for speed-ups, <= for 5a/5b, 6 and 9)
TARGETS = {
    "2": 0.97,
    "3": 3.4,
    "4a": 1.6,
    "4b": 1.15,
    "5a": 1.5,
    "5b": 1.5,
    "6": 1.15,
    "9": 1.2,
    "9-reuse": 1.0,
    "9a": 0.25,
    "10": 2.5,
}


def read_texts(path: Path) -> list[dict]:
    """The dataset's records (id, emotion, text), in file order."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            record = json.loads(line)
            records.append(
                {
                    "id": str(record.get("id", f"line-{number}")),
                    "emotion": record.get("emotion", ""),
                    "text": record["text"],
                }
            )
    return records


def repeat_records(records: list[dict], times: int) -> list[dict]:
    """The dataset `times` over (ids made unique), to measure how cost and memory grow with size."""
    if times == 1:
        return list(records)
    return [{**r, "id": f"{r['id']}~{k}"} for k in range(times) for r in records]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def proc_status_kib(field_name: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Row:
    """One line of the result table."""

    key: str
    title: str
    seconds: list[float] = field(default_factory=list)  # per repetition
    samples: int = 0  # sentences per repetition
    status: str = "ok"  # ok | unavailable: ... | failed: ...
    ratio: float | None = None  # the row's target quantity, measured pair by pair in the same run
    ratio_label: str = ""
    target: str = ""
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return median(self.seconds)

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.median_s if self.seconds and self.median_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "status": self.status,
            "samples": self.samples,
            "seconds": [round(s, 4) for s in self.seconds],
            "median_s": _round(self.median_s) if self.seconds else None,
            "samples_per_s": _round(self.samples_per_s),
            "ratio": _round(self.ratio),
            "ratio_label": self.ratio_label,
            "target": self.target,
            "passed": self.passed,
            **({"extra": self.extra} if self.extra else {}),
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def format_table(rows: list[Row]) -> str:
    header = ["#", "measurement", "median s", "samples/s", "ratio (same run)", "target", "pass"]
    lines = [header]
    for row in rows:
        if row.status != "ok":
            lines.append([row.key, row.title, "-", "-", row.status[:60], row.target, "n/a"])
            continue
        ratio = f"{row.ratio:.3f} {row.ratio_label}".strip() if row.ratio is not None else ""
        lines.append(
            [
                row.key,
                row.title,
                f"{row.median_s:.2f}" if row.seconds else "-",
                f"{row.samples_per_s:.1f}" if row.samples_per_s else "-",
                ratio,
                row.target,
                {True: "yes", False: "NO", None: ""}[row.passed],
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def write_results(out_dir: Path, payload: dict) -> tuple[Path, Path]:
    """`<out_dir>/<UTC timestamp>.json` and `latest.json`, each written atomically."""
    from emo_assets.core.atomic import write_bytes_atomic

    data = (json.dumps(payload, indent=1, sort_keys=False) + "\n").encode()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stamped = write_bytes_atomic(Path(out_dir) / f"bench-{stamp}.json", data)
    latest = write_bytes_atomic(Path(out_dir) / "latest.json", data)
    return stamped, latest
