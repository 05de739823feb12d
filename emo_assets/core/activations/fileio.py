"""Low-level file I/O of the activation writer and reader: positional and vectored writes that finish short
writes, early writeback, and the xxh3-128 checksum of a file's data section.

Why these exist: the writer places each batch's rows at their final positions with `pwrite`/`pwritev` (no
seeking, several threads may write one file); `sync_file_range` starts writeback while the caller computes, so
the final fsync finds little left to do; the checksum is read back through bounded memory-map windows (no copy)
for the writer's own temp file and through one reused 1 MiB buffer for published files.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading

import xxhash

READ_CHUNK = 1024 * 1024
MAP_WINDOW = 64 * 1024 * 1024


def write_unit(fd: int, unit: list[tuple]) -> None:
    for position, buffers in unit:
        if len(buffers) == 1:
            pwrite_all(fd, buffers[0], position)
        else:
            pwritev_all(fd, buffers, position)


def pwrite_all(fd: int, data, position: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)


_IOV_MAX = 1024  # the POSIX minimum of IOV_MAX on Linux


def pwritev_all(fd: int, buffers, position: int) -> None:
    """Several buffers to one contiguous file range; a short write (rare) is finished buffer by buffer."""
    views = [memoryview(b).cast("B") for b in buffers]
    for first in range(0, len(views), _IOV_MAX):
        chunk = views[first : first + _IOV_MAX]
        done = os.pwritev(fd, chunk, position) if hasattr(os, "pwritev") else 0
        offset = 0
        for view in chunk:
            end = offset + len(view)
            if end > done:
                skip = max(0, done - offset)
                pwrite_all(fd, view[skip:], position + offset + skip)
            offset = end
        position += offset


def call_quietly(callback) -> None:
    if callback is not None:
        with contextlib.suppress(Exception):
            callback()


def _load_sync_file_range():
    """libc's sync_file_range (Linux): start writeback of dirty pages without waiting. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing this file's dirty pages (asynchronous; durability still comes from fsync)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors are harmless: fsync in commit is authoritative


# How much lower the writer's threads run than the forward (Linux nice increment of the calling thread).
BACKGROUND_NICE = 10


def lower_thread_priority() -> None:
    """Run the calling thread at a lower priority than the forward pass (Linux, per thread; a no-op elsewhere).

    Why: on a CPU where torch's threads occupy every core, a writer thread at the same priority preempts one of
    them for whole time slices while the other waits at the next barrier, so its work costs the forward about its
    full duration; at a lower priority it runs in the gaps between the forward's parallel regions and, when it
    falls behind, while the caller waits for a queue slot."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


class Call(threading.Thread):
    """Run `function(*args)` on a thread; `join()`, then `error` holds its OSError, if any."""

    def __init__(self, function, *args) -> None:
        super().__init__(daemon=True)
        self.function, self.args, self.error = function, args, None
        self.start()

    def run(self) -> None:
        try:
            self.function(*self.args)
        except OSError as exc:
            self.error = exc


def hash_own_file(fd: int, start: int, size: int) -> str:
    """`hash_data` for the writer's own temp file: through read-only memory maps, without copying the pages
    (cheaper than reading them back). The file is mapped one 64 MiB window at a
    time, so mapped pages never add more than that to the process's RSS. Nobody else can truncate the temp file
    meanwhile, which is what makes a map safe here; readers of published files use `hash_data`."""
    digest = xxhash.xxh3_128()
    end = start + size
    position = start
    try:
        while position < end:
            base = position - position % mmap.ALLOCATIONGRANULARITY
            length = min(base + MAP_WINDOW, end) - base
            with mmap.mmap(fd, length, access=mmap.ACCESS_READ, offset=base) as mapped:
                with memoryview(mapped) as view:
                    digest.update(view[position - base :])
            position = base + length
    except (OSError, ValueError):  # no mmap here (or a zero-size tail): read it back instead
        return hash_data(fd, start, size)
    return digest.hexdigest()


def hash_data(fd: int, start: int, size: int) -> str:
    """xxh3-128 of the data section, read back in chunks (it is still in the page cache after writing).

    1 MiB chunks read into one reused buffer: large `pread`s would allocate a new bytes object each time and run
    the hash out of cache."""
    digest = xxhash.xxh3_128()
    position, end = start, start + size
    if not hasattr(os, "preadv"):
        while position < end:
            chunk = os.pread(fd, min(READ_CHUNK, end - position), position)
            if not chunk:
                break
            digest.update(chunk)
            position += len(chunk)
        return digest.hexdigest()
    buffer = memoryview(bytearray(READ_CHUNK))
    while position < end:
        n = os.preadv(fd, [buffer[: min(READ_CHUNK, end - position)]], position)
        if n <= 0:
            break
        digest.update(buffer[:n])
        position += n
    return digest.hexdigest()
