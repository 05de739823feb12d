"""Declarative automation: with the daemon running, the summaries and the analysis follow the activations.

`ANALYSIS_CONDITION` is Dagster's `eager()`: an asset partition is requested when one of its inputs was
updated (or it became missing) since it was last requested, and none of its inputs is missing or in
progress. Inputs are taken through the assets' partition mappings, so for a per-model analysis asset they
are *every* emotion partition of that model's activations: a backfill of `extended/activations` from the
UI gets a model's analysis once the last of that model's partitions is written, never from half of them,
and the summaries and cross-model assets once every partition is there. The activations, the datasets and
the model loads carry no condition: they are started by a person (UI, `emo-assets materialize`).

`analysis_automation` evaluates the conditions every 30 s and is on by default: a daemon runs only under
`make ui` / `dagster dev` (or a cluster deployment), where following the activations is what a user expects;
`emo-assets materialize` runs every stage as a job itself and needs no daemon. The first evaluation only
records the current state (nothing already built is re-run when the daemon starts).
"""

import dagster as dg

from emo_assets.core.config import Settings
from emo_assets.defs import loaded_settings

ANALYSIS_CONDITION = dg.AutomationCondition.eager()
SENSOR = "analysis_automation"


def build_defs(settings: Settings) -> dg.Definitions:
    sensor = dg.AutomationConditionSensorDefinition(
        SENSOR,
        target=dg.AssetSelection.all(),  # only assets with a condition are evaluated
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests the summaries and the analysis assets once all their inputs exist.",
    )
    return dg.Definitions(sensors=[sensor])


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs(loaded_settings())
