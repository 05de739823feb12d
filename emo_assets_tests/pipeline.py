"""What the Dagster-level test suites share: the environment of a test pipeline and one in-process run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def pipeline_env(root: Path, datasets: Mapping[str, Path], mlflow_uri: str, **extra: str) -> dict[str, str]:
    """EMO_ASSETS_* values (and DAGSTER_HOME) of a test pipeline under `root`: the offline profile on the CPU,
    `datasets` as the variants, results and Dagster home under `root`; `extra` on top."""
    return {
        "EMO_ASSETS_ROOT": str(root),
        "EMO_ASSETS_PROFILE": "offline",
        "EMO_ASSETS_DATASETS": ",".join(f"{variant}={path}" for variant, path in datasets.items()),
        "EMO_ASSETS_RESULTS_DIR": str(root / "results"),
        "EMO_ASSETS_MLFLOW_URI": mlflow_uri,
        "EMO_ASSETS_DEVICE": "cpu",
        "DAGSTER_HOME": str(root / "dagster_home"),
        **extra,
    }


def materialize(defs, selection, instance, tags=None, resources=None):
    """One in-process run of `selection` (with the selected assets' checks), not raising on failure."""
    import dagster as dg

    return dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        instance=instance,
        resources={**defs.resources, **(resources or {})},
        tags=tags or {},
        raise_on_error=False,
    )


def run_jobs(defs, names, instance, lines: list[str] | None = None) -> bool:
    """Run the stage jobs `names` in this process as `emo-assets materialize` does; their report lines go to
    `lines`. False at the first failed job."""
    from emo_assets.cli import run_in_process

    return run_in_process(defs, list(names), instance, echo=(lambda line: None) if lines is None else lines.append)
