"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written file.

Every output of the pipeline goes through `atomic_path`: the data is written to a temp file in the *same*
folder (so the final `os.replace` is a rename on one filesystem), flushed and fsynced, renamed over the final
path, and the folder is fsynced so the rename itself survives a crash. On any error the temp file is removed
and the previous file at the final path is untouched. A process killed with SIGKILL cannot run cleanup, so
temp files carry a recognisable name (`.<final name>.tmp-<pid>-<random>`) and `remove_stale_temps` deletes
those of dead processes in the folder on the next successful write there, whatever file they were meant to
become (a killed run of several files leaves one temp per file; a later run of any of them clears them all). A temp file named with *this* process's pid that this
process did not create is stale too: it was left by an earlier process with the same pid (a restarted
container's entry point is PID 1 again), so the pid alone cannot tell that its writer is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from emo_assets.core.processes import pid_alive

_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


# Names of the temp files this process handed out and has not published yet (names, not paths: the same folder
# may be reached by a relative and an absolute path).
_OWN_TEMPS: set[str] = set()
_OWN_TEMPS_LOCK = threading.Lock()


def temp_path_for(final: Path) -> Path:
    """A unique temp-file path next to `final`, named so that its owner process can be identified."""
    temp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    with _OWN_TEMPS_LOCK:
        _OWN_TEMPS.add(temp.name)
    return temp


def _forget(temp: Path) -> None:
    with _OWN_TEMPS_LOCK:
        _OWN_TEMPS.discard(temp.name)


def _writer_gone(name: str, pid: int) -> bool:
    """True when the process that created temp file `name` can no longer finish it."""
    if pid == os.getpid():
        with _OWN_TEMPS_LOCK:
            return name not in _OWN_TEMPS  # our pid, not our file: an earlier process with the same pid
    return not pid_alive(pid)


def fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete the temp files in `final`'s folder (of any final name) whose writer process no longer runs (e.g.
    after SIGKILL); temps of running writers stay."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = _TEMP_RE.match(entry.name)
        if match and not entry.is_dir() and _writer_gone(entry.name, int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def publish(temp: Path, final: Path) -> None:
    """Rename an already fsynced `temp` over `final`, fsync the folder, then clear stale temps of dead writers."""
    os.replace(temp, final)
    _forget(temp)
    fsync_dir(final.parent)
    remove_stale_temps(final)


def commit_temp(temp: Path, final: Path) -> None:
    """fsync `temp`, then `publish` it."""
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    publish(temp, final)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `final`; on success it replaces `final` atomically, on error it is removed.

    The caller writes the temp path however it likes (polars, matplotlib, safetensors, plain open).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(final)
    try:
        yield temp
        commit_temp(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        _forget(temp)
        raise


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `final` atomically (JSON, Markdown, small files)."""
    with atomic_path(final) as temp:
        temp.write_bytes(data)
    return Path(final)
