"""What an extraction is asked for and what it reports: the options, one output file's job, one file's result,
and the error for input that cannot be extracted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from emo_assets.core.activations import DatasetSource, ReuseRecord, kinds_for
from emo_assets.core.config import ExtractionSettings


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
