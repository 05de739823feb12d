"""Rows 2b and 2c: what capturing and durably writing row 2's rows costs by itself on this machine.

Both contenders run the forward with emo_assets' own capture (`HostCapture` under `torch.no_grad`, each batch's
outputs kept until written) and store exactly the bytes row 2 stores - every sentence's real rows of every layer
and kind, in the storage dtype - then fsync. They leave out everything that is not writing those bytes: no file
layout (rows go out in the order they arrive, not scattered to dataset order), no header, no checksum, no rename.

* 2b, page cache: one `pwritev` per captured tensor (its sentences' real rows) on the caller's thread after each
  forward, fsync at the end: the bytes through `ActivationWriter`'s I/O path, without its overlap.
* 2c, O_DIRECT: the rows copied into a page-aligned staging buffer and written with O_DIRECT on a thread while
  the next batch runs, two buffers in turn, fsync at the end: no page-cache copy and no writeback, the cheapest
  way of making these bytes durable that we measured here.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from benchmarks.contenders import Contender, Workload
from emo_assets.core.activations import BASE_KINDS, fileio
from emo_assets.core.capture import Hooks, HostCapture
from emo_assets.core.dtypes import dtype
from emo_assets.core.layers import find_hook_points

ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the device's block size


class WriteBound(Contender):
    """The capture + row 2's bytes written in arrival order + fsync (see the module doc)."""

    def __init__(self, work: Workload, direct: bool, storage_dtype: str = "float32") -> None:
        super().__init__(work)
        self.direct = direct
        self.storage = dtype(storage_dtype).torch()
        points = find_hook_points(work.loaded.model)
        self.modules = {kind: points.of_kind(kind) for kind in BASE_KINDS}  # row 2's kinds
        self.path = work.work_dir / f"write-bound-{'direct' if direct else 'buffered'}"
        row_bytes = work.loaded.d_model * dtype(storage_dtype).itemsize
        rows = max(sum(work.lengths[i] for i in batch) for batch in work.batches)
        self.capacity = -(-rows * len(points.blocks) * len(self.modules) * row_bytes // ALIGN) * ALIGN

    def setup(self) -> str | None:
        if self.direct:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                try:
                    os.pwrite(fd, mmap.mmap(-1, ALIGN), 0)
                finally:
                    os.close(fd)
                    self.path.unlink()
            except (AttributeError, OSError) as exc:
                return f"unavailable: O_DIRECT writes in {self.path.parent}: {exc}"
        self._pass(self.work.batches[:2])  # warm-up
        return None

    def _pass(self, batches) -> None:
        work = self.work
        capture = HostCapture(self.modules, self.storage)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)
        fd = os.open(self.path, flags, 0o644)
        writer = _StagedDirectWriter(fd, self.capacity) if self.direct else None
        written = 0
        try:
            with Hooks(capture, self.modules), torch.no_grad():
                for batch in batches:
                    ids, mask = work.padded(batch)
                    capture.start(ids.shape)
                    work.loaded.model(input_ids=ids, attention_mask=mask)
                    lengths = [work.lengths[i] for i in batch]
                    arrays = [a for layers in capture.arrays().values() for a in layers]
                    if writer is not None:
                        written += writer.write(arrays, lengths)
                        continue
                    for array in arrays:
                        rows = [array[j, :n] for j, n in enumerate(lengths)]
                        fileio.pwritev_all(fd, rows, written)
                        written += sum(r.nbytes for r in rows)
            if writer is not None:
                writer.finish()
            os.fsync(fd)
            self.extra["bytes_written"] = written  # without O_DIRECT's padding to a block
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)


class _StagedDirectWriter:
    """Two page-aligned staging buffers in turn: the caller fills one while a thread writes the other."""

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd, self.position = fd, 0
        self.buffers = [mmap.mmap(-1, capacity) for _ in range(2)]  # anonymous maps are page-aligned
        self.writes: list[fileio.Call | None] = [None, None]
        self.turn = 0

    def write(self, arrays: list[np.ndarray], lengths: list[int]) -> int:
        """Stage the sentences' real rows of every array and start writing them; returns their bytes."""
        slot = self.turn % 2
        self.turn += 1
        self._wait(slot)  # this buffer's previous write
        staged = np.frombuffer(self.buffers[slot], dtype=np.uint8)
        used = 0
        for array in arrays:
            for j, n in enumerate(lengths):
                rows = array[j, :n].reshape(-1).view(np.uint8)
                staged[used : used + rows.size] = rows
                used += rows.size
        size = -(-used // ALIGN) * ALIGN
        self.writes[slot] = fileio.Call(
            fileio.pwrite_all, self.fd, memoryview(self.buffers[slot])[:size], self.position
        )
        self.position += size
        return used

    def _wait(self, slot: int) -> None:
        call = self.writes[slot]
        if call is not None:
            call.join()
            self.writes[slot] = None
            if call.error is not None:
                raise call.error

    def finish(self) -> None:
        for slot in range(2):
            self._wait(slot)
