"""Sharded partitions: where the shards of a partition live, how it is cut, and the cleanup of shards no manifest
lists (the layout itself is described in `format`).

A partition is cut into contiguous runs of sentences, each within the byte bound and the sentence bound (0: no
bound; a sentence larger than the byte bound is a shard of its own). The cut depends only on the rows each
sentence stores and the bounds, so a rerun over the same inputs cuts the same shards, finds the ones already
published (each verified against what it would write) and forwards only the sentences of the others.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from emo_assets.core.atomic import remove_stale_temps

_SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")


def shard_folder(final: Path) -> Path:
    """`<stem>.shards/` next to the partition's path."""
    return final.with_suffix(".shards")


def shard_path(final: Path, index: int) -> Path:
    return shard_folder(final) / f"shard-{index:05d}.safetensors"


def shard_bounds(rows: Sequence[int], row_bytes: int, max_bytes: int, max_sentences: int) -> list[tuple[int, int]]:
    """The (first, end) sentence ranges of a partition whose sentences store `rows` rows of `row_bytes` each."""
    bounds, first, size = [], 0, 0
    for index, n in enumerate(rows):
        over_bytes = max_bytes > 0 and index > first and size + n * row_bytes > max_bytes
        over_count = max_sentences > 0 and index - first >= max_sentences
        if over_bytes or over_count:
            bounds.append((first, index))
            first, size = index, 0
        size += n * row_bytes
    bounds.append((first, len(rows)))
    return bounds


def remove_stale_shard_temps(folder: Path) -> None:
    """Clear the temps of dead writers in every shard folder of `folder` (a killed run of several partitions
    leaves one in each; a later run of any of them clears them all)."""
    for entry in folder.glob("*.shards"):
        if entry.is_dir():
            remove_stale_temps(entry / "shard")


def remove_orphan_shards(final: Path, keep: Iterable[Path]) -> list[Path]:
    """Delete the shard files of `final` that its manifest does not list (`keep`), and the shard folder when it is
    left empty (a partition now written as one file). Only files named like shards are touched."""
    folder = shard_folder(final)
    if not folder.is_dir():
        return []
    keep = {Path(path).name for path in keep}
    removed = []
    for entry in folder.iterdir():
        if _SHARD_RE.match(entry.name) and entry.name not in keep and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    if not keep and not any(folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
    return removed
