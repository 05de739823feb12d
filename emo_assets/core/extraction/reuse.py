"""The reuse decision: which files are kept as they are, and which sentences of the others are copied from
compatible earlier files instead of forwarded (the row index and the copy are `emo_assets.core.activations.reuse`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from emo_assets.core.activations.reuse import ReusePlan, RowIndex, plan_reuse, unchanged_file
from emo_assets.core.extraction.options import ExtractionOptions
from emo_assets.core.extraction.planning import ExtractionPlan


@dataclass
class ReuseDecision:
    """Per job: whether its file is kept as it is, and which of its sentences are copied from earlier files."""

    kept: list[bool]
    plans: list[ReusePlan]
    seconds: float

    def work(self, plan: ExtractionPlan) -> list[int]:
        """The stream sentence indices that need a forward: every sentence of the files not kept, not copied."""
        return [
            int(plan.starts[j]) + i
            for j, t in enumerate(plan.tokens)
            if not self.kept[j]
            for i in range(len(t.lengths))
            if i not in self.plans[j].locations
        ]


def decide_reuse(plan: ExtractionPlan, options: ExtractionOptions) -> ReuseDecision:
    """Which files are already what would be written (kept: a rerun changes no byte, if they may be reused), and
    which sentences of the others have rows in a compatible earlier file (`ExtractionJob.reuse_from`)."""
    return decide_reuse_all([plan], options)[0]


def decide_reuse_all(plans: Sequence[ExtractionPlan], options: ExtractionOptions) -> list[ReuseDecision]:
    """`decide_reuse` for several plans (the shard waves of one extraction) over one index of the candidates."""
    started = time.perf_counter()
    kept = [
        [
            options.reuse
            and job.output_path in map(Path, job.reuse_from)
            and unchanged_file(job.output_path, header, t.row_offsets, t.input_ids, t.offsets)
            for job, header, t in zip(plan.jobs, plan.headers, plan.tokens)
        ]
        for plan in plans
    ]
    candidates = [
        path
        for plan, keeps in zip(plans, kept)
        for job, keep in zip(plan.jobs, keeps)
        if options.reuse and not keep
        for path in job.reuse_from
    ]
    index = RowIndex(plans[0].base, candidates) if candidates else None
    reuse_plans = [
        [plan_reuse(None if keep else index, t.input_ids, t.offsets) for keep, t in zip(keeps, plan.tokens)]
        for plan, keeps in zip(plans, kept)
    ]
    seconds = (time.perf_counter() - started) / len(plans)
    return [ReuseDecision(keeps, chosen, seconds) for keeps, chosen in zip(kept, reuse_plans)]
