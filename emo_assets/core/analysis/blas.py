"""BLAS threading policy of the analysis: one thread.

The analysis works on small matrices (a few hundred sentences x 768 features). On the project's 2-core
machines multi-threaded OpenBLAS made these *slower*, not faster: a 70 x 768 PCA took 0.9 s instead of
0.015 s, and the probe sweep (13 layers x 2 kinds x 280 sentences) 86 s instead of 7 s. The limit is applied
per call with threadpoolctl and restored afterwards, so nothing global is left changed.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

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
