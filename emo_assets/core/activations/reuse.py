"""Reusing rows already extracted: content-addressed extraction.

A sentence's rows are a function of the token ids the model sees and of the file-level inputs in
`ActivationHeader.row_inputs` (model revision, compute and storage dtype, kinds and hooked modules, BOS,
truncation, stored positions and layers: rows are never reused across different selections). The ids already carry the text, the tokenizer and the BOS choice: the same text
under another tokenizer gives other ids, so it is never matched. `RowIndex` maps the token ids of every sentence
in compatible earlier files (another variant's file, the previous version of this file) to where its rows lie;
the extraction copies those rows instead of forwarding the sentence. Copied rows were computed in other batches,
so they may differ from a from-scratch run in the last bits (as any change of batch composition does); switching
reuse off reproduces a from-scratch file byte for byte.

A source is used only if its checksum verifies; a file that does not open, does not verify, or records other
`row_inputs` is skipped, never half-used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from emo_assets.core.activations.format import ActivationFileError, ActivationHeader, ReuseRecord, ReuseSource
from emo_assets.core.activations.reader import ActivationFile
from emo_assets.core.dtypes import dtype

CHUNK_BYTES = 64 * 1024 * 1024  # rows copied per write, all kinds and layers together: bounds memory


@dataclass(frozen=True)
class RowLocation:
    source: int  # index into RowIndex.files
    start: int  # first row of the sentence in that file


class RowIndex:
    """Where the rows of each token-id sequence already exist, among `candidates` compatible with `header`."""

    def __init__(self, header: ActivationHeader, candidates: Iterable[str | os.PathLike]) -> None:
        self.files: list[ActivationFile] = []
        self._where: dict[bytes, RowLocation] = {}
        self._verified: dict[int, bool] = {}
        wanted = header.row_inputs()
        seen: set[Path] = set()
        for candidate in candidates:
            path = Path(candidate)
            if wanted is None or path in seen or not path.is_file():
                continue
            seen.add(path)
            try:
                file = ActivationFile(path, verify=False)  # verified only if its rows are used (`verified`)
            except ActivationFileError:
                continue
            if file.header.row_inputs() != wanted:
                continue
            self.files.append(file)
            index = len(self.files) - 1
            ids, tokens, rows = np.asarray(file.input_ids), file.token_offsets, file.offsets
            for i in range(file.n_sentences):
                start, end = int(tokens[i]), int(tokens[i + 1])
                self._where.setdefault(ids[start:end].tobytes(), RowLocation(index, int(rows[i])))

    def lookup(self, token_ids: np.ndarray) -> RowLocation | None:
        """Where rows for exactly these token ids lie, if any source has them and verifies."""
        location = self._where.get(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
        if location is None or not self._verified_source(location.source):
            return None
        return location

    def _verified_source(self, index: int) -> bool:
        if index not in self._verified:
            try:
                self.files[index].verify()
                self._verified[index] = True
            except (ActivationFileError, OSError):
                self._verified[index] = False
        return self._verified[index]


@dataclass
class ReusePlan:
    """For one output file: which sentences are copied (target index -> location) and from which sources."""

    locations: dict[int, RowLocation]
    index: RowIndex | None
    n_sentences: int

    @property
    def reused(self) -> int:
        return len(self.locations)

    def record(self, output_path: Path) -> ReuseRecord:
        """What the file at `output_path` holds: sentences computed now, copied, and their sources."""
        return ReuseRecord(
            computed=self.n_sentences - self.reused, reused=self.reused, sources=self.sources(output_path.parent)
        )

    def header(self, header: ActivationHeader, output_path: Path) -> ActivationHeader:
        """`header` with the reuse record, only when rows were copied (a from-scratch file carries none)."""
        return replace(header, reuse=self.record(output_path)) if self.reused else header

    def sources(self, folder: Path) -> tuple[ReuseSource, ...]:
        """The files rows were copied from, with their paths relative to `folder` (the output file's): the same
        inputs under another results root give the same header."""
        counts: dict[int, int] = {}
        for location in self.locations.values():
            counts[location.source] = counts.get(location.source, 0) + 1
        return tuple(
            ReuseSource(os.path.relpath(self.index.files[i].path, folder), self.index.files[i].header.checksum, n)
            for i, n in sorted(counts.items())
        )


def unchanged_file(
    path: Path, header: ActivationHeader, offsets: np.ndarray, input_ids: np.ndarray, token_offsets: np.ndarray
) -> bool:
    """Whether the file at `path` already is what would be written: it verifies, holds the same tokens and rows
    (`offsets` rows, `token_offsets` tokens) and the same header apart from its checksum and reuse record. Such a
    file is kept as it is, so a rerun changes no byte."""
    try:
        existing = ActivationFile(path)
    except ActivationFileError:
        return False
    shaped = header.with_shape(len(offsets) - 1, len(input_ids), int(offsets[-1]))
    return (
        existing.header == replace(shaped, checksum=existing.header.checksum)
        and np.array_equal(existing.offsets, offsets)
        and np.array_equal(existing.token_offsets, token_offsets)
        and np.array_equal(existing.input_ids, input_ids)
    )


def kept_record(path: Path) -> ReuseRecord:
    """The record of a file kept as it is (`unchanged_file`): all its sentences, from itself."""
    header = ActivationFile(path, verify=False).header
    return ReuseRecord(
        computed=0, reused=header.n_sentences, sources=(ReuseSource(path.name, header.checksum, header.n_sentences),)
    )


def plan_reuse(index: RowIndex | None, input_ids: np.ndarray, token_offsets: np.ndarray) -> ReusePlan:
    """Which sentences of a file (its `input_ids` / `token_offsets`) `index` already holds."""
    locations = {}
    if index is not None:
        for i in range(len(token_offsets) - 1):
            location = index.lookup(input_ids[token_offsets[i] : token_offsets[i + 1]])
            if location is not None:
                locations[i] = location
    return ReusePlan(locations, index, len(token_offsets) - 1)


def copy_reused_rows(plan: ReusePlan, writer, lengths: Sequence[int]) -> None:
    """Hand the reused sentences' rows (`lengths`: rows per sentence) to `writer` (an `ActivationWriter`), in
    chunks of at most `CHUNK_BYTES`.

    Sentences whose rows are consecutive in one source are read as one slice per (kind, layer)."""
    if not plan.locations:
        return
    row_bytes = writer.n_layers * len(writer.kinds) * writer.d_model * dtype(writer.storage_dtype).itemsize
    budget = max(1, CHUNK_BYTES // row_bytes)
    chunk: list[int] = []
    for target in sorted(plan.locations):
        if chunk and sum(lengths[i] for i in chunk) + lengths[target] > budget:
            _copy_chunk(plan, writer, chunk, lengths)
            chunk = []
        chunk.append(target)
    _copy_chunk(plan, writer, chunk, lengths)


def _copy_chunk(plan: ReusePlan, writer, targets: list[int], lengths: Sequence[int]) -> None:
    runs: list[list[int]] = []  # [source, source start row, chunk start row, n rows]
    position = 0
    for target in targets:
        location = plan.locations[target]
        last = runs[-1] if runs else None
        if last and last[0] == location.source and last[1] + last[3] == location.start:
            last[3] += lengths[target]
        else:
            runs.append([location.source, location.start, position, lengths[target]])
        position += lengths[target]
    raw = dtype(writer.storage_dtype).numpy_raw
    arrays = {}
    for kind in writer.kinds:
        array = np.empty((writer.n_layers, position, writer.d_model), dtype=raw)
        for source, start, at, n in runs:
            file = plan.index.files[source]
            for stored, layer in enumerate(writer.header.stored_layers):
                array[stored, at : at + n] = file.raw_rows(kind, layer, start, start + n)
        arrays[kind] = array
    writer.write_batch(arrays, targets, [lengths[i] for i in targets])
