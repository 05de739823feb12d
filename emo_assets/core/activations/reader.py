"""Reading activation files: safetensors' own reader for the header and the tensors, plus the checksum.

`safetensors.safe_open` parses and validates the header and memory-maps the file; tensors are read through
`get_slice(kind)[layer, rows]`, so only the requested part is copied out. What is written here by hand is what
safetensors does not know: the header's meaning (`ActivationHeader`), the xxh3-128 checksum of the data section,
and bfloat16, which numpy cannot represent (those tensors are read through torch's view of the same file and
handed out as their raw 16-bit patterns or widened to float32).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
from safetensors import safe_open

from emo_assets.core import dtypes
from emo_assets.core.activations import fileio
from emo_assets.core.activations.format import ACTIVATION_KINDS, ActivationFileError, ActivationHeader
from emo_assets.core.dtypes import to_float32


class ActivationFile:
    """Reader of one activation file.

    Opening checks the header (format, version, tensors present, file size); `verify=True` (the default) also
    hashes the data section against the stored checksum, so a truncated or bit-flipped file raises
    `ActivationFileError` instead of feeding silent garbage into the analysis. Arrays come back as float32.
    `header` is the typed header; `metadata` the raw `__metadata__` strings.

    Every `layer` argument is a MODEL layer index (negative from the end); `layers` lists the stored ones and
    asking for another raises `KeyError` naming them. `offsets` delimit each sentence's rows, `token_offsets` its
    tokens in `input_ids` (the same array when `positions` is `all`).

    A sharded partition (a manifest at `path`, see `format`) reads as one file: opening checks that the shards
    listed are there, carry the checksums the manifest records and tile its rows; reads are served by the shards
    (`mapped` is then an in-memory concatenation, not a map).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True) -> None:
        self.path = Path(path)
        try:
            self._size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
        except OSError as exc:
            raise ActivationFileError(f"{self.path}: cannot open activation file: {exc}") from exc
        if len(prefix) < 8:
            raise ActivationFileError(f"{self.path}: truncated: {len(prefix)} bytes, not a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > self._size:
            raise ActivationFileError(f"{self.path}: truncated or corrupt header (length {header_len})")
        self._data_start = 8 + header_len
        try:
            self._handle = safe_open(self.path, framework="numpy")
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            names = set(self._handle.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for any malformed file
            raise ActivationFileError(f"{self.path}: truncated or corrupt: {exc}") from exc
        self.header = ActivationHeader.from_metadata(self.metadata, self.path)
        expected = {"input_ids", "offsets", *(self.header.kinds if self.header.shards is None else ())}
        if self.header.has_token_offsets:
            expected.add("token_offsets")
        if names != expected:
            raise ActivationFileError(
                f"{self.path}: tensors {sorted(names)} do not match the header's {sorted(expected)}"
            )
        self._torch_handle = None
        self._maps: dict[str, np.ndarray] = {}
        self._mmaps: dict[str, mmap.mmap] = {}
        self.kinds = [k for k in ACTIVATION_KINDS if k in self.header.kinds]
        self.offsets = self._handle.get_tensor("offsets")
        self.input_ids = self._handle.get_tensor("input_ids")
        self.token_offsets = self._handle.get_tensor("token_offsets") if self.header.has_token_offsets else self.offsets
        self.n_sentences = len(self.offsets) - 1
        self.n_tokens = len(self.input_ids)
        self.n_rows = int(self.offsets[-1]) if len(self.offsets) else 0
        self.layers: tuple[int, ...] = self.header.stored_layers
        self.positions: str = self.header.positions
        if (
            len(self.offsets) < 2
            or len(self.token_offsets) != len(self.offsets)
            or any(o[0] != 0 or np.any(np.diff(o) <= 0) for o in (self.offsets, self.token_offsets))
            or int(self.token_offsets[-1]) != self.n_tokens
            or (self.n_sentences, self.n_tokens, self.n_rows)
            != (self.header.n_sentences, self.header.n_tokens, self.header.rows)
        ):
            raise ActivationFileError(f"{self.path}: offsets are not strictly increasing from 0 to n_tokens / n_rows")
        self._shards = None if self.header.shards is None else self._open_shards(verify)
        if verify:
            self._verify_own()

    @property
    def n_layers(self) -> int:
        """The model's layer count (see `layers` for the stored ones)."""
        return self.header.n_layers

    @property
    def d_model(self) -> int:
        return self.header.d_model

    @property
    def dtype(self) -> str:
        """The storage dtype's name."""
        return self.header.storage_dtype

    @property
    def sentence_ids(self) -> list[str]:
        return list(self.header.sentence_ids or ())

    @property
    def files(self) -> list[Path]:
        """The files that hold this partition: the path itself, then its shards if any."""
        return [self.path, *(shard.path for _, shard in self._shards or ())]

    def _open_shards(self, verify: bool) -> list[tuple[int, ActivationFile]]:
        """(first row, reader) of each shard, each checked against the manifest."""
        shards, sentence = [], 0
        for ref in self.header.shards:
            where = f"{self.path}: shard {ref.path}"
            if ref.first != sentence or not ref.first < ref.end <= self.n_sentences:
                raise ActivationFileError(f"{where} holds sentences {ref.first}:{ref.end}, expected from {sentence}")
            shard = ActivationFile(self.path.parent / ref.path, verify=verify)
            rows = self.offsets[ref.first : ref.end + 1] - self.offsets[ref.first]
            if shard.header.checksum != ref.checksum:
                raise ActivationFileError(
                    f"{where} has checksum {shard.header.checksum}, the manifest records {ref.checksum}: it was "
                    "replaced after the manifest was written; extract the partition again"
                )
            same = ("kinds", "positions", "stored_layers", "d_model", "n_layers", "storage_dtype")
            if any(getattr(shard.header, a) != getattr(self.header, a) for a in same) or not np.array_equal(
                shard.offsets, rows
            ):
                raise ActivationFileError(f"{where} does not match the manifest's layout")
            shards.append((int(self.offsets[ref.first]), shard))
            sentence = ref.end
        if sentence != self.n_sentences:
            raise ActivationFileError(f"{self.path}: shards cover {sentence} of {self.n_sentences} sentences")
        return shards

    def verify(self) -> None:
        """Hash the data section (and every shard's) and compare with the stored checksums; raise
        `ActivationFileError` on mismatch."""
        self._verify_own()
        for _, shard in self._shards or ():
            shard.verify()

    def _verify_own(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            actual = fileio.hash_data(fd, self._data_start, self._size - self._data_start)
        finally:
            os.close(fd)
        if actual != self.header.checksum:
            raise ActivationFileError(
                f"{self.path}: checksum mismatch (stored {self.header.checksum}, computed {actual}): the file is "
                "corrupt; delete it and extract again"
            )

    # -- access ----------------------------------------------------------------------------------------
    def _check(self, kind: str, layer: int) -> int:
        """The stored position of model layer `layer` of `kind`."""
        if kind not in self.kinds:
            raise KeyError(f"{self.path}: no {kind!r} activations (file has {self.kinds})")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"{self.path}: layer {layer} out of range for {self.n_layers} layers")
        layer %= self.n_layers
        if layer not in self.layers:
            raise KeyError(f"{self.path}: layer {layer} is not stored (stored layers: {list(self.layers)})")
        return self.layers.index(layer)

    def _read(self, kind: str, index) -> np.ndarray:
        """`tensor[index]` in its stored values (bfloat16 as uint16 bits), read through safetensors. `index` is
        `slice(None)`, a stored layer position, or (stored layer position, row slice)."""
        if self._shards is not None:
            return self._read_shards(kind, index)
        if self.dtype != "bfloat16":
            return self._handle.get_slice(kind)[index]
        if self._torch_handle is None:
            self._torch_handle = safe_open(self.path, framework="pt")
        import torch

        return self._torch_handle.get_slice(kind)[index].view(torch.int16).numpy().view(np.uint16)

    def _read_shards(self, kind: str, index) -> np.ndarray:
        """`_read` of a sharded partition: the rows asked for, gathered from the shards that hold them."""
        layer, rows = index if isinstance(index, tuple) else (index, slice(None))
        start, stop, _ = rows.indices(self.n_rows)
        parts = []
        for first, shard in self._shards:
            a, b = max(start, first), min(stop, first + shard.n_rows)
            if a < b:
                parts.append(shard._read(kind, (layer, slice(a - first, b - first))))
        if not parts:
            return self._shards[0][1]._read(kind, (layer, slice(0, 0)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0 if isinstance(layer, int) else 1)

    def raw(self, kind: str) -> np.ndarray:
        """The whole tensor [len(layers), n_rows, d_model] in its stored dtype (bfloat16 as uint16)."""
        self._check(kind, self.layers[0])
        return self._read(kind, slice(None))

    def raw_rows(self, kind: str, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of one layer in the stored dtype (bfloat16 as uint16) [stop - start, d_model]."""
        return self._read(kind, (self._check(kind, layer), slice(start, stop)))

    def layer(self, kind: str, layer: int) -> np.ndarray:
        """All rows of one layer, float32 [n_rows, d_model]."""
        return to_float32(self._read(kind, self._check(kind, layer)), self.dtype)

    def sentence_end(self, kind: str, layer: int) -> np.ndarray:
        """The representative row of every sentence (its last row: the last real token, or the mean with
        `positions = mean`), dataset order: float32 [n_sentences, d_model]."""
        stored = self._check(kind, layer)
        if self._shards is not None:
            return np.concatenate([shard.sentence_end(kind, layer) for _, shard in self._shards])
        rows = self.mapped(kind)[stored, self.offsets[1:] - 1]  # fancy indexing: a copy
        self.release(kind)
        return to_float32(rows, self.dtype)

    def release(self, kind: str) -> None:
        """Unmap the pages of `kind`'s memory map that reads have brought in (`MADV_DONTNEED`): the file stays
        mapped and a later read faults them in again from the page cache, but a reader that has copied a layer
        out no longer holds that layer's pages in its resident memory. Views of the map stay valid."""
        if kind in self._mmaps:
            self._mmaps[kind].madvise(mmap.MADV_DONTNEED)
        for _, shard in self._shards or ():
            shard.release(kind)

    def sentence(self, kind: str, layer: int, index: int) -> np.ndarray:
        """One sentence's rows, float32 [n_rows_i, d_model] (its tokens' rows with `positions = all`)."""
        stored = self._check(kind, layer)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return to_float32(self._read(kind, (stored, slice(start, end))), self.dtype)

    def mapped(self, kind: str) -> np.ndarray:
        """The whole tensor [len(layers), n_rows, d_model] as a read-only memory map in its stored dtype (bfloat16
        as uint16): indexing it copies only the rows asked for, where `layer` copies a whole layer."""
        self._check(kind, self.layers[0])
        if self._shards is not None:
            return np.concatenate([shard.mapped(kind) for _, shard in self._shards], axis=1)
        if kind not in self._maps:
            with open(self.path, "rb") as handle:
                begin, _ = json.loads(handle.read(self._data_start)[8:])[kind]["data_offsets"]
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            shape = (len(self.layers), self.n_rows, self.d_model)
            raw = np.frombuffer(data, dtypes.dtype(self.dtype).numpy_raw, int(np.prod(shape)), self._data_start + begin)
            self._maps[kind], self._mmaps[kind] = raw.reshape(shape), data
        return self._maps[kind]

    def sentence_slices(self) -> list[slice]:
        return [slice(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]
