"""Process identity: which process ran something, and whether that process still runs.

A pid alone is reused (a restarted container's entry point is PID 1 again), so a process is identified by its
pid and its start time. `emo_assets.core.atomic` asks whether a temp file's writer is gone; `emo-assets`
asks whether the process that ran an unfinished Dagster run is gone.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_identity(pid: int | None = None) -> str:
    """`<pid>:<start time>` of a process, which unlike the pid alone is not reused by a later process.

    The start time (in clock ticks since boot, from /proc) is empty where /proc is unavailable; the identity
    then degrades to the pid.
    """
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in () may contain spaces
    except (OSError, IndexError):
        start = ""
    return f"{pid}:{start}"


def process_running(identity: str) -> bool:
    """True while the process recorded as `identity` (see `process_identity`) still runs."""
    pid, _, start = identity.partition(":")
    if not pid.isdigit() or not pid_alive(int(pid)):
        return False
    return not start or process_identity(int(pid)) == identity


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
