"""An unreachable MLflow server costs seconds, not minutes, and never fails a materialization."""

import time

from emo_assets.defs.activations import activations_key
from emo_assets.defs.jobs import partition_range
from emo_assets.defs.partitions import partitions_for
from emo_assets.defs.resources import MlflowTracker
from emo_assets.defs.summary import summary_key
from emo_assets_tests.defs.conftest import partition_metadata
from emo_assets_tests.pipeline import materialize


def test_unreachable_mlflow_is_reported_not_fatal(baseline_ready):
    settings, defs, instance = baseline_ready
    keys = partitions_for(settings).activations.get_partition_keys()
    down = MlflowTracker(tracking_uri="http://127.0.0.1:9", experiment="emo_assets")
    started = time.perf_counter()
    result = materialize(defs, [activations_key("baseline"), summary_key("baseline")], instance,
                         partition_range(keys), resources={"mlflow": down})
    elapsed = time.perf_counter() - started

    assert result.success
    assert elapsed < 30, f"{elapsed:.1f}s: MLflow retries were not disabled"
    statuses = [meta["mlflow"] for meta in partition_metadata(result, activations_key("baseline")).values()]
    assert len(statuses) == 8 and all(s.startswith("not logged (") for s in statuses)
    assert sum("127.0.0.1" in s or "Connection" in s for s in statuses) >= 1
    assert sum(s.endswith("not retried in this run)") for s in statuses) == 7  # one attempt per run
    assert partition_metadata(result, summary_key("baseline"))[None]["mlflow"].startswith("not logged (")
    warnings = [e.user_message for e in instance.all_logs(result.run_id)
                if e.level == 30 and "MLflow" in (e.user_message or "")]
    assert len(warnings) == 1
