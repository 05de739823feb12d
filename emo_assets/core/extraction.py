"""Batched, exact activation extraction with forward hooks, streamed to an activation file.

How and why:
* All texts are tokenized first (cheap), so every row's position in the output file is known up front.
* Sentences are sorted by length and batched, which keeps padding small; batches are right-padded with an
  attention mask. For causal models right padding is exact (real tokens never attend to pads, position ids
  start at 0 in every row), so a sentence's activations are the same alone or in a batch. Padding is found
  by the mask, never by token id (GPT-2's pad = eos = bos).
* Forward hooks on each block (residual stream after the block), each MLP and, if asked, each attention
  module copy the real-token rows of the batch straight into a per-batch buffer [n_layers, n_real, d_model]
  with one `index_select` per hook. `hidden_states` is not used: its last entry is post final-norm.
* Each batch is handed to the `ActivationWriter`, which writes its rows at their dataset-order positions, so
  peak memory is one batch, whatever the dataset size.
* `torch.inference_mode`, base model, compute dtype as loaded (fp32 default), storage dtype configurable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sentence indices grouped into batches of similar length, longest first (memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class _Capture:
    """Registers the hooks and owns the per-batch buffers they fill. Hooks are removed on exit."""

    def __init__(self, loaded: LoadedModel, kinds: Sequence[str]) -> None:
        points = find_hook_points(loaded.model)
        modules = {"resid_post": points.blocks, "mlp_out": points.mlps, "attn_out": points.attentions}
        self.modules = {kind: modules[kind] for kind in kinds}
        self.hook_names = {kind: points.names[kind] for kind in kinds}
        self.buffers: dict[str, torch.Tensor] = {}
        self.rows: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> "_Capture":
        for kind, modules in self.modules.items():
            for layer, module in enumerate(modules):
                self._handles.append(module.register_forward_hook(self._hook(kind, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, kind: str, layer: int):
        def hook(module, args, output) -> None:
            hidden = first_tensor(output)
            torch.index_select(hidden.reshape(-1, hidden.shape[-1]), 0, self.rows, out=self.buffers[kind][layer])

        return hook

    def prepare(self, mask: torch.Tensor, n_layers: int, d_model: int, dtype: torch.dtype) -> None:
        """Select the real-token rows of this batch (row-major: sentence by sentence) and allocate buffers."""
        self.rows = mask.reshape(-1).nonzero().squeeze(1)
        shape = (n_layers, len(self.rows), d_model)
        self.buffers = {kind: torch.empty(shape, dtype=dtype, device=mask.device) for kind in self.modules}


def _to_storage(tensor: torch.Tensor, storage_dtype: str) -> np.ndarray:
    tensor = tensor.to(_TORCH_DTYPES[storage_dtype]).cpu()
    return tensor.view(torch.int16).numpy() if storage_dtype == "bfloat16" else tensor.numpy()


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
    started = time.perf_counter()
    encoded = tokenize(loaded, texts, sentence_ids, options.prepend_bos, options.truncate)
    lengths = [len(ids) for ids in encoded]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    input_ids = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
    device = torch.device(loaded.device)
    model_dtype = next(loaded.model.parameters()).dtype
    n_nonfinite = 0
    capture = _Capture(loaded, options.kinds)
    file_metadata = {
        **(metadata or {}),
        "model_id": loaded.model_id,
        "model_revision": loaded.revision,
        "architecture": loaded.architecture,
        "sentence_ids": json.dumps(list(sentence_ids), ensure_ascii=False),
        "prepend_bos": json.dumps(options.prepend_bos),
        "truncated_to_context": json.dumps(options.truncate),
        "compute_dtype": loaded.compute_dtype,
        "hook_points": json.dumps(capture.hook_names),
        "package_version": __version__,
    }
    writer = ActivationWriter(
        output_path, n_layers=loaded.n_layers, d_model=loaded.d_model, kinds=options.kinds, offsets=offsets,
        input_ids=input_ids, storage_dtype=options.storage_dtype, metadata=file_metadata,
    )
    progress = tqdm(total=len(texts), unit="sent", desc=f"{loaded.slug}", disable=not options.progress, leave=False)
    with writer, capture, torch.inference_mode(), progress:
        for batch in length_sorted_batches(lengths, options.batch_size):
            width = lengths[batch[0]]
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : lengths[index]] = torch.as_tensor(encoded[index])
                mask[row, : lengths[index]] = 1
            ids, mask = ids.to(device), mask.to(device)
            capture.prepare(mask, loaded.n_layers, loaded.d_model, model_dtype)
            loaded.model(input_ids=ids, attention_mask=mask)
            arrays = {}
            for kind, buffer in capture.buffers.items():
                n_nonfinite += int((~torch.isfinite(buffer)).sum())
                arrays[kind] = _to_storage(buffer, options.storage_dtype)
            writer.write_batch(arrays, batch, [lengths[i] for i in batch])
            progress.update(len(batch))
        path = writer.commit()
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
    )
