"""Resolving and loading language models: hub ids, local directories and the offline models.

A model is named by a Hugging Face hub id (`gpt2`, `EleutherAI/pythia-160m`), a local directory, or an
offline model name (`minilm`, `tiny-gpt2`, ...). Hub ids go through the Hugging Face cache
(`snapshot_download`): downloaded when the network allows, read from the cache when `HF_HUB_OFFLINE=1`, and
the snapshot folder's commit hash is the revision. Only safetensors weights are fetched and loaded (no pickle).
Base models only (`AutoModel`: the activations analysed are the base model's, and the LM head's projection
onto the vocabulary is the costliest layer of a small model), eval mode, `trust_remote_code` off unless asked.
Hub checkpoints usually ship the LM head; loading their base model leaves the head's weights unused, which
transformers reports as a table of UNEXPECTED keys. That expected case is one log line here instead; any other
load problem keeps transformers' report.

The CLI and the Dagster resource both load through `load_configured_model`, so a model extracted from the command
line and from the asset graph is the same model with the same revision. The tiny offline models train their
tokenizer on the texts of *all* configured dataset files (`corpus_texts`), so `baseline` and `extended`
activations come from one and the same tiny model. The packaged configuration reads those files from the checkout
wherever the command runs (`config.SOURCE_TREE`), so a tiny model's name means one model from any folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emo_assets.core.config import Settings
from emo_assets.core.dtypes import dtype
from emo_assets.core.offline_models import OFFLINE_MODELS, TINY_RECIPES, minilm_path, tiny_model_dir
from emo_assets.core.paths import model_slug

log = logging.getLogger(__name__)

# Files a base model needs; no *.bin / *.pt (pickle), no LM-only extras.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*"]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class ModelLoadError(RuntimeError):
    """The model could not be resolved or loaded; the message names the model and the remedies."""


@dataclass
class LoadedModel:
    """A loaded base model with everything the extraction and the metadata need."""

    model_id: str
    slug: str
    source: str  # "hub" | "local" | "offline"
    path: Path
    revision: str
    model: Any
    tokenizer: Any
    architecture: str
    n_layers: int
    d_model: int
    n_params: int
    context_length: int
    device: str
    compute_dtype: str
    load_seconds: float
    disk_bytes: int
    info: dict = field(default_factory=dict)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


def resolve_model_path(
    model_id: str, *, training_texts: Callable[[], Sequence[str]] | None = None, revision: str | None = None
) -> tuple[str, Path, str | None]:
    """Return (source, local directory, hub commit or None) for a model name."""
    if model_id == "minilm":
        return "offline", minilm_path(), None
    if model_id in TINY_RECIPES:
        if training_texts is None:
            raise ModelLoadError(f"offline model {model_id!r} needs the dataset texts to train its tokenizer")
        return "offline", tiny_model_dir(model_id, list(training_texts())), None
    local = Path(model_id).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local}: not a Hugging Face model directory (no config.json)")
        return "local", local.resolve(), None
    if model_id.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model directory {model_id!r} does not exist")
    return "hub", *_snapshot(model_id, revision)


def _snapshot(model_id: str, revision: str | None) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # hub client errors are many and version-dependent; all mean "not available"
        raise ModelLoadError(
            f"model {model_id!r} is neither in the Hugging Face cache nor reachable on the hub "
            f"({type(exc).__name__}: {exc}).\nRemedies: connect to the network once so it is downloaded into the "
            "HF cache; point HF_HOME / HF_HUB_CACHE at a cache that holds it (with HF_HUB_OFFLINE=1 to stay "
            "offline); pass a local model directory instead of a hub id; or use an offline model "
            f"({', '.join(OFFLINE_MODELS)}; profile 'offline')."
        ) from exc
    return path, path.name if _COMMIT.match(path.name) else None


def weights_sha256(path: Path) -> str:
    """sha256 over the safetensors weight files (sorted by name): the revision of a model without a hub commit."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def hide_load_progress() -> None:
    """Turn off transformers' progress bar of each model load (process-wide): one bar per weight file would drown
    the caller's own lines (the CLI's progress, a Dagster run's log, the benchmark's table)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(
    model_id: str,
    *,
    device: str = "auto",
    compute_dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    training_texts: Callable[[], Sequence[str]] | None = None,
) -> LoadedModel:
    """Load the base model and tokenizer of `model_id` for inference. Raises `ModelLoadError`."""
    from transformers import AutoModel, AutoTokenizer

    from emo_assets.core.layers import find_hook_points

    started = time.perf_counter()
    slug = model_slug(model_id)
    source, path, commit = resolve_model_path(model_id, training_texts=training_texts, revision=revision)
    device = resolve_device(device)
    torch_dtype = dtype(compute_dtype).torch()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with _head_reports_held() as held:
            model, loading_info = AutoModel.from_pretrained(
                path,
                dtype=torch_dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
    except Exception as exc:
        raise ModelLoadError(f"model {model_id!r} ({path}) could not be loaded: {type(exc).__name__}: {exc}") from exc
    dropped = _report_dropped_head(model_id, model, loading_info, held)
    model.eval().requires_grad_(False).to(device)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # no KV cache: one forward pass per batch, nothing to reuse
    points = find_hook_points(model)
    config = model.config
    context = min(
        v
        for v in (
            getattr(config, "max_position_embeddings", None),
            getattr(config, "n_positions", None),
            _sane_max_length(tokenizer),
        )
        if v
    )
    return LoadedModel(
        model_id=model_id,
        slug=slug,
        source=source,
        path=path,
        revision=commit or weights_sha256(path),
        model=model,
        tokenizer=tokenizer,
        architecture=type(model).__name__,
        n_layers=len(points.blocks),
        d_model=int(getattr(config, "hidden_size", None) or config.n_embd),
        n_params=sum(p.numel() for p in model.parameters()),
        context_length=int(context),
        device=device,
        compute_dtype=compute_dtype,
        load_seconds=time.perf_counter() - started,
        disk_bytes=_disk_bytes(path),
        info={"unused_head_keys": dropped} if dropped else {},
    )


class _HoldLoadReports(logging.Filter):
    """Holds back transformers' LOAD REPORT records; everything else on the logger passes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        """Show the held reports as transformers would have (call after the filter is removed)."""
        for record in self.records:
            logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def _head_reports_held() -> Iterator[_HoldLoadReports]:
    """Hold the load report of this one `from_pretrained` call; `_report_dropped_head` decides what is shown."""
    from transformers import modeling_utils

    source = modeling_utils.logger  # the logger `from_pretrained` reports on
    held = _HoldLoadReports()
    source.addFilter(held)
    try:
        yield held
    except BaseException:
        source.removeFilter(held)
        held.release()  # a failed load keeps its report
        raise
    finally:
        source.removeFilter(held)


def _report_dropped_head(model_id: str, model, loading_info: dict, held: _HoldLoadReports) -> list[str]:
    """When the only load problem is the checkpoint's LM head (unexpected keys outside the base model), log one
    line and return those keys; otherwise show transformers' held report unchanged and return []."""
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    problems = [loading_info.get(key) for key in ("missing_keys", "mismatched_keys", "error_msgs")]
    children = {name for name, _ in model.named_children()}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."  # the LM-head class's name for the base model

    def outside_base_model(key: str) -> bool:
        return not key.startswith(prefix) and key.split(".")[0] not in children

    head_only = bool(unexpected) and not any(problems) and all(outside_base_model(k) for k in unexpected)
    if not head_only:
        held.release()
        return []
    log.info(
        "%s: checkpoint weights %s (the LM head) are not loaded: activations come from the base model %s",
        model_id,
        ", ".join(unexpected),
        type(model).__name__,
    )
    return unexpected


def corpus_texts(paths: Iterable[Path]) -> list[str]:
    """The `text` fields of every existing dataset file (unparseable lines are skipped: the validator reports them)."""
    texts = []
    for path in paths:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
    return texts


def load_configured_model(
    model_id: str, settings: Settings, *, device: str | None = None, compute_dtype: str | None = None
) -> LoadedModel:
    """`load_model` with the settings' device, dtype and trust_remote_code (arguments override)."""
    extraction = settings.extraction
    return load_model(
        model_id,
        device=device or extraction.device,
        compute_dtype=compute_dtype or extraction.compute_dtype,
        trust_remote_code=extraction.trust_remote_code,
        training_texts=lambda: corpus_texts(settings.datasets.values()),
    )


def _sane_max_length(tokenizer) -> int | None:
    """Tokenizers without a limit report 1e30; treat that as unknown."""
    value = getattr(tokenizer, "model_max_length", None)
    return value if value and value < 10**7 else None
