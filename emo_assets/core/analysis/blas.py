"""BLAS threading policy of the analysis: one thread.

The analysis works on many small matrices (a few hundred sentences x a few hundred features). For these,
starting and synchronising BLAS threads costs more than the arithmetic, and on small machines shared with
other work the threads contend for the same cores, so one thread is the faster setting. The limit is
applied per call with threadpoolctl and restored afterwards, so nothing global is left changed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from threadpoolctl import threadpool_limits

F = TypeVar("F", bound=Callable)


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
