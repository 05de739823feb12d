"""The freshness schedule: runs the per-partition freshness checks of every variant on `freshness_cron`.

Dagster's `FreshnessPolicy` on the assets is evaluated per asset by the daemon; whether *each* model x
emotion file is still current (dataset edited, model revision changed, too old) needs the
`partitions_fresh` checks, which only run when something runs them. The schedule is on by default, so
`dagster dev` (which starts the daemon) evaluates them daily.
"""

import dagster as dg

from emo_assets.core.config import Settings
from emo_assets.defs import loaded_settings
from emo_assets.defs.checks import freshness_check_keys

FRESHNESS_SCHEDULE = "activations_freshness"


def build_defs(settings: Settings) -> dg.Definitions:
    schedule = dg.ScheduleDefinition(
        name=FRESHNESS_SCHEDULE,
        cron_schedule=settings.freshness_cron,
        target=dg.AssetSelection.checks(*freshness_check_keys(settings)),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Per-partition freshness checks of every variant's activations.",
    )
    return dg.Definitions(schedules=[schedule])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
