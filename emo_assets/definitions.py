"""The Dagster code location: `defs`, built from the settings (config.toml + EMO_ASSETS_* environment).

The executor comes from the deployment (`EMO_ASSETS_DEPLOYMENT`, see `emo_assets/defs/deployment.py`): in-process
on the local one, celery workers or Kubernetes pods on the others; the assets are the same everywhere.
"""

import dagster as dg

from emo_assets.core.config import Settings, load_settings
from emo_assets.defs import (
    activations,
    analysis,
    automation,
    checks,
    datasets,
    deployment,
    jobs,
    models,
    schedules,
    summary,
)
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
        *stages, dg.Definitions(resources=build_resources(settings), executor=deployment.executor())
    )


defs = build_defs()
