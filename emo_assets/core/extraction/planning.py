"""Planning: every job checked and tokenized and each file's header built, with the stream-wide view of the
sentences that the later parts share (nothing is forwarded or written here)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from emo_assets import __version__
from emo_assets.core.activations import ActivationHeader, DatasetSource, offsets_of
from emo_assets.core.extraction.options import ExtractionError, ExtractionJob, ExtractionOptions
from emo_assets.core.layers import HookPoints, find_hook_points
from emo_assets.core.models import LoadedModel
from emo_assets.core.selection import SelectionError, parse_positions, resolve_layers, rows_per_sentence
from emo_assets.core.tokenization import bos_token_id


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
        offsets = offsets_of(lengths)
        input_ids = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
        rows = rows_per_sentence(positions, lengths)
        return cls(lengths, offsets, input_ids, rows, offsets_of(rows))

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
        self.offsets = offsets_of(self.lengths)
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
