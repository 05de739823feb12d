"""The streaming writer of activation files: rows arrive batch by batch and go straight to their final place.

Why a writer of our own instead of `safetensors.numpy.save_file`: `save_file` needs every tensor in memory at
once, so peak memory would grow with the dataset. Tokenization happens first, so every tensor's shape is known
before the first forward pass; the header is written up front and each batch's rows are `pwrite`-n straight to
their final position (sentences may be processed in length-sorted batches but land in dataset order). The data
section is hashed (xxh3-128) after the last batch and the digest patched into the fixed-width checksum field, so a
truncated or bit-flipped file is detected by `ActivationFile.verify`. The file is written to a temp file next
to the final path and renamed only after fsync (see `emo_assets.core.atomic`).

Writes can run on a writer thread (and a pool of copy threads), rows of neighbouring sentences go out in one
`pwritev`, writeback to disk is started after every batch, and at commit the read-back hash (zero-copy, through
memory-map windows) runs while the data is fsynced. See `benchmarks/` for what each costs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from emo_assets.core.activations import fileio
from emo_assets.core.activations.format import ActivationHeader, encode_header, layout
from emo_assets.core.atomic import publish, temp_path_for
from emo_assets.core.dtypes import dtype


class ActivationWriteError(OSError):
    """Writing an activation file failed; the temp file is gone and any previous file is untouched."""


class ActivationWriter:
    """Streams one activation file. Use as a context manager; `commit()` publishes it atomically.

    `offsets` (rows) and `input_ids` (dataset order) fix every row's position before any activation arrives;
    `token_offsets` says which tokens each sentence owns when that differs from its rows (`positions` other than
    `all`; None: the tokens are the rows). `header` describes the file (its `n_sentences`, `n_tokens`, `n_rows` and
    checksum are filled in here; `self.header` is the final one after `commit`). `n_layers` is the number of stored
    layers (`header.stored_layers`).
    `write_batch` takes, per kind, the batch's rows and writes each sentence's rows at its dataset-order position
    (see `write_batch` for the two accepted layouts).

    With `background=True` the writes run on one writer thread, so `pwrite` (the copy into the page cache) overlaps
    the caller's next forward pass; `write_batch` then returns once the batch is validated and queued.
    `write_threads > 1` spreads each batch's (kind, layer) row groups over that many threads (for machines with
    cores to spare, e.g. when a GPU does the compute). At most
    `queue_depth` batches are queued or being written (`write_batch` waits for a slot), so memory stays bounded:
    with the default 1, the batch being written plus the one the caller is computing. The caller must
    not modify the arrays it handed over until they are written (`release` says when). A write error on the thread
    is raised by the next `write_batch` or by `commit`, and the temp file is removed.
    With `early_writeback` (default), after every batch the kernel is asked to start writing the dirty pages back
    (`sync_file_range`, Linux, from a helper thread so that a full disk queue never stalls the writer), so the disk
    works while the caller computes and the final `fsync` in `commit` finds little left to do. In `commit` the data is hashed while its fsync runs on another thread.
    """

    def __init__(
        self,
        final_path: str | os.PathLike,
        header: ActivationHeader,
        *,
        offsets: np.ndarray,
        input_ids: np.ndarray,
        token_offsets: np.ndarray | None = None,
        background: bool = False,
        queue_depth: int = 1,
        write_threads: int = 1,
        early_writeback: bool = True,
    ) -> None:
        self.final_path = Path(final_path)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        self.n_rows = int(self.offsets[-1])
        tokens = self.offsets if token_offsets is None else np.ascontiguousarray(token_offsets, dtype=np.int64)
        for name, bounds, end in (("offsets", self.offsets, None), ("token_offsets", tokens, len(input_ids))):
            if (
                bounds[0] != 0
                or np.any(np.diff(bounds) <= 0)
                or len(bounds) != len(self.offsets)
                or end not in (None, bounds[-1])
            ):
                raise ValueError(f"{name} must start at 0, increase strictly and end at len(input_ids)")
        if (token_offsets is not None) != header.has_token_offsets:
            raise ValueError(f"token_offsets are needed exactly when positions is not 'all' (got {header.positions})")
        self._token_offsets = None if token_offsets is None else tokens
        self.header = header.with_shape(len(self.offsets) - 1, len(input_ids), self.n_rows)
        self.kinds = self.header.kinds if self.header.shards is None else ()  # a manifest holds no activations
        self.n_layers, self.d_model = len(header.stored_layers), header.d_model
        self.storage_dtype = header.storage_dtype
        self._row_bytes = self.d_model * dtype(self.storage_dtype).itemsize
        self.entries = layout(self.header)
        self._header = encode_header(self.entries, self.header)
        self._data_start = len(self._header)
        self._data_size = sum(e.nbytes for e in self.entries.values())
        self._written = dict.fromkeys(self.kinds, 0)
        self._temp: Path | None = None
        self._fd: int | None = None
        self._input_ids = input_ids
        self._lengths = np.diff(self.offsets)
        self._background = background
        self._queue_depth = max(1, int(queue_depth))
        self._queue: queue.Queue | None = None
        self._slots: threading.Semaphore | None = None
        self._thread: threading.Thread | None = None
        self._write_threads = max(1, int(write_threads))
        self._early_writeback = early_writeback
        self._kick: fileio.Call | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self.timings = {"write_s": 0.0, "hash_s": 0.0, "fsync_s": 0.0, "publish_s": 0.0, "queue_wait_s": 0.0}

    @property
    def file_bytes(self) -> int:
        """The size of the file this writer publishes (known before anything is written)."""
        return self._data_start + self._data_size

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> ActivationWriter:
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = temp_path_for(self.final_path)
        self._fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._guard(self._allocate)
        self._pwrite(self._header, 0)
        self._pwrite(self._input_ids.tobytes(), self._data_start + self.entries["input_ids"].start)
        self._pwrite(self.offsets.tobytes(), self._data_start + self.entries["offsets"].start)
        if self._token_offsets is not None:
            self._pwrite(self._token_offsets.tobytes(), self._data_start + self.entries["token_offsets"].start)
        if self._write_threads > 1:
            self._pool = ThreadPoolExecutor(
                self._write_threads,
                thread_name_prefix="ActivationWriter-pwrite",
                initializer=fileio.lower_thread_priority,
            )
        if self._background:
            self._queue = queue.Queue()
            self._slots = threading.Semaphore(self._queue_depth)
            self._thread = threading.Thread(
                target=self._run, name=f"ActivationWriter[{self.final_path.name}]", daemon=True
            )
            self._thread.start()
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
        """Stop the writer thread, close and delete the temp file; the final path is untouched."""
        self._stop_thread(drop_pending=True)
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
        self._guard(fileio.pwrite_all, self._fd, data, position)

    # -- writer thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        fileio.lower_thread_priority()
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is not None:  # failed earlier: drain without writing, but still release buffers
                    fileio.call_quietly(job[2])
                else:
                    self._execute(*job)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                self._error = exc
            finally:
                del job  # drop the batch's arrays before waiting for the next one
                self._slots.release()

    def _kick_writeback(self) -> None:
        """Start writeback of the dirty pages on a helper thread: `sync_file_range` blocks while the disk queue is
        full, and the writer must not (it would stall the caller). Skipped while the previous kick still runs."""
        if self._kick is None or not self._kick.is_alive():
            self._kick = fileio.Call(fileio.start_writeback, self._fd)

    def _stop_thread(self, drop_pending: bool) -> None:
        if self._thread is not None:
            if drop_pending and self._error is None:
                self._error = ActivationWriteError(0, f"{self.final_path}: aborted")
            self._queue.put(None)
            self._thread.join()
            self._thread, self._queue = None, None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._kick is not None:  # it uses the file descriptor: done before the file is closed
            self._kick.join()
            self._kick = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            error = self._error
            self.abort()
            if isinstance(error, OSError):
                raise ActivationWriteError(
                    error.errno, f"{self.final_path}: write failed: {error.strerror or error}"
                ) from error
            raise error

    def _execute(self, units, ready, release) -> None:
        try:
            if ready is not None:
                ready()
            started = time.perf_counter()
            if self._pool is None:
                for unit in units:
                    fileio.write_unit(self._fd, unit)
            else:  # (kind, layer) units spread over the pool: the page-cache copies run in parallel
                for future in [self._pool.submit(fileio.write_unit, self._fd, unit) for unit in units]:
                    future.result()
            if self._early_writeback:
                self._kick_writeback()
            self.timings["write_s"] += time.perf_counter() - started
        finally:
            if release is not None:
                release()

    # -- data ------------------------------------------------------------------------------------------
    def write_batch(
        self,
        activations: Mapping[str, np.ndarray],
        sentence_indices: Iterable[int],
        lengths: Iterable[int],
        *,
        padded: bool = False,
        ready: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Place a batch's rows at their dataset-order positions.

        Arrays hold raw storage values (float32/float16, or bfloat16 bits as uint16/int16), one per kind:
        * packed (default): [n_layers, sum(lengths), d_model], the batch's sentences one after another;
        * `padded=True`: [n_layers, batch, width, d_model] or a sequence of n_layers arrays [batch, width, d_model],
          right-padded: sentence j of the batch owns rows [j, :lengths[j]] (the padding is not written).
        `ready` is called (on the writer thread, if any) before the arrays are read, `release` after they are written.
        """
        indices = [int(i) for i in sentence_indices]
        lengths = [int(n) for n in lengths]
        if len(indices) != len(lengths):
            raise ValueError("sentence_indices and lengths differ in length")
        for index, length in zip(indices, lengths):
            if not 0 <= index < len(self._lengths) or int(self._lengths[index]) != length:
                raise ValueError(f"sentence {index}: got {length} rows, the file expects a different count")
        arrays = {}
        for kind in self.kinds:
            array = activations[kind]
            if padded:
                layers = [array[layer] for layer in range(self.n_layers)] if len(array) == self.n_layers else None
                if layers is None or any(
                    a.ndim != 3
                    or a.shape[0] != len(lengths)
                    or a.shape[1] < max(lengths, default=0)
                    or a.shape[2] != self.d_model
                    or a.itemsize * self.d_model != self._row_bytes
                    or not _rows_contiguous(a)
                    for a in layers
                ):
                    raise ValueError(f"{kind}: padded batch arrays do not fit the file")
                arrays[kind] = layers
            else:
                if (
                    array.shape != (self.n_layers, sum(lengths), self.d_model)
                    or array.itemsize * self.d_model != self._row_bytes
                ):
                    raise ValueError(f"{kind}: batch array of shape {array.shape}/{array.dtype} does not fit the file")
                # each layer's rows must be one run of memory; the layers need not be adjacent (a slice of a larger
                # batch buffer qualifies, and must not be copied here: it may still be filled by a device copy)
                arrays[kind] = array if _rows_contiguous(array) else np.ascontiguousarray(array)
        plan = self._plan(arrays, indices, lengths, padded)
        for kind in self.kinds:
            self._written[kind] += sum(lengths) * self.n_layers
        if self._thread is None:
            try:
                self._guard(self._execute, plan, ready, release)
            except ActivationWriteError:
                raise
            return
        self._raise_pending()
        waited = time.perf_counter()
        self._slots.acquire()  # at most `queue_depth` batches queued or being written
        self.timings["queue_wait_s"] += time.perf_counter() - waited
        self._queue.put((plan, ready, release))

    def _plan(self, arrays, indices: list[int], lengths: list[int], padded: bool) -> list[list[tuple]]:
        """One unit per (kind, layer): a list of (file position, [row buffers]) runs.

        Sentences of the batch that are neighbours in the dataset land next to each other in the file, so each
        run of consecutive dataset indices becomes one `pwritev` (one contiguous slice when the rows are also
        contiguous in a packed array). Length-sorted batches rarely have neighbours (about one call per
        sentence); dataset-order batches (the accelerator default) write one run per (kind, layer)."""
        runs: list[list] = []  # [first file row, [batch positions j], next dataset index]
        for j in sorted(range(len(indices)), key=indices.__getitem__):
            if runs and runs[-1][2] == indices[j]:
                runs[-1][1].append(j)
                runs[-1][2] += 1
            else:
                runs.append([int(self.offsets[indices[j]]), [j], indices[j] + 1])
        packed_rows = None if padded else np.cumsum([0, *lengths]).tolist()
        spans = []  # per run: the buffers' (j, start row, end row), contiguous packed rows merged
        for _, members, _ in runs:
            if padded:
                spans.append([(j, 0, lengths[j]) for j in members])
                continue
            merged: list[list[int]] = []
            for j in members:
                if merged and merged[-1][2] == packed_rows[j]:
                    merged[-1][2] = packed_rows[j + 1]
                else:
                    merged.append([None, packed_rows[j], packed_rows[j + 1]])
            spans.append(merged)
        layer_bytes = self.n_rows * self._row_bytes
        units = []
        for kind in self.kinds:
            base = self._data_start + self.entries[kind].start
            for layer in range(self.n_layers):
                layer_base = base + layer * layer_bytes
                source = arrays[kind][layer]
                if padded:
                    buffers = [[source[j, a:b] for j, a, b in run] for run in spans]
                else:
                    buffers = [[source[a:b] for _, a, b in run] for run in spans]
                units.append([(layer_base + run[0] * self._row_bytes, bufs) for run, bufs in zip(runs, buffers)])
        return units

    def commit(self) -> Path:
        """Check completeness, patch the checksum, fsync, rename over the final path. Returns the path."""
        self._stop_thread(drop_pending=False)
        self._raise_pending()
        expected = self.n_rows * self.n_layers
        missing = {k: expected - n for k, n in self._written.items() if n != expected}
        if missing:
            self.abort()
            raise ValueError(f"{self.final_path}: incomplete activation file, rows missing per kind: {missing}")
        started = time.perf_counter()
        # The data pages go to disk (fsync on a helper thread) while the same pages, still in the page cache,
        # are read back and hashed; then the header with the checksum is written and fsynced (one page left).
        syncing = fileio.Call(os.fsync, self._fd)
        try:
            digest = fileio.hash_own_file(self._fd, self._data_start, self._data_size)
        except OSError as exc:
            syncing.join()
            self.abort()
            raise ActivationWriteError(exc.errno, f"{self.final_path}: read-back failed: {exc}") from exc
        hashed = time.perf_counter()
        syncing.join()
        if syncing.error is not None:
            self.abort()
            raise ActivationWriteError(syncing.error.errno, f"{self.final_path}: fsync failed: {syncing.error}")
        self.header = replace(self.header, checksum=digest)
        header = encode_header(self.entries, self.header)
        assert len(header) == self._data_start, "checksum must not change the header length"
        self._pwrite(header, 0)
        self._guard(os.fsync, self._fd)
        synced = time.perf_counter()
        os.close(self._fd)
        self._fd = None
        try:
            publish(self._temp, self.final_path)
        except OSError as exc:
            self.abort()
            raise ActivationWriteError(exc.errno, f"{self.final_path}: rename into place failed: {exc}") from exc
        self._temp = None
        self.timings.update(hash_s=hashed - started, fsync_s=synced - hashed, publish_s=time.perf_counter() - synced)
        return self.final_path


def _rows_contiguous(array: np.ndarray) -> bool:
    """Each row along axis 1 of a [batch, width, d_model] or [n_layers, rows, d_model] array is one run of memory,
    and consecutive rows are adjacent."""
    return array.strides[2] == array.itemsize and array.strides[1] == array.itemsize * array.shape[2]


def write_activation_file(
    final_path: str | os.PathLike,
    activations: Mapping[str, np.ndarray],
    *,
    offsets: np.ndarray,
    input_ids: np.ndarray,
    header: ActivationHeader,
    token_offsets: np.ndarray | None = None,
) -> Path:
    """Write a whole file from in-memory arrays [len(layers), n_rows, d_model] of `header.kinds` (tests, tools)."""
    with ActivationWriter(
        final_path, header, offsets=offsets, input_ids=input_ids, token_offsets=token_offsets
    ) as writer:
        lengths = np.diff(offsets).tolist()
        writer.write_batch(activations, range(len(lengths)), lengths)
        return writer.commit()
