"""Threading policy of the analysis: one BLAS thread per computation, one computation per core.

The analysis works on many small matrices (a few hundred sentences x a few hundred features). For these,
starting and synchronising BLAS threads costs more than the arithmetic, and on small machines shared with
other work the threads contend for the same cores, so one BLAS thread is the faster setting. The limit is
applied per call with threadpoolctl and restored afterwards, so nothing global is left changed. Independent
computations whose work is almost all inside numpy's LAPACK and BLAS calls, which release the GIL (the layers
of a probe), run side by side on Python threads instead (`side_by_side`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits

F = TypeVar("F", bound=Callable)
T = TypeVar("T")


def one_blas_thread():
    """Context manager limiting BLAS (OpenBLAS/MKL) to one thread for its duration."""
    return threadpool_limits(limits=1, user_api="blas")


def single_blas_thread(func: F) -> F:
    """Decorator: run `func` under `one_blas_thread()`."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(function: Callable[..., T], items: Iterable) -> list[Future]:
    """`function(item)` for every item on a thread per core, each with one BLAS thread; returns when all are
    done, one finished future per item in order (`.result()` gives its value or raises its exception). The BLAS
    limit is set once around the pool: threads entering and leaving their own limits would restore each
    other's."""
    items = list(items)
    with one_blas_thread(), ThreadPoolExecutor(max_workers=max(1, min(len(items), cores()))) as pool:
        return [pool.submit(function, item) for item in items]
