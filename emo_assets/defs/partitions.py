"""The partitions every asset shares: model slugs, emotions, and their model x emotion product.

Dagster infers `MultiToSingleDimensionPartitionMapping` between `<V>/activations` and `language_model` /
`<V>/emotion_dataset` only when the single-dimension definition *is* the object used as the dimension, so
all modules (and the analysis assets) must take their definitions from `partitions_for(settings)`,
which returns the same objects for the same model and emotion lists.
"""

import functools
import hashlib
import json
from dataclasses import dataclass

import dagster as dg

from emo_assets.core.config import Settings

MODEL_DIM = "model"
EMOTION_DIM = "emotion"


@dataclass(frozen=True)
class Partitions:
    models: dg.StaticPartitionsDefinition  # keys: model slugs (`gpt2`, `EleutherAI-pythia-160m`, ...)
    emotions: dg.StaticPartitionsDefinition  # keys: emotions
    activations: dg.MultiPartitionsDefinition  # keys: "<emotion>|<slug>" (dimensions sorted by name)

    def split(self, key: str) -> tuple[str, str]:
        """(model slug, emotion) of a model x emotion partition key."""
        dims = self.activations.get_partition_key_from_str(str(key)).keys_by_dimension
        return dims[MODEL_DIM], dims[EMOTION_DIM]

    def key(self, slug: str, emotion: str) -> str:
        """The model x emotion partition key of one slug and emotion."""
        return str(dg.MultiPartitionKey({MODEL_DIM: slug, EMOTION_DIM: emotion}))


def partitions_for(settings: Settings) -> Partitions:
    """The partitions of the configured profile (slugs) and emotions; identical objects on every call."""
    return _partitions(tuple(settings.model_slugs), tuple(settings.emotions))


@functools.cache
def _partitions(slugs: tuple[str, ...], emotions: tuple[str, ...]) -> Partitions:
    models = dg.StaticPartitionsDefinition(list(slugs))
    emotion_parts = dg.StaticPartitionsDefinition(list(emotions))
    return Partitions(
        models=models,
        emotions=emotion_parts,
        activations=dg.MultiPartitionsDefinition({MODEL_DIM: models, EMOTION_DIM: emotion_parts}),
    )


def run_partition_keys(context, partitions_def: dg.PartitionsDefinition, keep=None) -> list[str]:
    """The partition keys a step covers: those of the run, or in an unpartitioned run every key (that `keep`).

    Asset checks here are unpartitioned; run next to their asset they evaluate the run's partitions, run on
    their own (the freshness schedule, the UI's "execute check") they evaluate every partition.
    """
    if context.has_partition_key or context.has_partition_key_range:
        return [str(key) for key in context.partition_keys]
    return [key for key in partitions_def.get_partition_keys() if keep is None or keep(key)]


def step_data_version(versions: dict[str, str]) -> dg.DataVersion:
    """The data version of a step from the per-partition versions it produced.

    Dagster records one data version per step output, even when a single-run backfill materializes many
    partitions. With one partition that is exactly the partition's version; with several it is a hash of
    all of them (each partition's own version is also in its metadata as `input_fingerprint`/`revision`).
    """
    if len(versions) == 1:
        return dg.DataVersion(next(iter(versions.values())))
    return dg.DataVersion(fingerprint(sorted(versions.items())))


def fingerprint(value) -> str:
    """sha256 of a JSON-serialisable value (sorted keys): a stable version of a set of inputs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
