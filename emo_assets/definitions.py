"""The Dagster code location: `defs`, every module of the defs folder built from the settings (config.toml +
EMO_ASSETS_* environment).

The executor comes from the deployment (`EMO_ASSETS_DEPLOYMENT`, see `emo_assets/defs/deployment.py`): in-process
on the local one, celery workers or Kubernetes pods on the others; the assets are the same everywhere.
"""

from pathlib import Path

import dagster as dg

from emo_assets.core.config import Settings, load_settings
from emo_assets.defs import loading_with
from emo_assets.defs.dagster_beta import USED_BETA_APIS, accepted_beta


def build_defs(settings: Settings | None = None) -> dg.Definitions:
    """All definitions for `settings` (default: `load_settings()`, i.e. the current environment)."""
    with loading_with(settings or load_settings()), accepted_beta(*USED_BETA_APIS):
        return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs()
