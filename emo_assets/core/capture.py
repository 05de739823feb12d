"""Capturing module outputs during a forward pass, on the host (zero-copy) or on an accelerator.

* `HostCapture` (CPU): the hooks keep references to the modules' output tensors and the writer writes every
  sentence's real rows straight out of them (no gather, no staging copy). The forward runs under `torch.no_grad`
  so that version counters prove nothing modified a captured tensor in place afterwards (if something did, the
  batch is recomputed with copying hooks).
* `DeviceCapture` (accelerator, and any device when only some positions are stored): each hook gathers the
  stored rows on the device (`index_select`; for `positions = mean` then a float32 sum per sentence, divided by its
  token count) into a per-batch buffer in the storage dtype; one asynchronous copy per kind into pinned host
  memory, one event wait per batch (on the writer thread), host buffers recycled from a pool of two.

Both count non-finite values per output file (a batch may hold sentences of several files).
"""

from __future__ import annotations

import ctypes
import queue
import sys
from collections.abc import Mapping

import numpy as np
import torch

from emo_assets.core.layers import first_tensor

# glibc mallopt parameters (malloc.h) and the values `retain_freed_memory` sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_RETAIN = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 64 * 2**20))


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS (Linux; elsewhere a
    no-op returning False). Process-wide and idempotent.

    Why: the zero-copy capture keeps a batch's module outputs alive until the writer has written them, so the next
    forward cannot reuse that memory at once; by default malloc then serves the large blocks with fresh `mmap`s and
    trims the heap when they are freed, and every batch faults in and zeroes its pages again (measured on the
    benchmark: the capture's whole overhead over the bare forward). Served from a heap that is not trimmed, the
    pages are reused. Peak RSS is unchanged; RSS stays at its peak instead of shrinking between batches."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _RETAIN)


class HostCapture:
    """CPU capture without copies: each hook keeps a reference to the module's output tensor ([batch, width,
    d_model], right-padded) and the writer writes every sentence's real rows straight out of it.

    Why this is safe: the forward runs under `torch.no_grad()` (not `inference_mode`), so tensors keep their
    version counters; after the forward every captured tensor's version is compared with the one seen by the
    hook. A model that modified a captured tensor in place afterwards (none of the supported ones does) is
    detected, and the batch is run again with copying hooks (`copy=True`) for the rest of the extraction.
    When the storage dtype differs from the compute dtype the hook converts (a new tensor: nothing to verify).
    """

    def __init__(self, modules: Mapping[str, list], storage: torch.dtype) -> None:
        self.modules = modules
        self.storage = storage
        self.copy = False
        self.batch_shape: tuple[int, ...] = ()
        self.outputs: dict[str, list] = {}
        self.versions: list[tuple[torch.Tensor, int]] = []

    def hook(self, kind: str, layer: int):
        def hook(module, args, output) -> None:
            hidden = first_tensor(output)
            if hidden.shape[:-1] != self.batch_shape:  # e.g. a module that returns [batch * width, d_model]
                hidden = hidden.reshape(*self.batch_shape, hidden.shape[-1])
            if hidden.dtype != self.storage:
                hidden = hidden.to(self.storage)
            elif self.copy:
                hidden = hidden.clone()
            if hidden.stride(-1) != 1 or hidden.stride(-2) != hidden.shape[-1]:  # rows must be contiguous runs
                hidden = hidden.contiguous()
            self.versions.append((hidden, hidden._version))  # may alias the model's tensor: checked after forward
            self.outputs[kind][layer] = hidden

        return hook

    def start(self, batch_shape: torch.Size) -> None:
        self.batch_shape = tuple(batch_shape)
        self.outputs = {kind: [None] * len(modules) for kind, modules in self.modules.items()}
        self.versions = []

    def intact(self) -> bool:
        return all(tensor._version == version for tensor, version in self.versions)

    def count_nonfinite(self, lengths: torch.Tensor) -> np.ndarray:
        """Non-finite values among each batch row's real tokens [batch]. One fp32 sum per tensor first: a finite
        sum means all values are finite."""
        tensors = [t for layers in self.outputs.values() for t in layers]
        total = torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
        if bool(torch.isfinite(total)):
            return np.zeros(len(lengths), dtype=np.int64)
        real = (torch.arange(tensors[0].shape[1])[None, :] < lengths[:, None])[..., None]
        return sum((~torch.isfinite(t) & real).sum(dim=(1, 2)) for t in tensors).numpy()

    def arrays(self) -> dict[str, list[np.ndarray]]:
        return {kind: [storage_numpy(t) for t in layers] for kind, layers in self.outputs.items()}


class DeviceCapture:
    """Accelerator capture: each hook gathers the real-token rows on the device (one `index_select`) into a
    per-batch device buffer [n_layers, n_real, d_model] in the storage dtype; after the forward one asynchronous
    copy per kind moves it into a pinned host buffer, and the writer thread waits on that copy's event before it
    writes (the only synchronisation per batch). Host buffers come from a small pool, so the forward of the next
    batch runs while this one is copied and written. Non-finite values are counted on the device and read once."""

    POOL = 2

    def __init__(
        self,
        modules: Mapping[str, list],
        storage: torch.dtype,
        device: torch.device,
        d_model: int,
        max_rows: int,
        n_groups: int = 1,
    ) -> None:
        self.modules = modules
        self.storage = storage
        self.device = device
        self.rows: torch.Tensor | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        n_layers = len(next(iter(modules.values())))
        pin = device.type == "cuda"
        self.pool: queue.Queue = queue.Queue()
        for _ in range(self.POOL):
            self.pool.put(
                {kind: torch.empty(n_layers * max_rows * d_model, dtype=storage, pin_memory=pin) for kind in modules}
            )
        self.nonfinite = torch.zeros(n_groups, dtype=torch.int64, device=device)  # per output file
        self.row_groups: torch.Tensor | None = None
        self.segments: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def hook(self, kind: str, layer: int):
        def hook(module, args, output) -> None:
            hidden = first_tensor(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if self.segments is not None:
                gathered = torch.index_select(flat, 0, self.rows).float()
                sums = torch.zeros((len(self.counts), flat.shape[-1]), dtype=torch.float32, device=flat.device)
                sums.index_add_(0, self.segments, gathered)
                self.buffers[kind][layer].copy_(sums / self.counts[:, None])
            elif flat.dtype == self.storage:
                torch.index_select(flat, 0, self.rows, out=self.buffers[kind][layer])
            else:
                self.buffers[kind][layer].copy_(torch.index_select(flat, 0, self.rows))

        return hook

    def start(
        self,
        rows: torch.Tensor,
        row_groups: torch.Tensor,
        n_layers: int,
        d_model: int,
        segments: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> None:
        """`rows`: the stored rows' positions in the flattened padded batch; `row_groups`: each stored row's output
        file. For a mean per sentence, `segments` gives each gathered row's output row and `counts` (float32) the
        number of gathered rows of each output row."""
        self.rows, self.row_groups = rows, row_groups
        self.segments, self.counts = segments, counts
        n_out = len(rows) if counts is None else len(counts)
        self.buffers = {
            kind: torch.empty((n_layers, n_out, d_model), dtype=self.storage, device=self.device)
            for kind in self.modules
        }

    def to_host(self):
        """Start the device->host copies; return (arrays, ready, release) for `ActivationWriter.write_batch`."""
        host = self.pool.get()  # blocks while both host buffers are still being written
        arrays = {}
        for kind, buffer in self.buffers.items():
            self.nonfinite.index_add_(0, self.row_groups, (~torch.isfinite(buffer)).sum(dim=(0, 2)))
            target = host[kind][: buffer.numel()].view(buffer.shape)
            target.copy_(buffer, non_blocking=True)
            arrays[kind] = storage_numpy(target)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
        else:
            ready = None
        self.buffers = {}
        return arrays, ready, lambda: self.pool.put(host)


class Countdown:
    """Calls `action` after `count` calls of `done` (a batch's host buffer, shared by several files' writers)."""

    def __init__(self, count: int, action) -> None:
        self.count, self.action = count, action

    def done(self) -> None:
        self.count -= 1
        if self.count == 0 and self.action is not None:
            self.action()


def storage_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor's raw storage values (bfloat16 as int16 bits)."""
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


class Hooks:
    """Registers one capture's hooks on every (kind, layer) module; removes them on exit."""

    def __init__(self, capture, modules: Mapping[str, list]) -> None:
        self.capture, self.modules, self.handles = capture, modules, []

    def __enter__(self) -> Hooks:
        for kind, modules in self.modules.items():
            for layer, module in enumerate(modules):
                self.handles.append(module.register_forward_hook(self.capture.hook(kind, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a synchronisation: from pinned memory, asynchronously (CUDA); plain `.to` elsewhere."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
