"""Loading a model the way the configuration says: device, dtype, trust_remote_code, offline-model corpus.

The CLI and the Dagster resource both load models through `load_configured_model`, so a model extracted
from the command line and from the asset graph is the same model with the same revision. The tiny offline
models train their tokenizer on the texts of *all* configured dataset files (not just the one being
extracted), so `baseline` and `extended` activations come from one and the same tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from emo_assets.core.config import Settings
from emo_assets.core.models import LoadedModel, load_model


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


def load_configured_model(model_id: str, settings: Settings, *, device: str | None = None,
                          compute_dtype: str | None = None) -> LoadedModel:
    """`load_model` with the settings' device, dtype and trust_remote_code (arguments override)."""
    extraction = settings.extraction
    return load_model(
        model_id,
        device=device or extraction.device,
        compute_dtype=compute_dtype or extraction.compute_dtype,
        trust_remote_code=extraction.trust_remote_code,
        training_texts=lambda: corpus_texts(settings.datasets.values()),
    )
