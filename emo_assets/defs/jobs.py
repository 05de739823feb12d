"""The stage jobs: what `emo-assets materialize` runs, in order, and what the UI and `dagster job launch` start.

| job                      | assets (with their checks)                                     | partitions      |
|--------------------------|----------------------------------------------------------------|-----------------|
| `load_models`            | `language_model`                                               | model           |
| `<V>_datasets`           | observe `<V>/dataset_file`, then `<V>/emotion_dataset`         | emotion         |
| `<V>_activations`        | `<V>/activations`, `<V>/activations_summary`                   | model x emotion |
| `<V>_analysis`           | the per-model analysis assets of `<V>`                         | model           |
| `cross_variant_analysis` | `vector_stability` (with two or more variants)                 | –               |
| `<V>_comparisons`        | `<V>/cross_model_alignment`, `<V>/analysis_report`             | –               |

A job takes one partitions definition, so the stages are separate jobs. The reports read `vector_stability`,
which reads every variant's emotion vectors: `<V>_comparisons` therefore come after `cross_variant_analysis`.
`stage_order` is that order; `job_runs` splits a job's partitions into runs as a UI backfill does (with
Dagster's partition tags).
"""

from collections.abc import Sequence

import dagster as dg

from emo_assets.core.config import Settings
from emo_assets.dagster_private import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    job_asset_nodes,
)
from emo_assets.defs import loaded_settings
from emo_assets.defs.activations import activations_key
from emo_assets.defs.analysis import STABILITY_KEY, analysis_keys
from emo_assets.defs.datasets import dataset_file_key, emotion_dataset_key
from emo_assets.defs.models import LANGUAGE_MODEL
from emo_assets.defs.summary import summary_key

LOAD_MODELS = "load_models"
CROSS_VARIANT = "cross_variant_analysis"


def datasets_job(variant: str) -> str:
    return f"{variant}_datasets"


def activations_job(variant: str) -> str:
    return f"{variant}_activations"


def analysis_job(variant: str) -> str:
    return f"{variant}_analysis"


def comparisons_job(variant: str) -> str:
    return f"{variant}_comparisons"


def with_stability(settings: Settings, variants: Sequence[str]) -> bool:
    """`vector_stability` is defined with two or more variants and built when every variant is."""
    return len(settings.datasets) >= 2 and set(settings.datasets) <= set(variants)


def stage_order(settings: Settings, variants: Sequence[str], *, extraction_only: bool = False) -> list[str]:
    """The job names that materialize `variants`, in dependency order; `extraction_only` stops after the
    activations and their summaries."""
    names = [LOAD_MODELS]
    for variant in variants:
        names += [datasets_job(variant), activations_job(variant)]
    if extraction_only:
        return names
    names += [analysis_job(variant) for variant in variants]
    if with_stability(settings, variants):
        names.append(CROSS_VARIANT)
    return names + [comparisons_job(variant) for variant in variants]


def partition_range(keys: Sequence[str]) -> dict[str, str]:
    """Run tags that make one run cover the partitions `keys[0]` .. `keys[-1]`."""
    return {ASSET_PARTITION_RANGE_START_TAG: str(keys[0]), ASSET_PARTITION_RANGE_END_TAG: str(keys[-1])}


def job_runs(job: dg.JobDefinition) -> list[tuple[str, dict[str, str]]]:
    """(what the run covers, its tags) of the runs that materialize every partition of `job`, as a UI backfill
    splits them: one run over all partitions when each partitioned asset of the job has a single-run backfill
    policy, else one run per partition (`language_model` records each model's revision as that partition's
    data version, which a run over several partitions cannot)."""
    if job.partitions_def is None:
        return [("unpartitioned", {})]
    keys = job.partitions_def.get_partition_keys()
    nodes = job_asset_nodes(job)
    if all(n.backfill_policy == dg.BackfillPolicy.single_run() for n in nodes if n.partitions_def is not None):
        return [(f"{len(keys)} partitions", partition_range(keys))]
    return [(str(key), {PARTITION_NAME_TAG: str(key)}) for key in keys]


def build_defs(settings: Settings) -> dg.Definitions:
    jobs = [
        dg.define_asset_job(LOAD_MODELS, [LANGUAGE_MODEL], description="Resolve and load every model of the profile.")
    ]
    for variant in settings.datasets:
        per_model, per_variant = analysis_keys(variant)
        jobs += [
            dg.define_asset_job(
                datasets_job(variant),
                [dataset_file_key(variant), emotion_dataset_key(variant)],
                description=f"Observe the {variant} dataset file and write its rows per emotion.",
            ),
            dg.define_asset_job(
                activations_job(variant),
                [activations_key(variant), summary_key(variant)],
                description=f"Extract the {variant} activations (one model load per model) and summarise them.",
            ),
            dg.define_asset_job(
                analysis_job(variant), per_model, description=f"The per-model analysis assets of {variant}."
            ),
            dg.define_asset_job(
                comparisons_job(variant),
                per_variant,
                description=f"Cross-model comparisons and the report of {variant} (after {CROSS_VARIANT}).",
            ),
        ]
    if len(settings.datasets) >= 2:
        jobs.append(
            dg.define_asset_job(CROSS_VARIANT, [STABILITY_KEY], description="Emotion vectors compared across variants.")
        )
    return dg.Definitions(jobs=jobs)


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
