"""Batched, exact activation extraction with forward hooks, streamed to activation files.

How and why:
* All texts are tokenized first (cheap), so every row's position in the output file is known up front.
* One forward stream per model: `extract_files` takes several output files (e.g. every emotion of a dataset) and
  batches over the union of their sentences, so no file ends in a small batch of its own; each batch's rows go to
  their files (the sentences of one file are adjacent within a batch, so each file gets views, not copies).
* Content-addressed reuse (`emo_assets.core.activations.reuse`): sentences whose token ids already have rows in a
  compatible earlier file (`ExtractionJob.reuse_from`: another variant's file, the previous version of this one)
  are copied, not forwarded; `ExtractionOptions.reuse=False` forwards everything (a byte-identical rerun).
* Batches are right-padded with an attention mask. For causal models right padding is exact (real tokens never
  attend to pads, position ids start at 0 in every row), so a sentence's activations are the same alone or in a
  batch. Padding is found by the mask, never by token id (GPT-2's pad = eos = bos). On the CPU sentences are
  sorted by length first (least padding: compute is the cost); on an accelerator batches keep dataset order
  (padding is cheap there, and each batch's rows are then one contiguous run per layer in the file: writing is
  the cost). `ExtractionOptions.length_sorted` overrides.
* Forward hooks on each block (residual stream after the block), each MLP and, if asked, each attention
  module. `hidden_states` is not used: its last entry is post final-norm.
  The capture is zero-copy on the CPU and gathers on the device elsewhere (`emo_assets.core.capture`).
* Each batch is handed to the `ActivationWriter`, which writes its rows at their dataset-order positions on a
  writer thread (overlapping the next forward), at most one batch behind, so peak memory is two batches,
  whatever the dataset size. Non-finite values are counted (one fp32 sum per tensor; exact count only if the
  sum is not finite).
* Base model, compute dtype as loaded (fp32 default), storage dtype configurable. `ExtractionResult.timings`
  says where the time went.

* What is stored (`ExtractionOptions.positions` / `layers`, see `emo_assets.core.selection`): with every token's
  rows the CPU capture is zero-copy; a subset of positions (or a mean) is gathered by `DeviceCapture` on any
  device. Only the stored layers' modules are hooked.
* Disk cost up front: every writer is built (not entered) before the first write, so the exact bytes of every file
  are known and checked against the free space (`emo_assets.core.activations.diskspace`).
* Shards: a job over the shard bound is cut into runs of sentences, each its own activation file; the k-th shards
  of all jobs form one wave (one forward stream), published before the next wave starts, and each job's manifest
  is written last (`emo_assets.core.activations.shards`). A rerun keeps every published shard that is exactly
  what it would write, so a killed extraction forwards only the sentences of the shards it had not published.

`extract_files` runs its parts in order, each callable and testable alone: planning (`plan_extraction`: checks,
tokens, headers), shards (`_waves`), reuse (`decide_reuse_all`: kept files, copied sentences), writers and the disk
check (`_prepare`), the forward stream (`ForwardStream`: batches, capture, hand-over to the writers), then the
manifests and the results. The module is longer than the others because these parts share one plan object and
one invariant (a batch's rows are adjacent per file, in dataset order), and the tests reach the stream and its
device choice (`HOST_DEVICES`) through this one module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_assets import __version__
from emo_assets.core.activations import (
    ActivationHeader,
    ActivationWriter,
    DatasetSource,
    ReuseRecord,
    kinds_for,
)
from emo_assets.core.activations.diskspace import DiskEstimate
from emo_assets.core.activations.format import CHECKSUM_PLACEHOLDER, ReuseSource, ShardRef
from emo_assets.core.activations.reader import ActivationFile
from emo_assets.core.activations.reuse import (
    ReusePlan,
    RowIndex,
    copy_reused_rows,
    kept_record,
    plan_reuse,
    unchanged_file,
)
from emo_assets.core.activations.shards import (
    remove_orphan_shards,
    remove_stale_shard_temps,
    shard_bounds,
    shard_path,
)
from emo_assets.core.atomic import remove_stale_temps
from emo_assets.core.capture import Countdown, DeviceCapture, Hooks, HostCapture, retain_freed_memory, to_device
from emo_assets.core.config import ExtractionSettings
from emo_assets.core.dtypes import dtype
from emo_assets.core.layers import HookPoints, find_hook_points
from emo_assets.core.models import LoadedModel
from emo_assets.core.selection import (
    ALL,
    SelectionError,
    parse_positions,
    resolve_layers,
    rows_per_sentence,
    selected_token_positions,
)
from emo_assets.core.tokenization import bos_token_id

# Devices whose module outputs the writer can read directly (zero-copy capture); any other device gathers the
# real rows on the device and copies them to (pinned) host buffers. Tests empty it to run that path on the CPU.
HOST_DEVICES = ("cpu",)


class ExtractionError(ValueError):
    """Input that cannot be extracted (empty sentence, longer than the model's context, ...)."""


def _runtime(default):
    """A field that changes how an extraction runs, never what it writes (left out of `output_fields`)."""
    return field(default=default, metadata={"runtime": True})


@dataclass(frozen=True)
class ExtractionOptions:
    """How to extract. Fields declared with `_runtime` do not change the file's contents; every other field does,
    and is part of `output_fields` (the Dagster input fingerprint)."""

    prepend_bos: bool = False
    attention: bool = False
    storage_dtype: str = "float32"
    truncate: bool = False  # cut sentences longer than the context instead of failing
    positions: str = "all"  # which rows of each sentence are stored (see core.selection)
    layers: str = "all"  # which model layers are stored
    batch_size: int = _runtime(32)
    progress: bool = _runtime(False)
    background_write: bool = _runtime(True)  # pwrite on a writer thread, overlapping the next forward pass
    # threads copying rows into the file; 0 = auto (1 on CPU, up to 8 with an accelerator)
    write_threads: int = _runtime(0)
    # Batch composition: True = sentences sorted by length (least padding: the CPU default), False = dataset order
    # (each batch's rows are one contiguous run per layer in the file: few large writes, the accelerator default,
    # where padding costs little); None = by device.
    length_sorted: bool | None = _runtime(None)
    # copy rows of sentences already extracted with identical inputs (`ExtractionJob.reuse_from`) instead of
    # forwarding them; False reproduces a from-scratch file byte for byte
    reuse: bool = _runtime(True)
    # a file over either bound is written as shards plus a manifest (0: no bound); the rows are the same either way
    shard_max_bytes: int = _runtime(2**30)
    shard_sentences: int = _runtime(0)

    @classmethod
    def from_settings(cls, settings: ExtractionSettings, **overrides) -> ExtractionOptions:
        """The options the `[extraction]` settings give (every field they share by name), then `overrides`."""
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return replace(cls(**shared), **overrides)

    @property
    def kinds(self) -> tuple[str, ...]:
        return kinds_for(self.attention)

    def output_fields(self) -> dict[str, object]:
        """The fields that decide what an extraction writes (see `_runtime`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}


@dataclass(frozen=True)
class ExtractionJob:
    """One output file: its sentences (dataset order), where it goes, its dataset, and earlier files that may
    already hold some of its rows (missing, unreadable or incompatible candidates are skipped)."""

    texts: Sequence[str]
    sentence_ids: Sequence[str]
    output_path: Path
    source: DatasetSource | None = None
    reuse_from: Sequence[Path] = ()


@dataclass(frozen=True)
class ExtractionResult:
    """One file's outcome. When several files share a forward stream, `wall_seconds` is the stream's time
    apportioned by tokens, and `timings` are the stream's."""

    path: Path
    n_sentences: int
    n_tokens: int
    n_layers: int
    d_model: int
    kinds: tuple[str, ...]
    storage_dtype: str
    file_bytes: int
    wall_seconds: float
    n_nonfinite: int
    reuse: ReuseRecord  # sentences computed now and copied from earlier files
    positions: str = "all"
    layers: tuple[int, ...] = ()  # model layer indices stored
    n_rows: int = 0  # rows per stored layer
    estimated_bytes: int = 0  # the size computed before writing (0 for a file kept as it is)
    files: tuple[Path, ...] = ()  # the files that hold it: `path`, then its shards if it is sharded
    # where the time went (seconds): tokenize, forward, capture (checks + hand-over), write (pwrite, writer
    # thread), queue_wait, hash, fsync, publish; the writer thread's time overlaps the forward passes.
    timings: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def samples_per_s(self) -> float:
        return self.n_sentences / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def tokenize(
    loaded: LoadedModel, texts: Sequence[str], sentence_ids: Sequence[str], prepend_bos: bool, truncate: bool = False
) -> list[list[int]]:
    """Token ids of every text, no padding, no special tokens except the optional BOS; checked against context."""
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if prepend_bos:
        try:
            bos = bos_token_id(loaded.tokenizer)
        except ValueError as exc:
            raise ExtractionError(str(exc)) from exc
        encoded = [[bos, *ids] for ids in encoded]
    if truncate:
        encoded = [ids[: loaded.context_length] for ids in encoded]
    for sid, ids in zip(sentence_ids, encoded):
        if not ids:
            raise ExtractionError(f"sentence {sid!r}: tokenizes to zero tokens")
        if len(ids) > loaded.context_length:
            raise ExtractionError(
                f"sentence {sid!r}: {len(ids)} tokens exceed the context of {loaded.model_id} "
                f"({loaded.context_length}); shorten it or ask for truncation"
            )
    return encoded


def plan_batches(lengths: Sequence[int], options: ExtractionOptions, device: str | torch.device) -> list[list[int]]:
    """The batches `extract_to_file` runs for these sentence lengths, options and device (see `length_sorted`)."""
    sort = options.length_sorted
    if sort is None:
        sort = torch.device(device).type in HOST_DEVICES
    if sort:
        return length_sorted_batches(lengths, options.batch_size)
    return [
        list(range(i, min(i + options.batch_size, len(lengths)))) for i in range(0, len(lengths), options.batch_size)
    ]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length, longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _write_threads(options: ExtractionOptions, on_host: bool) -> int:
    """On the CPU the cores run the forward: one writer thread. With an accelerator, idle cores copy rows."""
    if options.write_threads > 0:
        return options.write_threads
    return 1 if on_host else max(1, min(8, (os.cpu_count() or 2) // 2))


def _padded(input_ids: np.ndarray, offsets: np.ndarray, batch: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (pad id 0; padding is found by the mask, never by id) and attention mask."""
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, index in enumerate(batch):
        start, end = offsets[index], offsets[index + 1]
        ids[row, : end - start] = input_ids[start:end]
        mask[row, : end - start] = 1
    return ids, mask


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


@dataclass
class _Tokens:
    """The token ids of one job's sentences, concatenated, with offsets, and the rows each sentence stores."""

    lengths: list[int]
    offsets: np.ndarray
    input_ids: np.ndarray
    rows: list[int]  # rows per sentence (its token count with `positions = all`)
    row_offsets: np.ndarray

    @classmethod
    def of(cls, encoded: list[list[int]], positions: str) -> _Tokens:
        lengths = [len(ids) for ids in encoded]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        input_ids = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
        rows = rows_per_sentence(positions, lengths)
        return cls(lengths, offsets, input_ids, rows, np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))

    def part(self, first: int, end: int) -> _Tokens:
        """Sentences first:end (one shard)."""
        a, b = int(self.offsets[first]), int(self.offsets[end])
        rows = self.row_offsets[first : end + 1]
        return _Tokens(
            self.lengths[first:end],
            self.offsets[first : end + 1] - a,
            self.input_ids[a:b],
            self.rows[first:end],
            rows - rows[0],
        )


# -- planning -------------------------------------------------------------------------------------------------
@dataclass
class ExtractionPlan:
    """Every job tokenized and checked, with the header its file gets, and the stream-wide view of its sentences:
    sentence `g` of the stream is sentence `g - starts[j]` of job `j = job_of[g]`."""

    jobs: Sequence[ExtractionJob]
    tokens: list[_Tokens]
    base: ActivationHeader  # the header every job's file shares (no source, no sentence ids)
    headers: list[ActivationHeader]
    points: HookPoints
    tokenize_s: float

    def __post_init__(self) -> None:
        counts = [len(t.lengths) for t in self.tokens]
        self.starts = np.cumsum([0, *counts])
        self.job_of = np.repeat(np.arange(len(self.jobs)), counts)
        self.lengths = [n for t in self.tokens for n in t.lengths]
        self.rows = [n for t in self.tokens for n in t.rows]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.input_ids = np.concatenate([t.input_ids for t in self.tokens])

    def local(self, members: Sequence[int]) -> list[int]:
        """Stream sentence indices of one job -> that job's sentence indices."""
        return [g - int(self.starts[self.job_of[g]]) for g in members]


def plan_extraction(loaded: LoadedModel, jobs: Sequence[ExtractionJob], options: ExtractionOptions) -> ExtractionPlan:
    """Check the jobs and options, tokenize every sentence and build each file's header (nothing is written)."""
    for job in jobs:
        if len(job.texts) == 0:
            raise ExtractionError(f"{job.output_path}: no sentences to extract")
        if len(set(job.sentence_ids)) != len(job.sentence_ids):
            raise ExtractionError(f"{job.output_path}: sentence ids must be unique")
    if options.batch_size < 1:
        raise ExtractionError(f"batch_size must be >= 1, got {options.batch_size}")
    if options.shard_max_bytes < 0 or options.shard_sentences < 0:
        raise ExtractionError("shard_max_bytes and shard_sentences must be >= 0 (0: no bound)")
    try:
        positions = parse_positions(options.positions)
        layers = resolve_layers(options.layers, loaded.n_layers)
    except SelectionError as exc:
        raise ExtractionError(f"{loaded.model_id}: {exc}") from exc
    started = time.perf_counter()
    tokens = [
        _Tokens.of(tokenize(loaded, j.texts, j.sentence_ids, options.prepend_bos, options.truncate), positions)
        for j in jobs
    ]
    tokenize_s = time.perf_counter() - started
    points = find_hook_points(loaded.model)
    base = ActivationHeader(
        n_layers=loaded.n_layers,
        d_model=loaded.d_model,
        kinds=options.kinds,
        storage_dtype=options.storage_dtype,
        model_id=loaded.model_id,
        model_revision=loaded.revision,
        architecture=loaded.architecture,
        compute_dtype=loaded.compute_dtype,
        hook_points={kind: [points.names[kind][layer] for layer in layers] for kind in options.kinds},
        prepend_bos=options.prepend_bos,
        truncated_to_context=options.truncate,
        package_version=__version__,
        positions=positions,
        layers=layers,
    )
    headers = [
        replace(base, sentence_ids=tuple(job.sentence_ids)).with_source(job.source or DatasetSource()) for job in jobs
    ]
    return ExtractionPlan(jobs, tokens, base, headers, points, tokenize_s)


# -- reuse ----------------------------------------------------------------------------------------------------
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


# -- forward stream -------------------------------------------------------------------------------------------
def _groups(members: Sequence[int], job_of: np.ndarray) -> list[tuple[int, int, int]]:
    """(job, first, end) of each run of batch positions that belong to one job."""
    groups: list[tuple[int, int, int]] = []
    for position, member in enumerate(members):
        job = int(job_of[member])
        if groups and groups[-1][0] == job:
            groups[-1] = (job, groups[-1][1], position + 1)
        else:
            groups.append((job, position, position + 1))
    return groups


@dataclass
class _StreamStats:
    forward_s: float = 0.0
    capture_s: float = 0.0


class ForwardStream:
    """The one forward loop: the batches over the stream sentences in `work`, each batch's rows handed to the
    writers of their jobs (`writers[j].write_batch`), with the capture fitting the device."""

    def __init__(self, loaded: LoadedModel, plan: ExtractionPlan, work: Sequence[int], options: ExtractionOptions):
        self.loaded, self.plan = loaded, plan
        self.device = torch.device(loaded.device)
        self.on_host = self.device.type in HOST_DEVICES
        self.positions, self.layers = plan.base.positions, plan.base.stored_layers
        # every token's rows straight out of the module outputs; a subset of positions is gathered instead
        self.zero_copy = self.on_host and self.positions == ALL
        self.n_work = len(work)
        self.batches = [
            sorted((work[p] for p in batch), key=lambda g: plan.job_of[g])  # each job's rows adjacent in a batch
            for batch in plan_batches([plan.lengths[g] for g in work], options, self.device)
        ]
        storage = dtype(options.storage_dtype).torch()
        all_modules = {
            "resid_post": plan.points.blocks,
            "mlp_out": plan.points.mlps,
            "attn_out": plan.points.attentions,
        }
        self.modules = {kind: [all_modules[kind][layer] for layer in self.layers] for kind in options.kinds}
        if self.zero_copy:
            self.capture = HostCapture(self.modules, storage)
        else:
            max_rows = max((sum(plan.rows[g] for g in batch) for batch in self.batches), default=1)
            self.capture = DeviceCapture(
                self.modules, storage, self.device, loaded.d_model, max_rows, n_groups=len(plan.jobs)
            )
        self.nonfinite = np.zeros(len(plan.jobs), dtype=np.int64)
        self.stats = _StreamStats()

    def run(self, writers: Mapping[int, ActivationWriter], progress: bool) -> None:
        """Forward every batch and hand its rows to `writers` (job index -> writer)."""
        bar = tqdm(total=self.n_work, unit="sent", desc=f"{self.loaded.slug}", disable=not progress, leave=False)
        # no_grad rather than inference_mode on the CPU path: the zero-copy capture needs version counters.
        grad_mode = torch.no_grad() if self.zero_copy else torch.inference_mode()
        if self.zero_copy:
            retain_freed_memory()  # captured outputs outlive their forward: let the next one reuse freed pages
        with Hooks(self.capture, self.modules), grad_mode, bar:
            for batch in self.batches:
                lengths = [self.plan.lengths[g] for g in batch]
                ids, mask = _padded(self.plan.input_ids, self.plan.offsets, batch, max(lengths))
                ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
                groups = _groups(batch, self.plan.job_of)
                if self.zero_copy:
                    self._host_batch(writers, batch, lengths, ids, mask, groups)
                else:
                    self._device_batch(writers, batch, lengths, ids, mask, groups)
                bar.update(len(batch))
        if not self.zero_copy:
            self.nonfinite = self.capture.nonfinite.cpu().numpy()

    def _host_batch(self, writers, batch, lengths, ids, mask, groups) -> None:
        capture = self.capture
        while True:
            capture.start(ids.shape)
            before = time.perf_counter()
            self.loaded.model(input_ids=ids, attention_mask=mask)
            self.stats.forward_s += time.perf_counter() - before
            if capture.intact():
                break
            capture.copy = True  # the model writes into its outputs in place: copy them from now on
        before = time.perf_counter()
        per_row = capture.count_nonfinite(torch.as_tensor(lengths))
        arrays = capture.arrays()
        capture.outputs = {}
        self.stats.capture_s += time.perf_counter() - before
        for j, first, end in groups:
            self.nonfinite[j] += int(per_row[first:end].sum())
            part = {kind: [a[first:end] for a in layers] for kind, layers in arrays.items()}
            writers[j].write_batch(part, self.plan.local(batch[first:end]), lengths[first:end], padded=True)

    def _device_batch(self, writers, batch, lengths, ids, mask, groups) -> None:
        loaded, device = self.loaded, self.device
        width = len(ids[0])
        rows = np.concatenate(
            [row * width + np.asarray(selected_token_positions(self.positions, n)) for row, n in enumerate(lengths)]
        )
        stored = [self.plan.rows[g] for g in batch]  # rows each sentence stores
        row_groups = np.repeat(self.plan.job_of[batch], stored)
        mean = None
        if self.positions == "mean":  # each sentence's gathered rows summed into its one stored row
            segments = np.repeat(np.arange(len(batch)), lengths)
            mean = {
                "segments": to_device(torch.from_numpy(segments), device),
                "counts": to_device(torch.tensor(lengths, dtype=torch.float32), device),
            }
        before = time.perf_counter()
        self.capture.start(
            to_device(torch.from_numpy(rows), device),
            to_device(torch.from_numpy(row_groups), device),
            len(self.layers),
            loaded.d_model,
            **(mean or {}),
        )
        loaded.model(input_ids=to_device(ids, device), attention_mask=to_device(mask, device))
        self.stats.forward_s += time.perf_counter() - before  # launch time only: the device runs asynchronously
        before = time.perf_counter()
        arrays, ready, release = self.capture.to_host()
        self.stats.capture_s += time.perf_counter() - before
        countdown = Countdown(len(groups), release)
        row_starts = np.cumsum([0, *stored])
        for j, first, end in groups:
            a, b = int(row_starts[first]), int(row_starts[end])
            part = {kind: array[:, a:b] for kind, array in arrays.items()}
            writers[j].write_batch(
                part, self.plan.local(batch[first:end]), stored[first:end], ready=ready, release=countdown.done
            )


# -- writing --------------------------------------------------------------------------------------------------
def _open_writers(
    plan: ExtractionPlan, decision: ReuseDecision, options: ExtractionOptions, on_host: bool
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
            write_threads=_write_threads(options, on_host),
        )
        for j, job in enumerate(plan.jobs)
        if not decision.kept[j]
    }


def _renew_kept(plan: ExtractionPlan, decision: ReuseDecision) -> None:
    for job, keep in zip(plan.jobs, decision.kept):
        if keep:
            os.utime(job.output_path)  # renewed: its age is what the freshness checks read
            remove_stale_temps(job.output_path)  # a kept file is not published, which is where writers clean up


# -- shards ---------------------------------------------------------------------------------------------------
@dataclass
class _Wave:
    """The k-th shard of every job that has one (a job written as one file is its own only shard): extracted in
    one forward stream, published before the next wave starts, so a kill loses at most the wave in flight."""

    plan: ExtractionPlan
    members: list[tuple[int, int]]  # (job, shard index) of each of the wave's files
    decision: ReuseDecision | None = None
    writers: dict[int, ActivationWriter] = field(default_factory=dict)
    stream: ForwardStream | None = None
    copy_s: float = 0.0


def _shard_ranges(plan: ExtractionPlan, options: ExtractionOptions) -> list[list[tuple[int, int]]]:
    """Each job's sentence ranges (one range: written as one file)."""
    row_bytes = len(plan.base.kinds) * len(plan.base.stored_layers) * plan.base.d_model
    row_bytes *= dtype(plan.base.storage_dtype).itemsize
    return [shard_bounds(t.rows, row_bytes, options.shard_max_bytes, options.shard_sentences) for t in plan.tokens]


def _waves(plan: ExtractionPlan, ranges: list[list[tuple[int, int]]]) -> list[_Wave]:
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
        waves.append(_Wave(ExtractionPlan(jobs, tokens, plan.base, headers, plan.points, 0.0), members))
    return waves


@dataclass
class _Manifest:
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


def _plan_manifests(plan: ExtractionPlan, ranges, waves: list[_Wave], options: ExtractionOptions) -> list[_Manifest]:
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
        manifests.append(_Manifest(j, writer, kept))
    return manifests


def _publish_manifests(plan: ExtractionPlan, ranges, manifests: list[_Manifest]) -> None:
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


# -- writing --------------------------------------------------------------------------------------------------
def _estimate(plan: ExtractionPlan, waves: list[_Wave], manifests: list[_Manifest]) -> DiskEstimate:
    files = {}
    for wave in waves:
        for w, job in enumerate(wave.plan.jobs):
            files[job.output_path] = wave.writers[w].file_bytes if w in wave.writers else 0
    for manifest in manifests:
        files[plan.jobs[manifest.job].output_path] = 0 if manifest.kept else manifest.writer.file_bytes
    return DiskEstimate.of(files)


def _prepare(
    loaded: LoadedModel, jobs: Sequence[ExtractionJob], options: ExtractionOptions
) -> tuple[ExtractionPlan, list, list[_Wave], list[_Manifest], DiskEstimate]:
    """Everything decided before the first write: the plan, the shards, reuse, the writers and the disk estimate."""
    plan = plan_extraction(loaded, jobs, options)
    ranges = _shard_ranges(plan, options)
    waves = _waves(plan, ranges)
    on_host = torch.device(loaded.device).type in HOST_DEVICES
    for wave, decision in zip(waves, decide_reuse_all([wave.plan for wave in waves], options)):
        wave.decision = decision
        wave.writers = _open_writers(wave.plan, decision, options, on_host)
    manifests = _plan_manifests(plan, ranges, waves, options)
    return plan, ranges, waves, manifests, _estimate(plan, waves, manifests)


def estimate_files(
    loaded: LoadedModel, jobs: Sequence[ExtractionJob], options: ExtractionOptions = ExtractionOptions()
) -> DiskEstimate:
    """What `extract_files` would write (tokenized and planned, reuse decided, no forward, nothing written)."""
    return _prepare(loaded, jobs, options)[-1]


def _run_wave(loaded: LoadedModel, wave: _Wave, options: ExtractionOptions) -> None:
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


def _timings(plan: ExtractionPlan, waves: list[_Wave]) -> dict[str, float]:
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


def _results(plan: ExtractionPlan, waves: list[_Wave], estimate: DiskEstimate, wall: float) -> list[ExtractionResult]:
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
    _publish_manifests(plan, ranges, manifests)
    return _results(plan, waves, estimate, time.perf_counter() - started)
