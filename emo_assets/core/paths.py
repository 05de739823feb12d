"""Where every output lives, and the one guard that keeps names from escaping the results directory.

Dataset variants, model slugs and emotions become folder and file names. They are checked here, before any
file is touched, so that `../x`, absolute paths or path separators in a config or on a command line cannot
write outside `results/`.
"""

from __future__ import annotations

import re
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnsafeNameError(ValueError):
    """A name that would not stay a single path component inside the results directory."""


def safe_name(value: str, what: str) -> str:
    """Return `value` if it is one harmless path component (letters, digits, `.`, `_`, `-`), else raise."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value) or ".." in value:
        raise UnsafeNameError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only "
            "(no path separators, no '..', not starting with '.' or '-')"
        )
    return value


def model_slug(model_id: str) -> str:
    """Folder name and partition key of a model: the hub id with `/` replaced by `-` (`EleutherAI-pythia-160m`).

    Local directories are named by their last path component. The result is checked with `safe_name`.
    """
    if not isinstance(model_id, str) or "\x00" in model_id:  # a NUL would make Path/expanduser raise ValueError
        raise UnsafeNameError(f"invalid model id {model_id!r}: not a non-empty string without NUL characters")
    if model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        try:
            slug = Path(model_id).expanduser().name
        except RuntimeError:  # `~user/...` of an unknown user: no home to expand, keep the name as written
            slug = Path(model_id).name
    else:
        if model_id.count("/") > 1:
            raise UnsafeNameError(f"invalid model id {model_id!r}: a hub id has at most one '/'")
        slug = model_id.replace("/", "-")
    return safe_name(slug, "model slug")


def activation_dir(results_dir: Path, variant: str, slug: str) -> Path:
    """`results/<variant>/activations/<model-slug>/` — the layout users' scripts read."""
    return Path(results_dir) / safe_name(variant, "dataset variant") / "activations" / safe_name(slug, "model slug")


def activation_file(output_dir: Path, emotion: str) -> Path:
    """`<output>/activations_<emotion>.safetensors` — the public file name of one model x emotion."""
    return Path(output_dir) / f"activations_{safe_name(emotion, 'emotion')}.safetensors"


def variant_dir(results_dir: Path, variant: str, stage: str) -> Path:
    """`results/<variant>/<stage>/` for the other stages (datasets, analysis, ...)."""
    return Path(results_dir) / safe_name(variant, "dataset variant") / safe_name(stage, "stage")


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists: where a write under `path` lands once the missing folders are
    created (its filesystem, its permissions)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
