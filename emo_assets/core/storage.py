"""The activation file format: one safetensors file per model x emotion, streamed to disk batch by batch.

Layout (format version 1, the public contract documented in the README):

* `resid_post`  [n_layers, n_tokens, d_model]  residual stream after each block
* `mlp_out`     [n_layers, n_tokens, d_model]  output of each block's MLP
* `attn_out`    [n_layers, n_tokens, d_model]  output of each block's attention (only when requested)
* `input_ids`   [n_tokens] int64               the real tokens of every sentence, concatenated (no padding)
* `offsets`     [n_sentences + 1] int64        sentence i owns rows offsets[i]:offsets[i+1]

plus string metadata (`__metadata__`) naming the model, revision, dataset, sentence ids and settings.

Why a writer of our own instead of `safetensors.numpy.save_file`: `save_file` needs every tensor in memory at
once, so peak memory would grow with the dataset. Tokenization happens first, so every tensor's shape is known
before the first forward pass; the header is written up front and each batch's rows are `pwrite`-n straight to
their final position (sentences are processed in length-sorted batches but land in dataset order). The data
section is hashed (xxh3-128) after the last batch and the digest patched into a fixed-width header field, so a
truncated or bit-flipped file is detected by `ActivationFile.verify`. The file is written to a temp file next
to the final path and renamed only after fsync (see `emo_assets.core.atomic`). Header JSON is written with
sorted keys and no timestamps, so the same inputs give byte-identical files. Any safetensors reader can open
the result.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import xxhash

from emo_assets.core.atomic import publish, temp_path_for

FORMAT_NAME = "emo_assets.activations"
FORMAT_VERSION = "1"
ACTIVATION_KINDS = ("resid_post", "mlp_out", "attn_out")
CHECKSUM_KEY = "data_xxh3_128"
_CHECKSUM_PLACEHOLDER = "0" * 32
_MAX_HEADER = 100 * 1024 * 1024
_READ_CHUNK = 16 * 1024 * 1024

# storage dtype name -> (safetensors dtype, itemsize)
STORAGE_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


class ActivationFileError(ValueError):
    """An activation file that cannot be trusted: truncated, corrupted, or not in this format."""


class ActivationWriteError(OSError):
    """Writing an activation file failed; the temp file is gone and any previous file is untouched."""


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset within the data section
    itemsize: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize

    def header(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.start, self.start + self.nbytes]}


def _layout(
    n_layers: int, n_tokens: int, d_model: int, n_sentences: int, kinds: Iterable[str], storage_dtype: str
) -> dict[str, _Entry]:
    """Tensor placement: the int64 index tensors first (8-byte aligned), then the activations by kind."""
    st_dtype, itemsize = STORAGE_DTYPES[storage_dtype]
    specs = [("input_ids", "I64", (n_tokens,), 8), ("offsets", "I64", (n_sentences + 1,), 8)]
    specs += [(kind, st_dtype, (n_layers, n_tokens, d_model), itemsize) for kind in kinds]
    entries, start = {}, 0
    for name, dtype, shape, size in specs:
        entries[name] = _Entry(name, dtype, shape, start, size)
        start += entries[name].nbytes
    return entries


def _encode_header(entries: Mapping[str, _Entry], metadata: Mapping[str, str]) -> bytes:
    header = {name: entry.header() for name, entry in entries.items()}
    header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class ActivationWriter:
    """Streams one activation file. Use as a context manager; `commit()` publishes it atomically.

    `offsets` and `input_ids` (dataset order) fix every row's position before any activation arrives.
    `write_batch` takes, per kind, an array [n_layers, batch_tokens, d_model] whose rows are the batch's
    sentences packed one after another, with `sentence_indices` / `lengths` saying which and how long.
    """

    def __init__(
        self,
        final_path: str | os.PathLike,
        *,
        n_layers: int,
        d_model: int,
        kinds: Iterable[str],
        offsets: np.ndarray,
        input_ids: np.ndarray,
        storage_dtype: str,
        metadata: Mapping[str, str],
    ) -> None:
        self.final_path = Path(final_path)
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(ACTIVATION_KINDS)
        if unknown:
            raise ValueError(f"unknown activation kinds {sorted(unknown)}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        self.n_tokens = int(self.offsets[-1])
        if len(input_ids) != self.n_tokens or self.offsets[0] != 0 or np.any(np.diff(self.offsets) <= 0):
            raise ValueError("offsets must start at 0, increase strictly and end at len(input_ids)")
        self.n_layers, self.d_model = n_layers, d_model
        self.storage_dtype = storage_dtype
        self._row_bytes = d_model * STORAGE_DTYPES[storage_dtype][1]
        self.entries = _layout(n_layers, self.n_tokens, d_model, len(self.offsets) - 1, self.kinds, storage_dtype)
        meta = {str(k): str(v) for k, v in metadata.items()}
        meta.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            dtype=storage_dtype,
            n_layers=str(n_layers),
            d_model=str(d_model),
            n_sentences=str(len(self.offsets) - 1),
            n_tokens=str(self.n_tokens),
            kinds=json.dumps(list(self.kinds)),
        )
        meta[CHECKSUM_KEY] = _CHECKSUM_PLACEHOLDER
        self._metadata = meta
        self._header = _encode_header(self.entries, meta)
        self._data_start = len(self._header)
        self._data_size = sum(e.nbytes for e in self.entries.values())
        self._written = {kind: 0 for kind in self.kinds}
        self._temp: Path | None = None
        self._fd: int | None = None
        self._input_ids = input_ids

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationWriter":
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = temp_path_for(self.final_path)
        self._fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._guard(self._allocate)
        self._pwrite(self._header, 0)
        self._pwrite(self._input_ids.tobytes(), self._data_start + self.entries["input_ids"].start)
        self._pwrite(self.offsets.tobytes(), self._data_start + self.entries["offsets"].start)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _allocate(self) -> None:
        """Reserve the whole file up front, so a full disk fails now rather than mid-way (where supported)."""
        size = self._data_start + self._data_size
        try:
            os.posix_fallocate(self._fd, 0, size)
        except (AttributeError, OSError) as exc:
            if getattr(exc, "errno", None) not in (None, 95, 22):  # not "unsupported": a real error
                raise
            os.ftruncate(self._fd, size)

    def abort(self) -> None:
        """Close and delete the temp file; the final path is untouched."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._temp.unlink()
            self._temp = None

    def _guard(self, action, *args) -> None:
        try:
            action(*args)
        except OSError as exc:
            self.abort()
            raise ActivationWriteError(exc.errno, f"{self.final_path}: write failed: {exc.strerror or exc}") from exc

    def _pwrite(self, data, position: int) -> None:
        view = memoryview(data).cast("B")

        def write() -> None:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], position + done)

        self._guard(write)

    # -- data ------------------------------------------------------------------------------------------
    def write_batch(
        self, activations: Mapping[str, np.ndarray], sentence_indices: Iterable[int], lengths: Iterable[int]
    ) -> None:
        """Place a batch's rows at their dataset-order positions. Arrays must be C-contiguous raw storage
        (float32/float16, or bfloat16 bits as uint16/int16) shaped [n_layers, sum(lengths), d_model]."""
        indices, lengths = list(sentence_indices), list(lengths)
        for kind in self.kinds:
            array = activations[kind]
            if array.shape != (self.n_layers, sum(lengths), self.d_model) or array.itemsize * self.d_model != self._row_bytes:
                raise ValueError(f"{kind}: batch array of shape {array.shape}/{array.dtype} does not fit the file")
            array = np.ascontiguousarray(array)
            base = self._data_start + self.entries[kind].start
            for layer in range(self.n_layers):
                layer_base = base + layer * self.n_tokens * self._row_bytes
                row = 0
                for index, length in zip(indices, lengths):
                    if int(self.offsets[index + 1] - self.offsets[index]) != length:
                        raise ValueError(f"sentence {index}: got {length} rows, the file expects a different count")
                    self._pwrite(array[layer, row : row + length], layer_base + int(self.offsets[index]) * self._row_bytes)
                    row += length
            self._written[kind] += sum(lengths) * self.n_layers

    def commit(self) -> Path:
        """Check completeness, patch the checksum, fsync, rename over the final path. Returns the path."""
        expected = self.n_tokens * self.n_layers
        missing = {k: expected - n for k, n in self._written.items() if n != expected}
        if missing:
            self.abort()
            raise ValueError(f"{self.final_path}: incomplete activation file, rows missing per kind: {missing}")
        try:
            self._metadata[CHECKSUM_KEY] = _hash_data(self._fd, self._data_start, self._data_size)
        except OSError as exc:
            self.abort()
            raise ActivationWriteError(exc.errno, f"{self.final_path}: read-back failed: {exc}") from exc
        header = _encode_header(self.entries, self._metadata)
        assert len(header) == self._data_start, "checksum must not change the header length"
        self._pwrite(header, 0)
        self._guard(os.fsync, self._fd)
        os.close(self._fd)
        self._fd = None
        temp, self._temp = self._temp, None
        publish(temp, self.final_path)
        return self.final_path


def _hash_data(fd: int, start: int, size: int) -> str:
    """xxh3-128 of the data section, read back in chunks (it is still in the page cache after writing)."""
    digest = xxhash.xxh3_128()
    position, end = start, start + size
    while position < end:
        chunk = os.pread(fd, min(_READ_CHUNK, end - position), position)
        if not chunk:
            break
        digest.update(chunk)
        position += len(chunk)
    return digest.hexdigest()


def write_activation_file(
    final_path: str | os.PathLike,
    activations: Mapping[str, np.ndarray],
    *,
    offsets: np.ndarray,
    input_ids: np.ndarray,
    storage_dtype: str,
    metadata: Mapping[str, str],
) -> Path:
    """Write a whole file from in-memory arrays [n_layers, n_tokens, d_model] (tests, small tools)."""
    first = next(iter(activations.values()))
    n_layers, n_tokens, d_model = first.shape
    with ActivationWriter(
        final_path, n_layers=n_layers, d_model=d_model, kinds=list(activations), offsets=offsets,
        input_ids=input_ids, storage_dtype=storage_dtype, metadata=metadata,
    ) as writer:
        lengths = np.diff(offsets).tolist()
        writer.write_batch(activations, range(len(lengths)), lengths)
        return writer.commit()


class ActivationFile:
    """Lazy, memory-mapped reader of one activation file.

    Opening parses and checks the header (size, offsets, format); `verify=True` (the default) also hashes the
    data section against the stored checksum, so a truncated or bit-flipped file raises `ActivationFileError`
    instead of feeding silent garbage into the analysis. Arrays come back as float32.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        try:
            self._size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise ActivationFileError(f"{self.path}: truncated: {len(prefix)} bytes, not a safetensors file")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > _MAX_HEADER or 8 + header_len > self._size:
                    raise ActivationFileError(f"{self.path}: truncated or corrupt header (length {header_len})")
                header = json.loads(handle.read(header_len).decode("utf-8"))
        except OSError as exc:
            raise ActivationFileError(f"{self.path}: cannot open activation file: {exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ActivationFileError(f"{self.path}: corrupt header: {exc}") from exc
        self._data_start = 8 + header_len
        self.metadata: dict[str, str] = header.pop("__metadata__", {})
        if self.metadata.get("format") != FORMAT_NAME or self.metadata.get("format_version") != FORMAT_VERSION:
            raise ActivationFileError(
                f"{self.path}: not an emo_assets activation file of format version {FORMAT_VERSION} "
                f"(format={self.metadata.get('format')!r}, version={self.metadata.get('format_version')!r})"
            )
        self._entries = header
        data_end = max(e["data_offsets"][1] for e in header.values())
        if self._data_start + data_end != self._size:
            raise ActivationFileError(
                f"{self.path}: truncated or padded: header describes {self._data_start + data_end} bytes, "
                f"file has {self._size}"
            )
        self.n_layers = int(self.metadata["n_layers"])
        self.d_model = int(self.metadata["d_model"])
        self.dtype = self.metadata["dtype"]
        self.kinds = [k for k in ACTIVATION_KINDS if k in header]
        self.offsets = np.asarray(self._map("offsets"))
        self.input_ids = self._map("input_ids")
        self.n_sentences = len(self.offsets) - 1
        self.n_tokens = int(self.offsets[-1])
        if np.any(np.diff(self.offsets) <= 0) or self.offsets[0] != 0 or len(self.input_ids) != self.n_tokens:
            raise ActivationFileError(f"{self.path}: offsets are not strictly increasing from 0 to n_tokens")
        if verify:
            self.verify()

    def _map(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}[entry["dtype"]]
        return np.memmap(
            self.path, mode="r", dtype=dtype, offset=self._data_start + entry["data_offsets"][0],
            shape=tuple(entry["shape"]),
        )

    def verify(self) -> None:
        """Hash the data section and compare with the stored checksum; raise `ActivationFileError` on mismatch."""
        expected = self.metadata.get(CHECKSUM_KEY)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            actual = _hash_data(fd, self._data_start, self._size - self._data_start)
        finally:
            os.close(fd)
        if actual != expected:
            raise ActivationFileError(
                f"{self.path}: checksum mismatch (stored {expected}, computed {actual}): the file is corrupt; "
                "delete it and extract again"
            )

    # -- access ----------------------------------------------------------------------------------------
    @property
    def sentence_ids(self) -> list[str]:
        return json.loads(self.metadata["sentence_ids"])

    def _check(self, kind: str, layer: int) -> None:
        if kind not in self.kinds:
            raise KeyError(f"{self.path}: no {kind!r} activations (file has {self.kinds})")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"{self.path}: layer {layer} out of range for {self.n_layers} layers")

    def raw(self, kind: str) -> np.ndarray:
        """The memory-mapped tensor [n_layers, n_tokens, d_model] in its stored dtype (bfloat16 as uint16)."""
        self._check(kind, 0)
        return self._map(kind)

    def layer(self, kind: str, layer: int) -> np.ndarray:
        """All token rows of one layer, float32 [n_tokens, d_model]."""
        self._check(kind, layer)
        return _to_float32(self._map(kind)[layer], self.dtype)

    def sentence_end(self, kind: str, layer: int) -> np.ndarray:
        """The last real token of every sentence, dataset order: float32 [n_sentences, d_model]."""
        self._check(kind, layer)
        return _to_float32(self._map(kind)[layer, self.offsets[1:] - 1], self.dtype)

    def sentence(self, kind: str, layer: int, index: int) -> np.ndarray:
        """One sentence's token rows, float32 [n_tokens_i, d_model]."""
        self._check(kind, layer)
        start, end = self.offsets[index], self.offsets[index + 1]
        return _to_float32(self._map(kind)[layer, start:end], self.dtype)

    def sentence_slices(self) -> list[slice]:
        return [slice(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def _to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)
