"""The forward stream: the batches (length-sorted or in dataset order, right-padded with an attention mask), the
hooks that capture each stored layer, and each batch's rows handed to the writers of their files. The device decides
the capture and the default batch order (`HOST_DEVICES`): zero-copy and length-sorted on the host, gathered on the
device and in dataset order elsewhere."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emo_assets.core.activations import ActivationWriter
from emo_assets.core.capture import Countdown, DeviceCapture, Hooks, HostCapture, retain_freed_memory, to_device
from emo_assets.core.dtypes import dtype
from emo_assets.core.extraction.options import ExtractionOptions
from emo_assets.core.extraction.planning import ExtractionPlan
from emo_assets.core.models import LoadedModel
from emo_assets.core.selection import ALL, selected_token_positions

# Devices whose module outputs the writer can read directly (zero-copy capture); any other device gathers the
# real rows on the device and copies them to (pinned) host buffers. Tests empty it to run that path on the CPU.
HOST_DEVICES = ("cpu",)


def on_host(device: str | torch.device) -> bool:
    """Whether the writer reads `device`'s module outputs directly (see `HOST_DEVICES`)."""
    return torch.device(device).type in HOST_DEVICES


def plan_batches(lengths: Sequence[int], options: ExtractionOptions, device: str | torch.device) -> list[list[int]]:
    """The batches `extract_to_file` runs for these sentence lengths, options and device (see `length_sorted`)."""
    sort = options.length_sorted
    if sort is None:
        sort = on_host(device)
    if sort:
        return length_sorted_batches(lengths, options.batch_size)
    return [
        list(range(i, min(i + options.batch_size, len(lengths)))) for i in range(0, len(lengths), options.batch_size)
    ]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length, longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _padded(input_ids: np.ndarray, offsets: np.ndarray, batch: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (pad id 0; padding is found by the mask, never by id) and attention mask."""
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, index in enumerate(batch):
        start, end = offsets[index], offsets[index + 1]
        ids[row, : end - start] = input_ids[start:end]
        mask[row, : end - start] = 1
    return ids, mask


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
        self.on_host = on_host(self.device)
        self.positions, self.layers = plan.base.positions, plan.base.stored_layers
        # every token's rows straight out of the module outputs; a subset of positions is gathered instead
        self.zero_copy = self.on_host and self.positions == ALL
        self.n_work = len(work)
        self.batches = [
            sorted((work[p] for p in batch), key=lambda g: plan.job_of[g])  # each job's rows adjacent in a batch
            for batch in plan_batches([plan.lengths[g] for g in work], options, self.device)
        ]
        storage = dtype(options.storage_dtype).torch()
        self.modules = {kind: [plan.points.of_kind(kind)[layer] for layer in self.layers] for kind in options.kinds}
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
