"""What is timed: the floor, emo_assets extraction and the alternatives, all on the same batches of one model.

Every contender has `setup()` (untimed: loading, building wrappers, one warm-up batch) that returns None or the
reason it cannot run, and `run(rep)` that does one full pass over the workload and returns its wall seconds.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import sync_device
from emo_assets.core.activations import BASE_KINDS, offsets_of
from emo_assets.core.capture import to_device
from emo_assets.core.extraction import ExtractionOptions, extract_to_file, plan_batches, tokenize
from emo_assets.core.extraction.stream import _padded
from emo_assets.core.layers import find_hook_points, first_tensor
from emo_assets.core.models import LoadedModel

KINDS = BASE_KINDS


@dataclass
class Workload:
    loaded: LoadedModel
    texts: list[str]
    ids: list[str]
    batch_size: int
    work_dir: Path
    tl_name: str  # the model name TransformerLens is told (its architecture adapter is picked from the config)

    def __post_init__(self) -> None:
        encoded = tokenize(self.loaded, self.texts, self.ids, prepend_bos=False)
        self.lengths = [len(e) for e in encoded]
        self.offsets = offsets_of(self.lengths)
        self.input_ids = np.fromiter((t for e in encoded for t in e), dtype=np.int64, count=int(self.offsets[-1]))
        # the batches extract_to_file runs (length-sorted on the CPU, dataset order on an accelerator)
        self.batches = plan_batches(self.lengths, ExtractionOptions(batch_size=self.batch_size), self.loaded.device)
        self.device = self.loaded.device
        self.n_tokens = int(self.offsets[-1])

    def padded(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = _padded(self.input_ids, self.offsets, batch, max(self.lengths[i] for i in batch))
        device = torch.device(self.device)
        return to_device(torch.from_numpy(ids), device), to_device(torch.from_numpy(mask), device)


class Contender:
    key = ""
    title = ""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.extra: dict[str, Any] = {}

    def setup(self) -> str | None:
        return None

    def _pass(self, batches):
        raise NotImplementedError

    def run(self, rep: int) -> float:
        """One full pass over the workload; its wall seconds."""
        started = time.perf_counter()
        self._pass(self.work.batches)
        return time.perf_counter() - started

    def close(self) -> None:
        pass


class OptionalContender(Contender):
    """A contender from the optional `bench` extra: `setup` says why it cannot run instead of raising."""

    package = ""  # distribution name, also the import name with `-` as `_`

    def setup(self) -> str | None:
        import importlib
        import importlib.metadata as md

        try:
            importlib.import_module(self.package.replace("-", "_"))
        except Exception as exc:  # noqa: BLE001
            return f"unavailable: {self.package} not installed ({type(exc).__name__}: {exc}); pip install '.[bench]'"
        try:
            self.extra["version"] = md.version(self.package)
            self.prepare()
            self._pass(self.work.batches[:1])  # warm-up
        except Exception as exc:  # noqa: BLE001
            return f"failed: {type(exc).__name__}: {exc}"
        return None

    def prepare(self) -> None:
        raise NotImplementedError


class Floor(Contender):
    """Bare batched forward of the base model: tokenize, the extraction's batches and padding, no capture."""

    key, title = "1", "floor: bare batched forward (no capture)"

    def setup(self) -> str | None:
        self._pass(self.work.batches[:2])  # warm-up
        return None

    def _pass(self, batches) -> None:
        work = self.work
        tokenize(work.loaded, work.texts, work.ids, prepend_bos=False)
        with torch.inference_mode():
            for batch in batches:
                ids, mask = work.padded(batch)
                work.loaded.model(input_ids=ids, attention_mask=mask)
        sync_device(work.device)


class Extraction(Contender):
    """`extract_to_file` of every layer's resid_post + mlp_out, written, checksummed, fsynced, renamed."""

    key, title = "2", "emo_assets extract_to_file (incl. write + fsync)"

    def __init__(
        self, work: Workload, loaded: LoadedModel | None = None, tag: str = "fp32", keep: bool = True, **options
    ) -> None:
        super().__init__(work)
        self.loaded = loaded or work.loaded
        self.tag = tag
        self.keep = keep
        self.options = ExtractionOptions(batch_size=work.batch_size, **options)
        self.kept: Path | None = None  # the first repetition's file, for the accuracy comparisons
        self.timings: list[dict] = []

    def setup(self) -> str | None:
        warm = self.work.work_dir / f"warm-{self.tag}.safetensors"
        n = min(len(self.work.texts), self.work.batch_size)
        extract_to_file(self.loaded, self.work.texts[:n], self.work.ids[:n], warm, self.options)
        warm.unlink()
        return None

    def run(self, rep: int) -> float:
        path = self.work.work_dir / f"extract-{self.tag}-{rep}.safetensors"
        started = time.perf_counter()
        result = extract_to_file(self.loaded, self.work.texts, self.work.ids, path, self.options)
        seconds = time.perf_counter() - started
        self.timings.append({k: round(v, 4) for k, v in result.timings.items()})
        self.extra["file_mib"] = round(result.file_bytes / 2**20, 1)
        self.extra["n_nonfinite"] = result.n_nonfinite
        if self.kept is None and self.keep:
            self.kept = path
        else:
            path.unlink()  # untimed: replacing a large file would add its deletion to the next run
        return seconds


class SeedLoop(Contender):
    """The seed's way: one sentence at a time, `output_hidden_states=True` plus MLP hooks, everything kept in
    memory and saved with `safetensors.numpy.save_file` (+ fsync) at the end.

    Its cost is per sentence (no batching), so with `fraction < 1` it runs on every k-th sentence (k = 1 /
    fraction, which keeps the length mix) and the time is scaled by N / n to the whole workload."""

    key, title = "3", "seed-style loop: one sentence at a time, output_hidden_states"

    def __init__(self, work: Workload, fraction: float = 1.0) -> None:
        super().__init__(work)
        step = max(1, round(1 / fraction)) if fraction > 0 else 1
        self.texts = work.texts[::step]
        self.scale = len(work.texts) / len(self.texts)
        self.extra["sentences_timed"] = len(self.texts)
        self.extra["time_scaled_by"] = round(self.scale, 4)

    def setup(self) -> str | None:
        self._pass(self.work.texts[:2], self.work.work_dir / "seed-warm.safetensors")
        return None

    def _pass(self, texts, path: Path) -> None:
        from safetensors.numpy import save_file

        work = self.work
        model, tokenizer = work.loaded.model, work.loaded.tokenizer
        points = find_hook_points(model)
        mlp_out: list[torch.Tensor] = []
        handles = [
            m.register_forward_hook(lambda mod, a, out: mlp_out.append(first_tensor(out)[0].cpu().clone()))
            for m in points.mlps
        ]
        resid, mlps = [], []
        try:
            with torch.no_grad():
                for text in texts:
                    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(work.device)
                    mlp_out.clear()
                    hidden = model(**encoded, output_hidden_states=True).hidden_states
                    resid.append(torch.stack([h[0] for h in hidden[1:]]).cpu().numpy())
                    mlps.append(torch.stack(mlp_out).numpy())
        finally:
            for handle in handles:
                handle.remove()
        arrays = {"resid_post": np.concatenate(resid, axis=1), "mlp_out": np.concatenate(mlps, axis=1)}
        save_file(arrays, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()

    def run(self, rep: int) -> float:
        started = time.perf_counter()
        self._pass(self.texts, self.work.work_dir / f"seed-{rep}.safetensors")
        return (time.perf_counter() - started) * self.scale


def _max_abs_diff(work: Workload, reference: Path, batch: list[int], captured) -> float:
    """Largest |captured - stored| over the first four sentences of `batch`, every layer and kind;
    `captured(kind, layer)` is the contender's padded [batch, width, d_model] tensor."""
    from emo_assets.core.activations import ActivationFile

    stored = ActivationFile(reference, verify=False)
    diff = 0.0
    for row, index in enumerate(batch[:4]):
        n = work.lengths[index]
        for layer in range(work.loaded.n_layers):
            for kind in KINDS:
                got = captured(kind, layer)[row, :n].float().cpu().numpy()
                diff = max(diff, float(np.abs(got - stored.sentence(kind, layer, index)).max()))
    return diff


class TransformerLens(OptionalContender):
    """TransformerLens 4.x `TransformerBridge.boot_transformers(name, hf_model=<LM-head model of the same
    weights>, tokenizer=...)`, `run_with_cache` with a names filter for blocks.{i}.hook_resid_post/hook_mlp_out,
    same batches and attention mask. TransformerLens needs the LM-head model and forces eager attention."""

    key, title = "4a", "TransformerLens run_with_cache (names filter)"
    package = "transformer-lens"

    def prepare(self) -> None:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM

        work = self.work
        lm = AutoModelForCausalLM.from_pretrained(work.loaded.path, dtype=torch.float32).eval()
        with _quiet():
            self.bridge = TransformerBridge.boot_transformers(
                work.tl_name, hf_model=lm, tokenizer=work.loaded.tokenizer, device=work.device
            )
        self.names = {f"blocks.{i}.hook_{kind}" for i in range(work.loaded.n_layers) for kind in KINDS}

    def _pass(self, batches) -> dict:
        cache = None
        with torch.inference_mode():
            for batch in batches:
                ids, mask = self.work.padded(batch)
                _, cache = self.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in self.names)
        sync_device(self.work.device)
        return cache

    def check(self, reference: Path) -> None:
        """Largest |difference| to the extraction's stored rows on the first batch (eager vs sdpa attention)."""
        batch = self.work.batches[0]
        cache = self._pass([batch])
        self.extra["max_abs_diff_vs_extraction"] = _max_abs_diff(
            self.work, reference, batch, lambda kind, layer: cache[f"blocks.{layer}.hook_{kind}"]
        )


class Nnsight(OptionalContender):
    """nnsight `NNsight(model).trace(...)` saving each block's and MLP's output, same batches and mask
    (its own copy of the base model, so nnsight's wrapping cannot touch the other contenders)."""

    key, title = "4b", "nnsight trace + save"
    package = "nnsight"

    def prepare(self) -> None:
        import nnsight
        from transformers import AutoModel

        work = self.work
        model = AutoModel.from_pretrained(work.loaded.path, dtype=torch.float32).eval().requires_grad_(False)
        model.to(work.device)
        self.nnsight = nnsight
        self.model = nnsight.NNsight(model)
        names = find_hook_points(model).names
        self.paths = [(names["mlp_out"][i], names["resid_post"][i]) for i in range(work.loaded.n_layers)]

    def _envoy(self, path: str):
        envoy = self.model
        for part in path.split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def _pass(self, batches) -> list:
        saved = []
        with torch.inference_mode():
            for batch in batches:
                ids, mask = self.work.padded(batch)
                with self.model.trace(input_ids=ids, attention_mask=mask):
                    saved = self.nnsight.save([])
                    for mlp, block in self.paths:  # nnsight wants the modules in execution order
                        saved.append(self._envoy(mlp).output)
                        saved.append(self._envoy(block).output)
        sync_device(self.work.device)
        return saved

    def check(self, reference: Path) -> None:
        """Largest |difference| to the extraction's stored rows on the first batch."""
        batch = self.work.batches[0]
        saved = self._pass([batch])
        position = {"mlp_out": 0, "resid_post": 1}  # saved in execution order: mlp, block, mlp, block, ...
        self.extra["max_abs_diff_vs_extraction"] = _max_abs_diff(
            self.work, reference, batch, lambda kind, layer: first_tensor(saved[2 * layer + position[kind]])
        )


@contextlib.contextmanager
def _quiet():
    """TransformerLens logs warnings about the model name; keep the benchmark's output readable."""
    import logging

    previous = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(previous)


def relative_errors(candidate: Path, reference: Path) -> dict[str, float]:
    """Per (kind, layer): max|a-b| / max|b| (normwise max relative error) and ||a-b||_2 / ||b||_2; the maxima."""
    from emo_assets.core.activations import ActivationFile

    a, b = ActivationFile(candidate), ActivationFile(reference)
    worst_max, worst_l2 = 0.0, 0.0
    for kind in KINDS:
        for layer in range(b.n_layers):
            x, y = a.layer(kind, layer).astype(np.float64), b.layer(kind, layer).astype(np.float64)
            worst_max = max(worst_max, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
            worst_l2 = max(worst_l2, float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)))
    return {"max_rel_err_normwise": worst_max, "max_rel_err_l2": worst_l2}
