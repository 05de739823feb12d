"""What a cold extraction process pays before its first forward pass, by phase (run as its own process).

`python -X importtime -m benchmarks.fixed_costs MODEL...` prints one JSON line: wall and CPU seconds of
importing the extract CLI, torch, transformers, its tokenizer and model code, then of loading each model as the
CLI does (`load_model`). `heavy_imports` reads the `-X importtime` output for the imports that transformers'
model code pulls in unconditionally, which bound how far these costs can be cut from this project's side.
"""

from __future__ import annotations

import json
import re
import sys
import time

# modules that transformers' model code imports whatever the model (cumulative import seconds are reported)
HEAVY = (
    "torch",
    "transformers",
    "torch.distributed.tensor",
    "sympy",
    "torch._dynamo",
    "scipy.optimize",
    "transformers.modeling_utils",
    "transformers.masking_utils",
    "transformers.core_model_loading",
    "transformers.loss.loss_utils",
    "transformers.models.auto.tokenization_auto",
)
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


def heavy_imports(importtime_stderr: str) -> dict[str, float]:
    """Cumulative seconds of each module of HEAVY in `-X importtime` output (first import only)."""
    found: dict[str, float] = {}
    for line in importtime_stderr.splitlines():
        match = _LINE.match(line)
        if match and match[4] in HEAVY and match[4] not in found:
            found[match[4]] = round(int(match[2]) / 1e6, 3)
    return found


def main(models: list[str]) -> int:
    phases: dict[str, dict[str, float]] = {}
    last = start = (time.perf_counter(), time.process_time())

    def mark(label: str) -> None:
        nonlocal last
        now = (time.perf_counter(), time.process_time())
        phases[label] = {"wall_s": round(now[0] - last[0], 3), "cpu_s": round(now[1] - last[1], 3)}
        last = now

    import emo_assets.extract  # noqa: F401

    mark("import emo_assets.extract")
    import torch  # noqa: F401

    mark("import torch")
    import transformers  # noqa: F401

    mark("import transformers")
    from transformers import AutoTokenizer  # noqa: F401

    mark("import AutoTokenizer")
    from transformers import modeling_utils  # noqa: F401

    mark("import transformers model code")
    from emo_assets.core.models import load_model

    for model in models:
        load_model(model, device="cpu")
        mark(f"load {model}")
    phases["total"] = {"wall_s": round(last[0] - start[0], 3), "cpu_s": round(last[1] - start[1], 3)}
    print(json.dumps(phases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
