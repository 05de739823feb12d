"""`language_model`: one partition per model slug of the profile; records what each model is.

The asset resolves and loads the model (hub cache, local folder or offline model) so that a missing or
broken model fails here, early and with its own remedies, instead of inside every extraction. It returns
no value (a torch model must never be pickled by an IO manager): it records the model's facts as metadata
and its revision as the data version, so a new revision marks the activations built from the old one as
unsynced. The activation checks compare files against this recorded metadata.
"""

import dagster as dg

from emo_assets.core.config import Settings
from emo_assets.core.models import ModelLoadError
from emo_assets.defs import loaded_settings
from emo_assets.defs.deployment import TORCH_OP_TAGS
from emo_assets.defs.partitions import partitions_for, step_data_version
from emo_assets.defs.resources import ModelCache

LANGUAGE_MODEL = dg.AssetKey("language_model")
CODE_VERSION = "1"


def model_facts(instance: dg.DagsterInstance, slug: str) -> dict[str, object] | None:
    """The metadata values of the latest `language_model` materialization of `slug`, or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=LANGUAGE_MODEL, asset_partitions=[slug]), limit=1
    ).records
    if not records:
        return None
    return {key: entry.value for key, entry in records[0].asset_materialization.metadata.items()}


def _record(context: dg.AssetExecutionContext, settings: Settings, slug: str, model_cache: ModelCache) -> str:
    """Load one model, record its facts as the partition's metadata; return its revision."""
    try:
        loaded = model_cache.get(settings.model_slugs[slug], settings)
    except ModelLoadError as exc:  # the step failure itself must name the model and the remedies
        raise dg.Failure(description=str(exc)) from exc
    context.log.info(
        f"{slug}: {loaded.architecture}, {loaded.n_layers} layers, d={loaded.d_model}, "
        f"revision {loaded.revision[:12]}, loaded in {loaded.load_seconds:.1f}s"
    )
    context.add_asset_metadata(
        {
            "model_id": loaded.model_id,
            "source": loaded.source,
            "architecture": loaded.architecture,
            "n_params": loaded.n_params,
            "n_layers": loaded.n_layers,
            "d_model": loaded.d_model,
            "context_length": loaded.context_length,
            "revision": loaded.revision,
            "dtype": loaded.compute_dtype,
            "device": loaded.device,
            "load_seconds": round(loaded.load_seconds, 3),
            "disk_size_bytes": loaded.disk_bytes,
            "disk_size_mb": round(loaded.disk_bytes / 2**20, 3),
        },
        partition_key=slug,
    )
    return loaded.revision


def build_defs(settings: Settings) -> dg.Definitions:
    parts = partitions_for(settings)

    @dg.asset(
        key=LANGUAGE_MODEL,
        partitions_def=parts.models,
        group_name="models",
        kinds={"pytorch", "huggingface"},
        pool="torch",
        op_tags=TORCH_OP_TAGS,
        code_version=CODE_VERSION,
        description="A language model of the profile, resolved and loaded; metadata: size, shape, revision.",
    )
    def language_model(context: dg.AssetExecutionContext, model_cache: ModelCache) -> dg.MaterializeResult:
        revisions = {}
        for slug in context.partition_keys:
            revisions[slug] = _record(context, settings, slug, model_cache)
            model_cache.release(slug)  # after _record returned: no reference to the model is left
        return dg.MaterializeResult(data_version=step_data_version(revisions))

    return dg.Definitions(assets=[language_model])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
