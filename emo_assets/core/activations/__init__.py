"""Activation files: the format and its typed header (`format`), the streaming writer (`writer`), the reader
(`reader`), low-level file I/O (`fileio`) and the reuse of rows already extracted (`reuse`).

    from emo_assets.core.activations import ActivationFile
    f = ActivationFile("results/baseline/activations/gpt2/activations_gratitude.safetensors")
"""

from emo_assets.core.activations.format import (
    ACTIVATION_KINDS,
    BASE_KINDS,
    FORMAT_VERSION,
    ActivationFileError,
    ActivationHeader,
    DatasetSource,
    ReuseRecord,
    ReuseSource,
    kinds_for,
    offsets_of,
)
from emo_assets.core.activations.reader import ActivationFile
from emo_assets.core.activations.writer import ActivationWriteError, ActivationWriter, write_activation_file

__all__ = [
    "ACTIVATION_KINDS",
    "BASE_KINDS",
    "FORMAT_VERSION",
    "ActivationFile",
    "ActivationFileError",
    "ActivationHeader",
    "ActivationWriteError",
    "ActivationWriter",
    "DatasetSource",
    "ReuseRecord",
    "ReuseSource",
    "kinds_for",
    "offsets_of",
    "write_activation_file",
]
