"""The Dagster code location: `defs`, built from the settings (config.toml + EMO_ASSETS_* environment).

All runs use the in-process executor: a process per step would re-import torch and the model classes for
every step (seconds each) and could not share a loaded model between partitions.
"""

import dagster as dg

from emo_assets.core.config import Settings, load_settings
from emo_assets.defs import activations, analysis, automation, checks, datasets, jobs, models, schedules, summary
from emo_assets.defs.dagster_beta import USED_BETA_APIS, accepted_beta
from emo_assets.defs.resources import build_resources

# One entry per stage module (each has build_defs(settings) -> dg.Definitions).
DEFS_MODULES = (models, datasets, activations, summary, checks, schedules, analysis, jobs, automation)


def build_defs(settings: Settings | None = None) -> dg.Definitions:
    """All definitions for `settings` (default: `load_settings()`, i.e. the current environment)."""
    settings = settings or load_settings()
    with accepted_beta(*USED_BETA_APIS):
        stages = [module.build_defs(settings) for module in DEFS_MODULES]
    return dg.Definitions.merge(
        *stages, dg.Definitions(resources=build_resources(settings), executor=dg.in_process_executor)
    )


defs = build_defs()
