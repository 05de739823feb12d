"""Disk cost up front: the bytes an extraction will write, checked against the free space before anything is.

The activation writer knows each file's exact size before its first byte (`ActivationWriter.file_bytes`: the
header, padded, plus the tensors, whose shapes are fixed once the sentences are tokenized), so the estimate is
exact. Files are grouped by filesystem: their temp files exist side by side until each is renamed into place, so
a filesystem must hold all of them at once, plus a margin for everything else written meanwhile (metadata, logs,
other processes): `MARGIN_FRACTION` of the estimate plus `MARGIN_BYTES`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from emo_assets.core.activations.shards import shard_folder
from emo_assets.core.paths import nearest_existing

MARGIN_FRACTION = 0.02
MARGIN_BYTES = 4 * 2**20


class DiskSpaceError(OSError):
    """The target filesystem cannot hold what the extraction would write; nothing was written."""


def human(n: int) -> str:
    """Bytes in binary units, e.g. `1.50 GiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Volume:
    """One filesystem an extraction writes to: a folder on it, the bytes to write there and the free space."""

    folder: Path
    needed: int
    free: int

    @property
    def margin(self) -> int:
        return int(self.needed * MARGIN_FRACTION) + MARGIN_BYTES

    @property
    def fits(self) -> bool:
        return self.needed == 0 or self.needed + self.margin <= self.free


@dataclass(frozen=True)
class DiskEstimate:
    """The bytes each output file will take (0 for a file kept as it is), and the filesystems they go to."""

    files: Mapping[Path, int]
    volumes: tuple[Volume, ...]

    @classmethod
    def of(cls, files: Mapping[Path, int]) -> DiskEstimate:
        by_device: dict[int, list] = {}
        for path, size in files.items():
            folder = nearest_existing(Path(path).parent.absolute())  # the writer creates the missing folders
            entry = by_device.setdefault(os.stat(folder).st_dev, [Path(path).parent, 0, folder])
            if len(Path(path).parent.parts) < len(entry[0].parts):  # the output folder, not a shard folder in it
                entry[0] = Path(path).parent
            entry[1] += size
        volumes = tuple(
            Volume(folder, needed, shutil.disk_usage(existing).free) for folder, needed, existing in by_device.values()
        )
        return cls(dict(files), volumes)

    @property
    def total(self) -> int:
        return sum(self.files.values())

    def partition_bytes(self, final: Path) -> int:
        """The bytes written for the partition at `final`: the file, or its manifest and shards."""
        shards = shard_folder(Path(final))
        return sum(size for path, size in self.files.items() if path == Path(final) or Path(path).parent == shards)

    def check(self) -> None:
        """`DiskSpaceError` naming the estimate, the free space and the folder when a filesystem lacks room."""
        for volume in self.volumes:
            if not volume.fits:
                raise DiskSpaceError(
                    f"not enough disk space in {volume.folder}: the extraction writes {human(volume.needed)} "
                    f"({volume.needed} bytes, estimated before writing) and keeps a margin of {human(volume.margin)}, "
                    f"but only {human(volume.free)} are free there; nothing was written. Free space, choose another "
                    "output folder, or store less (--positions, --layers, --storage-dtype)"
                )

    def summary(self) -> str:
        """One line per filesystem, for the CLI and the logs."""
        return "\n".join(
            f"disk: {human(v.needed)} ({v.needed} bytes) to write in {v.folder}, {human(v.free)} free"
            + ("" if v.fits else " - NOT ENOUGH (with the margin of " + human(v.margin) + ")")
            for v in self.volumes
        )
