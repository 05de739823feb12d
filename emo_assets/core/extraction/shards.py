"""Shards and waves: a job over the shard bound cut into runs of sentences, the k-th shards of all jobs made one
wave, and each sharded job's manifest planned before the waves and written after them (shard names and clean-up
are `emo_assets.core.activations.shards`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from emo_assets.core.activations import ActivationWriter
from emo_assets.core.activations.format import CHECKSUM_PLACEHOLDER, ShardRef
from emo_assets.core.activations.reader import ActivationFile
from emo_assets.core.activations.reuse import unchanged_file
from emo_assets.core.activations.shards import remove_orphan_shards, remove_stale_shard_temps, shard_bounds, shard_path
from emo_assets.core.atomic import remove_stale_temps
from emo_assets.core.dtypes import dtype
from emo_assets.core.extraction.options import ExtractionJob, ExtractionOptions
from emo_assets.core.extraction.planning import ExtractionPlan
from emo_assets.core.extraction.reuse import ReuseDecision
from emo_assets.core.extraction.stream import ForwardStream


@dataclass
class Wave:
    """The k-th shard of every job that has one (a job written as one file is its own only shard): extracted in
    one forward stream, published before the next wave starts, so a kill loses at most the wave in flight."""

    plan: ExtractionPlan
    members: list[tuple[int, int]]  # (job, shard index) of each of the wave's files
    decision: ReuseDecision | None = None
    writers: dict[int, ActivationWriter] = field(default_factory=dict)
    stream: ForwardStream | None = None
    copy_s: float = 0.0


def shard_ranges(plan: ExtractionPlan, options: ExtractionOptions) -> list[list[tuple[int, int]]]:
    """Each job's sentence ranges (one range: written as one file)."""
    row_bytes = len(plan.base.kinds) * len(plan.base.stored_layers) * plan.base.d_model
    row_bytes *= dtype(plan.base.storage_dtype).itemsize
    return [shard_bounds(t.rows, row_bytes, options.shard_max_bytes, options.shard_sentences) for t in plan.tokens]


def plan_waves(plan: ExtractionPlan, ranges: list[list[tuple[int, int]]]) -> list[Wave]:
    waves = []
    for k in range(max(len(r) for r in ranges)):
        members = [(j, k) for j, r in enumerate(ranges) if k < len(r)]
        jobs, tokens, headers = [], [], []
        for j, k in members:
            job, (first, end) = plan.jobs[j], ranges[j][k]
            if len(ranges[j]) > 1:
                path = shard_path(job.output_path, k)
                job = ExtractionJob(
                    job.texts[first:end], job.sentence_ids[first:end], path, job.source, (path, *job.reuse_from)
                )
            jobs.append(job)
            tokens.append(plan.tokens[j].part(first, end))
            headers.append(replace(plan.headers[j], sentence_ids=tuple(job.sentence_ids)))
        waves.append(Wave(ExtractionPlan(jobs, tokens, plan.base, headers, plan.points, 0.0), members))
    return waves


@dataclass
class Manifest:
    """The manifest of one sharded job: a writer of its exact size (shard checksums are placeholders until the
    shards are written) and whether the one at its path already is what would be written."""

    job: int
    writer: ActivationWriter
    kept: bool = False


def _manifest_writer(plan: ExtractionPlan, j: int, refs: Sequence[ShardRef]) -> ActivationWriter:
    t = plan.tokens[j]
    return ActivationWriter(
        plan.jobs[j].output_path,
        replace(plan.headers[j], shards=tuple(refs)),
        offsets=t.row_offsets,
        input_ids=t.input_ids,
        token_offsets=t.offsets if plan.base.has_token_offsets else None,
    )


def _shard_refs(plan: ExtractionPlan, ranges, j: int, known: bool) -> list[ShardRef]:
    """The shards of job `j` as its manifest lists them; checksums of shards not yet written are placeholders
    (fixed width: the manifest's size is exact either way), unless `known` (after the waves ran)."""
    final = plan.jobs[j].output_path
    refs = []
    for k, (first, end) in enumerate(ranges[j]):
        path = shard_path(final, k)
        checksum = ActivationFile(path, verify=False).header.checksum if known else CHECKSUM_PLACEHOLDER
        refs.append(ShardRef(os.path.relpath(path, final.parent), first, end, checksum))
    return refs


def plan_manifests(plan: ExtractionPlan, ranges, waves: list[Wave], options: ExtractionOptions) -> list[Manifest]:
    manifests = []
    for j, job_ranges in enumerate(ranges):
        if len(job_ranges) == 1:
            continue
        shards_kept = all(
            wave.decision.kept[wave.members.index((j, k))] for k, wave in enumerate(waves[: len(job_ranges)])
        )
        refs = _shard_refs(plan, ranges, j, known=shards_kept)
        writer = _manifest_writer(plan, j, refs)
        t = plan.tokens[j]
        kept = (
            shards_kept
            and options.reuse
            and unchanged_file(plan.jobs[j].output_path, writer.header, t.row_offsets, t.input_ids, t.offsets)
        )
        manifests.append(Manifest(j, writer, kept))
    return manifests


def publish_manifests(plan: ExtractionPlan, ranges, manifests: list[Manifest]) -> None:
    """Write each manifest whose shards are all published (or renew a kept one), then drop unlisted shards."""
    for manifest in manifests:
        final = plan.jobs[manifest.job].output_path
        if manifest.kept:
            os.utime(final)
            remove_stale_temps(final)
            continue
        writer = _manifest_writer(plan, manifest.job, _shard_refs(plan, ranges, manifest.job, known=True))
        with writer:
            writer.commit()
    for j, job in enumerate(plan.jobs):  # shards no manifest lists (fewer shards now, or one file)
        listed = range(len(ranges[j])) if len(ranges[j]) > 1 else ()
        remove_orphan_shards(job.output_path, [shard_path(job.output_path, k) for k in listed])
    for folder in {job.output_path.parent for job in plan.jobs}:
        remove_stale_shard_temps(folder)
