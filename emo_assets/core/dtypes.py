"""Floating-point dtypes by name: the one table that maps a name to its safetensors code, item size, numpy and
torch types.

Names (`float32`, `bfloat16`, `float16`) are what the configuration, the CLI and the file header use. numpy has
no bfloat16, so its raw values travel as 16-bit integers and are widened to float32 by `to_float32`. torch is
and numpy are imported only when their types are asked for: the configuration and the CLIs' argument checks
read the names without paying for either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    safetensors: str  # the dtype code in a safetensors header
    itemsize: int
    numpy_raw_name: str  # numpy type that holds the raw stored values (bfloat16: its bits)

    @property
    def numpy_raw(self) -> type:
        import numpy as np

        return getattr(np, self.numpy_raw_name)

    def torch(self):
        import torch

        return getattr(torch, self.name)


FLOAT_DTYPES = {
    "float32": DType("float32", "F32", 4, "float32"),
    "bfloat16": DType("bfloat16", "BF16", 2, "uint16"),
    "float16": DType("float16", "F16", 2, "float16"),
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
    import numpy as np

    if name == "bfloat16":
        return (np.asarray(array).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)
