"""emo_assets: emotion-sentence datasets -> language-model activations -> emotion vectors, as Dagster assets.

`emo_assets.core` is plain Python (no Dagster) and can be used from a notebook; `emo_assets.defs` wraps it
in Dagster assets; `emo_assets.extract` and `emo_assets.validate` are the command-line entry points.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emo_assets")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
