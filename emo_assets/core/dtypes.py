"""Floating-point dtypes by name: the one table that maps a name to its safetensors code, item size, numpy and
torch types.

Names (`float32`, `bfloat16`, `float16`) are what the configuration, the CLI and the file header use. numpy has
no bfloat16, so its raw values travel as 16-bit integers and are widened to float32 by `to_float32`. torch is
imported only when a torch dtype is asked for, so readers of activation files do not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    safetensors: str  # the dtype code in a safetensors header
    itemsize: int
    numpy_raw: type  # numpy type that holds the raw stored values (bfloat16: its bits)

    def torch(self):
        import torch

        return getattr(torch, self.name)


FLOAT_DTYPES = {
    "float32": DType("float32", "F32", 4, np.float32),
    "bfloat16": DType("bfloat16", "BF16", 2, np.uint16),
    "float16": DType("float16", "F16", 2, np.float16),
}
DTYPES = tuple(FLOAT_DTYPES)  # the accepted names, in the order help texts list them


def dtype(name: str) -> DType:
    """The `DType` called `name`; ValueError naming the accepted ones otherwise."""
    try:
        return FLOAT_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}") from None


def to_float32(array: np.ndarray, name: str) -> np.ndarray:
    """Raw stored values of dtype `name` as float32 (bfloat16 bits are the high half of a float32)."""
    if name == "bfloat16":
        return (np.asarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)
