"""Batched, exact activation extraction with forward hooks, streamed to an activation file.

How and why:
* All texts are tokenized first (cheap), so every row's position in the output file is known up front.
* Batches are right-padded with an attention mask. For causal models right padding is exact (real tokens never
  attend to pads, position ids start at 0 in every row), so a sentence's activations are the same alone or in a
  batch. Padding is found by the mask, never by token id (GPT-2's pad = eos = bos). On the CPU sentences are
  sorted by length first (least padding: compute is the cost); on an accelerator batches keep dataset order
  (padding is cheap there, and each batch's rows are then one contiguous run per layer in the file: writing is
  the cost). `ExtractionOptions.length_sorted` overrides.
* Forward hooks on each block (residual stream after the block), each MLP and, if asked, each attention
  module. `hidden_states` is not used: its last entry is post final-norm.
  - CPU: zero-copy. The hooks keep references to the modules' output tensors and the writer writes every
    sentence's real rows straight out of them (no gather, no staging copy); the forward runs under
    `torch.no_grad` so that version counters prove nothing modified a captured tensor in place afterwards
    (if something did, the batch is recomputed with copying hooks).
  - Accelerator: each hook gathers the real rows on the device (`index_select`) into a per-batch buffer in the
    storage dtype; one asynchronous copy per kind into pinned host memory, one event wait per batch (on the
    writer thread), host buffers recycled from a pool of two.
* Each batch is handed to the `ActivationWriter`, which writes its rows at their dataset-order positions on a
  writer thread (overlapping the next forward), at most one batch behind, so peak memory is two batches,
  whatever the dataset size. Non-finite values are counted (one fp32 sum per tensor; exact count only if the
  sum is not finite).
* Base model, compute dtype as loaded (fp32 default), storage dtype configurable. `ExtractionResult.timings`
  says where the time went.
"""

from __future__ import annotations

import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_assets import __version__
from emo_assets.core.layers import find_hook_points, first_tensor
from emo_assets.core.models import LoadedModel
from emo_assets.core.storage import ActivationWriter

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Devices whose module outputs the writer can read directly (zero-copy capture); any other device gathers the
# real rows on the device and copies them to (pinned) host buffers. Tests empty it to run that path on the CPU.
HOST_DEVICES = ("cpu",)


class ExtractionError(ValueError):
    """Input that cannot be extracted (empty sentence, longer than the model's context, ...)."""


@dataclass(frozen=True)
class ExtractionOptions:
    batch_size: int = 32
    prepend_bos: bool = False
    attention: bool = False
    storage_dtype: str = "float32"
    progress: bool = False
    truncate: bool = False  # cut sentences longer than the context instead of failing
    background_write: bool = True  # pwrite on a writer thread, overlapping the next forward pass
    write_threads: int = 0  # threads copying rows into the file; 0 = auto (1 on CPU, up to 8 with an accelerator)
    # Batch composition: True = sentences sorted by length (least padding: the CPU default), False = dataset order
    # (each batch's rows are one contiguous run per layer in the file: few large writes, the accelerator default,
    # where padding costs little); None = by device.
    length_sorted: bool | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("resid_post", "mlp_out", "attn_out") if self.attention else ("resid_post", "mlp_out")


@dataclass(frozen=True)
class ExtractionResult:
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
    # where the time went (seconds): tokenize, forward, capture (checks + hand-over), write (pwrite, writer
    # thread), queue_wait, hash, fsync, publish; the writer thread's time overlaps the forward passes.
    timings: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def samples_per_s(self) -> float:
        return self.n_sentences / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def bos_token_id(tokenizer) -> int:
    """The id prepended with `prepend_bos`: BOS for decoders, CLS for BERT-style encoders."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if token is None:
        raise ExtractionError("prepend_bos requested but the tokenizer has neither a BOS nor a CLS token")
    return int(token)


def tokenize(
    loaded: LoadedModel, texts: Sequence[str], sentence_ids: Sequence[str], prepend_bos: bool, truncate: bool = False
) -> list[list[int]]:
    """Token ids of every text, no padding, no special tokens except the optional BOS; checked against context."""
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if prepend_bos:
        bos = bos_token_id(loaded.tokenizer)
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
    return [list(range(i, min(i + options.batch_size, len(lengths)))) for i in range(0, len(lengths), options.batch_size)]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length, longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class _HostCapture:
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

    def count_nonfinite(self, lengths: torch.Tensor) -> int:
        """Non-finite values among the real rows. One fp32 sum per tensor first: finite sum => all finite."""
        tensors = [t for layers in self.outputs.values() for t in layers]
        total = torch.stack([t.sum(dtype=torch.float32) for t in tensors]).sum()
        if bool(torch.isfinite(total)):
            return 0
        real = (torch.arange(tensors[0].shape[1])[None, :] < lengths[:, None])[..., None]
        return sum(int((~torch.isfinite(t) & real).sum()) for t in tensors)

    def arrays(self) -> dict[str, list[np.ndarray]]:
        return {kind: [_storage_numpy(t) for t in layers] for kind, layers in self.outputs.items()}


class _DeviceCapture:
    """Accelerator capture: each hook gathers the real-token rows on the device (one `index_select`) into a
    per-batch device buffer [n_layers, n_real, d_model] in the storage dtype; after the forward one asynchronous
    copy per kind moves it into a pinned host buffer, and the writer thread waits on that copy's event before it
    writes (the only synchronisation per batch). Host buffers come from a small pool, so the forward of the next
    batch runs while this one is copied and written. Non-finite values are counted on the device and read once."""

    POOL = 2

    def __init__(self, modules: Mapping[str, list], storage: torch.dtype, device: torch.device, d_model: int,
                 max_rows: int) -> None:
        self.modules = modules
        self.storage = storage
        self.device = device
        self.rows: torch.Tensor | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        n_layers = len(next(iter(modules.values())))
        pin = device.type == "cuda"
        self.pool: queue.Queue = queue.Queue()
        for _ in range(self.POOL):
            self.pool.put({
                kind: torch.empty(n_layers * max_rows * d_model, dtype=storage, pin_memory=pin) for kind in modules
            })
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def hook(self, kind: str, layer: int):
        def hook(module, args, output) -> None:
            hidden = first_tensor(output)
            flat = hidden.reshape(-1, hidden.shape[-1])
            if flat.dtype == self.storage:
                torch.index_select(flat, 0, self.rows, out=self.buffers[kind][layer])
            else:
                self.buffers[kind][layer].copy_(torch.index_select(flat, 0, self.rows))

        return hook

    def start(self, rows: torch.Tensor, n_layers: int, d_model: int) -> None:
        self.rows = rows
        self.buffers = {
            kind: torch.empty((n_layers, len(rows), d_model), dtype=self.storage, device=self.device)
            for kind in self.modules
        }

    def to_host(self):
        """Start the device->host copies; return (arrays, ready, release) for `ActivationWriter.write_batch`."""
        host = self.pool.get()  # blocks while both host buffers are still being written
        arrays = {}
        for kind, buffer in self.buffers.items():
            self.nonfinite += (~torch.isfinite(buffer)).sum()
            target = host[kind][: buffer.numel()].view(buffer.shape)
            target.copy_(buffer, non_blocking=True)
            arrays[kind] = _storage_numpy(target)
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
        else:
            ready = None
        self.buffers = {}
        return arrays, ready, lambda: self.pool.put(host)


def _storage_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor's raw storage values (bfloat16 as int16 bits)."""
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


class _Hooks:
    """Registers one capture's hooks on every (kind, layer) module; removes them on exit."""

    def __init__(self, capture, modules: Mapping[str, list]) -> None:
        self.capture, self.modules, self.handles = capture, modules, []

    def __enter__(self) -> "_Hooks":
        for kind, modules in self.modules.items():
            for layer, module in enumerate(modules):
                self.handles.append(module.register_forward_hook(self.capture.hook(kind, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a synchronisation: from pinned memory, asynchronously (CUDA); plain `.to` elsewhere."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    metadata: Mapping[str, str] | None = None,
) -> ExtractionResult:
    """Extract every layer's activations for `texts` (dataset order) into one activation file.

    `metadata` adds string fields (emotion, dataset path and sha256, ...) to the file header.
    """
    if len(texts) == 0:
        raise ExtractionError("no sentences to extract")
    if len(set(sentence_ids)) != len(sentence_ids):
        raise ExtractionError("sentence ids must be unique")
    if options.batch_size < 1:
        raise ExtractionError(f"batch_size must be >= 1, got {options.batch_size}")
    started = time.perf_counter()
    encoded = tokenize(loaded, texts, sentence_ids, options.prepend_bos, options.truncate)
    lengths = [len(ids) for ids in encoded]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
    del encoded
    tokenized = time.perf_counter()
    forward_s = capture_s = 0.0
    device = torch.device(loaded.device)
    batches = plan_batches(lengths, options, device)
    storage = _TORCH_DTYPES[options.storage_dtype]
    points = find_hook_points(loaded.model)
    all_modules = {"resid_post": points.blocks, "mlp_out": points.mlps, "attn_out": points.attentions}
    modules = {kind: all_modules[kind] for kind in options.kinds}
    on_host = device.type in HOST_DEVICES
    if on_host:
        capture = _HostCapture(modules, storage)
    else:
        max_rows = max(sum(lengths[i] for i in batch) for batch in batches)
        capture = _DeviceCapture(modules, storage, device, loaded.d_model, max_rows)
    file_metadata = {
        **(metadata or {}),
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "architecture": loaded.architecture,
        "sentence_ids": json.dumps(list(sentence_ids), ensure_ascii=False),
        "prepend_bos": json.dumps(options.prepend_bos),
        "truncated_to_context": json.dumps(options.truncate),
        "compute_dtype": loaded.compute_dtype,
        "hook_points": json.dumps({kind: points.names[kind] for kind in options.kinds}),
        "package_version": __version__,
    }
    writer = ActivationWriter(
        output_path, n_layers=loaded.n_layers, d_model=loaded.d_model, kinds=options.kinds, offsets=offsets,
        input_ids=input_ids, storage_dtype=options.storage_dtype, metadata=file_metadata,
        background=options.background_write, write_threads=_write_threads(options, on_host),
    )
    n_nonfinite = 0
    progress = tqdm(total=len(texts), unit="sent", desc=f"{loaded.slug}", disable=not options.progress, leave=False)
    # no_grad rather than inference_mode on the CPU path: the zero-copy capture needs version counters.
    grad_mode = torch.no_grad() if on_host else torch.inference_mode()
    with writer, _Hooks(capture, modules), grad_mode, progress:
        for batch in batches:
            batch_lengths = [lengths[i] for i in batch]
            ids, mask = _padded(input_ids, offsets, batch, max(batch_lengths))
            ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
            if on_host:
                while True:
                    capture.start(ids.shape)
                    before = time.perf_counter()
                    loaded.model(input_ids=ids, attention_mask=mask)
                    forward_s += time.perf_counter() - before
                    if capture.intact():
                        break
                    capture.copy = True  # the model writes into its outputs in place: copy them from now on
                before = time.perf_counter()
                n_nonfinite += capture.count_nonfinite(torch.as_tensor(batch_lengths))
                arrays = capture.arrays()
                capture.outputs = {}
                capture_s += time.perf_counter() - before
                writer.write_batch(arrays, batch, batch_lengths, padded=True)
            else:
                rows = np.concatenate([row * len(ids[0]) + np.arange(n) for row, n in enumerate(batch_lengths)])
                before = time.perf_counter()
                capture.start(_to_device(torch.from_numpy(rows), device), loaded.n_layers, loaded.d_model)
                loaded.model(input_ids=_to_device(ids, device), attention_mask=_to_device(mask, device))
                forward_s += time.perf_counter() - before  # launch time only: the device runs asynchronously
                before = time.perf_counter()
                arrays, ready, release = capture.to_host()
                capture_s += time.perf_counter() - before
                writer.write_batch(arrays, batch, batch_lengths, ready=ready, release=release)
            progress.update(len(batch))
        path = writer.commit()
    if not on_host:
        n_nonfinite = int(capture.nonfinite)
    return ExtractionResult(
        path=path,
        n_sentences=len(texts),
        n_tokens=int(offsets[-1]),
        n_layers=loaded.n_layers,
        d_model=loaded.d_model,
        kinds=options.kinds,
        storage_dtype=options.storage_dtype,
        file_bytes=path.stat().st_size,
        wall_seconds=time.perf_counter() - started,
        n_nonfinite=n_nonfinite,
        timings={"tokenize_s": tokenized - started, "forward_s": forward_s, "capture_s": capture_s, **writer.timings},
    )
