"""Dagster definitions of emo_assets: the project's defs folder, loaded by `dg.load_from_defs_folder`.

Each stage module has `build_defs(settings) -> dg.Definitions` (a factory: every module builds its assets from the
settings, so adding a model or a variant is a configuration edit) and a `@dg.definitions` function `defs` that
calls it with `loaded_settings()`. `emo_assets.definitions` loads every module of this folder, so a module added
here (by hand or with `dg scaffold defs`) is part of the code location; its assets join a stage job in `jobs.py`
(what `emo-assets materialize` runs). A new analysis asset is one entry of `analysis.ANALYSES`.
Shared pieces for new stages:
`partitions.partitions_for(settings)` (the partitions definitions, identical objects on every call) and
`activations.activation_path(settings, variant, slug, emotion)` / `activations.activations_key(variant)`.
"""

import contextlib
import contextvars
from collections.abc import Iterator

from emo_assets.core.config import Settings, load_settings

_LOADING: contextvars.ContextVar[Settings | None] = contextvars.ContextVar("emo_assets_settings", default=None)


@contextlib.contextmanager
def loading_with(settings: Settings) -> Iterator[None]:
    """Make `settings` what every module's `defs()` builds from while the defs folder loads inside the block."""
    token = _LOADING.set(settings)
    try:
        yield
    finally:
        _LOADING.reset(token)


def loaded_settings() -> Settings:
    """The settings the defs folder is being loaded with: those of `loading_with`, else the environment's
    (a tool such as `dg list defs` that loads the folder by itself)."""
    return _LOADING.get() or load_settings()
