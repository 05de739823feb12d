"""`extract_files` and its one-file and estimate-only forms: the plan, shards, reuse decision, writers and disk check
before the first write, then each wave's forward stream, the manifests and the results."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from emo_assets.core.activations import ActivationWriter, DatasetSource
from emo_assets.core.activations.diskspace import DiskEstimate
from emo_assets.core.activations.reuse import copy_reused_rows
from emo_assets.core.atomic import remove_stale_temps
from emo_assets.core.extraction.options import ExtractionJob, ExtractionOptions, ExtractionResult
from emo_assets.core.extraction.planning import ExtractionPlan, plan_extraction
from emo_assets.core.extraction.results import extraction_results
from emo_assets.core.extraction.reuse import ReuseDecision, decide_reuse_all
from emo_assets.core.extraction.shards import (
    Manifest,
    Wave,
    plan_manifests,
    plan_waves,
    publish_manifests,
    shard_ranges,
)
from emo_assets.core.extraction.stream import ForwardStream, on_host
from emo_assets.core.models import LoadedModel


def _write_threads(options: ExtractionOptions, host: bool) -> int:
    """On the CPU the cores run the forward: one writer thread. With an accelerator, idle cores copy rows."""
    if options.write_threads > 0:
        return options.write_threads
    return 1 if host else max(1, min(8, (os.cpu_count() or 2) // 2))


def _open_writers(
    plan: ExtractionPlan, decision: ReuseDecision, options: ExtractionOptions, host: bool
) -> dict[int, ActivationWriter]:
    """One streaming writer per file that is not kept (not yet entered: nothing is written here)."""
    return {
        j: ActivationWriter(
            job.output_path,
            decision.plans[j].header(plan.headers[j], job.output_path),
            offsets=plan.tokens[j].row_offsets,
            input_ids=plan.tokens[j].input_ids,
            token_offsets=plan.tokens[j].offsets if plan.base.has_token_offsets else None,
            background=options.background_write,
            write_threads=_write_threads(options, host),
        )
        for j, job in enumerate(plan.jobs)
        if not decision.kept[j]
    }


def _renew_kept(plan: ExtractionPlan, decision: ReuseDecision) -> None:
    for job, keep in zip(plan.jobs, decision.kept):
        if keep:
            os.utime(job.output_path)  # renewed: its age is what the freshness checks read
            remove_stale_temps(job.output_path)  # a kept file is not published, which is where writers clean up


def _estimate(plan: ExtractionPlan, waves: list[Wave], manifests: list[Manifest]) -> DiskEstimate:
    files = {}
    for wave in waves:
        for w, job in enumerate(wave.plan.jobs):
            files[job.output_path] = wave.writers[w].file_bytes if w in wave.writers else 0
    for manifest in manifests:
        files[plan.jobs[manifest.job].output_path] = 0 if manifest.kept else manifest.writer.file_bytes
    return DiskEstimate.of(files)


def _prepare(
    loaded: LoadedModel, jobs: Sequence[ExtractionJob], options: ExtractionOptions
) -> tuple[ExtractionPlan, list, list[Wave], list[Manifest], DiskEstimate]:
    """Everything decided before the first write: the plan, the shards, reuse, the writers and the disk estimate."""
    plan = plan_extraction(loaded, jobs, options)
    ranges = shard_ranges(plan, options)
    waves = plan_waves(plan, ranges)
    host = on_host(loaded.device)
    for wave, decision in zip(waves, decide_reuse_all([wave.plan for wave in waves], options)):
        wave.decision = decision
        wave.writers = _open_writers(wave.plan, decision, options, host)
    manifests = plan_manifests(plan, ranges, waves, options)
    return plan, ranges, waves, manifests, _estimate(plan, waves, manifests)


def estimate_files(
    loaded: LoadedModel, jobs: Sequence[ExtractionJob], options: ExtractionOptions = ExtractionOptions()
) -> DiskEstimate:
    """What `extract_files` would write (tokenized and planned, reuse decided, no forward, nothing written)."""
    return _prepare(loaded, jobs, options)[-1]


def _run_wave(loaded: LoadedModel, wave: Wave, options: ExtractionOptions) -> None:
    """Forward one wave's sentences and publish its files."""
    plan, decision = wave.plan, wave.decision
    wave.stream = ForwardStream(loaded, plan, decision.work(plan), options)
    with ExitStack() as stack:
        for writer in wave.writers.values():
            stack.enter_context(writer)
        before = time.perf_counter()
        for j, writer in wave.writers.items():
            copy_reused_rows(decision.plans[j], writer, plan.tokens[j].rows)
        wave.copy_s = time.perf_counter() - before
        wave.stream.run(wave.writers, options.progress)
        for writer in wave.writers.values():
            writer.commit()
    _renew_kept(plan, decision)


def extract_files(
    loaded: LoadedModel,
    jobs: Sequence[ExtractionJob],
    options: ExtractionOptions = ExtractionOptions(),
    on_estimate: Callable[[DiskEstimate], None] | None = None,
) -> list[ExtractionResult]:
    """Extract every job's sentences in one forward stream and write one activation file per job (a job over the
    shard bound: its shards, one wave after the other, then its manifest).

    Every job is tokenized and checked, and the bytes to write checked against the free disk space
    (`DiskSpaceError`), before anything is written (`on_estimate` is shown the estimate first); each file is
    published atomically."""
    if not jobs:
        return []
    started = time.perf_counter()
    plan, ranges, waves, manifests, estimate = _prepare(loaded, jobs, options)
    if on_estimate is not None:
        on_estimate(estimate)
    estimate.check()
    for wave in waves:
        _run_wave(loaded, wave, options)
    publish_manifests(plan, ranges, manifests)
    return extraction_results(plan, waves, estimate, time.perf_counter() - started)


def extract_to_file(
    loaded: LoadedModel,
    texts: Sequence[str],
    sentence_ids: Sequence[str],
    output_path: str | Path,
    options: ExtractionOptions = ExtractionOptions(),
    source: DatasetSource | None = None,
    reuse_from: Sequence[Path] = (),
) -> ExtractionResult:
    """Extract every layer's activations for `texts` (dataset order) into one activation file.

    `source` (emotion, dataset variant, path and sha256) is recorded in the file header; `reuse_from` names
    earlier files whose rows may be reused (see `ExtractionJob`)."""
    job = ExtractionJob(texts, sentence_ids, Path(output_path), source, tuple(reuse_from))
    return extract_files(loaded, [job], options)[0]
