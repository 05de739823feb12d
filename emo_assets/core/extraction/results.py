"""One `ExtractionResult` per job: its files and their sizes, its reuse record (merged over its shards), its
non-finite count and the stream's timings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from emo_assets.core.activations import ReuseRecord
from emo_assets.core.activations.diskspace import DiskEstimate
from emo_assets.core.activations.format import ReuseSource
from emo_assets.core.activations.reuse import kept_record
from emo_assets.core.extraction.options import ExtractionResult
from emo_assets.core.extraction.planning import ExtractionPlan
from emo_assets.core.extraction.shards import Wave


def _timings(plan: ExtractionPlan, waves: list[Wave]) -> dict[str, float]:
    timings = {"tokenize_s": plan.tokenize_s}
    for wave in waves:
        parts = {
            "reuse_index_s": wave.decision.seconds,
            "copy_reused_s": wave.copy_s,
            "forward_s": wave.stream.stats.forward_s,
            "capture_s": wave.stream.stats.capture_s,
        }
        for writer in wave.writers.values():
            for key, value in writer.timings.items():
                parts[key] = parts.get(key, 0.0) + value
        for key, value in parts.items():
            timings[key] = timings.get(key, 0.0) + value
    return timings


def _merged_record(final: Path, records: Sequence[tuple[Path, ReuseRecord]]) -> ReuseRecord:
    """One record for a partition from its shards' records (source paths made relative to the partition's folder)."""
    counts: dict[str, list] = {}
    for shard, record in records:
        for source in record.sources:
            path = os.path.relpath(os.path.normpath(shard.parent / source.path), final.parent)
            entry = counts.setdefault(path, [source.checksum, 0])
            entry[1] += source.sentences
    return ReuseRecord(
        computed=sum(r.computed for _, r in records),
        reused=sum(r.reused for _, r in records),
        sources=tuple(ReuseSource(path, checksum, n) for path, (checksum, n) in sorted(counts.items())),
    )


def extraction_results(
    plan: ExtractionPlan, waves: list[Wave], estimate: DiskEstimate, wall: float
) -> list[ExtractionResult]:
    timings = _timings(plan, waves)
    total_tokens = sum(int(t.offsets[-1]) for t in plan.tokens)
    parts: dict[int, list] = {}  # job -> [(file, reuse record, non-finite count)]
    for wave in waves:
        for w, (j, _) in enumerate(wave.members):
            path = wave.plan.jobs[w].output_path
            kept, reuse = wave.decision.kept[w], wave.decision.plans[w]
            record = kept_record(path) if kept else reuse.record(path)
            parts.setdefault(j, []).append((path, record, int(wave.stream.nonfinite[w])))
    results = []
    for j, (job, t) in enumerate(zip(plan.jobs, plan.tokens)):
        files = [job.output_path, *(p for p, _, _ in parts[j] if p != job.output_path)]
        record = (
            parts[j][0][1] if len(parts[j]) == 1 else _merged_record(job.output_path, [(p, r) for p, r, _ in parts[j]])
        )
        results.append(
            ExtractionResult(
                path=job.output_path,
                n_sentences=len(t.lengths),
                n_tokens=int(t.offsets[-1]),
                n_layers=plan.base.n_layers,
                d_model=plan.base.d_model,
                kinds=plan.base.kinds,
                storage_dtype=plan.base.storage_dtype,
                file_bytes=sum(os.stat(p).st_size for p in files),
                wall_seconds=wall * int(t.offsets[-1]) / total_tokens,
                n_nonfinite=sum(n for _, _, n in parts[j]),
                reuse=record,
                positions=plan.base.positions,
                layers=plan.base.stored_layers,
                n_rows=int(t.row_offsets[-1]),
                estimated_bytes=sum(estimate.files[p] for p in files),
                files=tuple(files),
                timings=timings,
            )
        )
    return results
