"""`emo-assets`: materialize the whole asset graph of a profile in one process, or start the Dagster UI.

    emo-assets materialize [--profile offline|paper] [--variant V ...]
    emo-assets ui [--host 127.0.0.1] [--port 3000]

`materialize` runs everything in this process, on the persistent local instance (`DAGSTER_HOME`, default
`<root>/.dagster_home`, created from the committed `dagster.yaml` template), so `emo-assets ui` afterwards
shows the history. Dagster runs take one partitions definition each, so the graph is materialized as a
short sequence of in-process runs: observe the dataset files; `language_model`, one run per model; then per
variant one run for `emotion_dataset` (all emotions) and one for `activations` (all model x emotion keys,
each model loaded once) plus `phase2_summary`, with their checks; then the runs of later stages
(`full_plan`). The first failed run stops the sequence and the command exits 1. Runs left unfinished by
an earlier, killed `emo-assets` process are marked failed first, so their `torch` pool slot is free again.
"""

import argparse
import gc
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from emo_assets.core.atomic import process_identity

PROJECT = Path(__file__).resolve().parents[1]  # the source tree (editable install): workspace.yaml, template
TEMPLATE = PROJECT / ".dagster_home" / "dagster.yaml"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
PROCESS_TAG = "emo_assets/cli_process"  # `pid:start time` of the process that ran a run in-process


@dataclass(frozen=True)
class Step:
    """One in-process run: a title for the progress output, the assets to run, the run's tags."""

    title: str
    selection: list
    tags: dict = field(default_factory=dict)


def prepare_dagster_home(root: Path) -> Path:
    """Set `DAGSTER_HOME` (default `<root>/.dagster_home`), creating it from the committed template."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and TEMPLATE.is_file():
        shutil.copyfile(TEMPLATE, config)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def release_abandoned_runs(instance, echo=print) -> None:
    """Fail the runs of earlier `emo-assets` processes that died mid-run, and free their pool slots.

    A killed process leaves its run STARTED with its `torch` pool slot claimed. The daemon frees the slots
    of runs that *ended* only, so the next in-process run would wait for that slot forever. Runs are matched to
    processes by pid *and* start time: a restarted container's entry point gets the same pid (often 1) again.
    """
    import dagster as dg

    from emo_assets.core.atomic import process_running

    unfinished = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    for run in instance.get_runs(dg.RunsFilter(statuses=unfinished)):
        owner = run.tags.get(PROCESS_TAG)
        if owner is None or process_running(owner):
            continue
        pid = owner.partition(":")[0]
        instance.report_run_failed(run, f"the emo-assets process {pid} that ran it is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        echo(f"run {run.run_id} of the dead process {pid}: marked failed, its pool slots freed")


def partition_range(keys) -> dict[str, str]:
    keys = list(keys)
    return {RANGE_START: str(keys[0]), RANGE_END: str(keys[-1])}


def plan(settings, variants) -> list[Step]:
    """The runs that materialize Phase 2 (datasets, models, activations, summaries) for `variants`, in order."""
    from emo_assets.defs.activations import activations_key
    from emo_assets.defs.datasets import dataset_file_key, emotion_dataset_key
    from emo_assets.defs.models import LANGUAGE_MODEL
    from emo_assets.defs.partitions import partitions_for
    from emo_assets.defs.summary import summary_key

    parts = partitions_for(settings)
    steps = [Step("observe dataset files", [dataset_file_key(v) for v in variants])]
    steps += [Step(f"language_model[{slug}]", [LANGUAGE_MODEL], {"dagster/partition": slug})
              for slug in settings.model_slugs]
    for variant in variants:
        steps.append(Step(f"{variant}/emotion_dataset", [emotion_dataset_key(variant)],
                          partition_range(parts.emotions.get_partition_keys())))
        steps.append(Step(f"{variant}/activations + phase2_summary", [activations_key(variant), summary_key(variant)],
                          partition_range(parts.activations.get_partition_keys())))
    return steps


def full_plan(settings, variants) -> list[Step]:
    """`plan`, then the runs of every later stage: a module of `DEFS_MODULES` may define
    `plan_steps(settings, variants) -> list[Step]` to take part in `emo-assets materialize`."""
    from emo_assets.definitions import DEFS_MODULES

    stages = [module.plan_steps for module in DEFS_MODULES if hasattr(module, "plan_steps")]
    return plan(settings, variants) + [step for stage in stages for step in stage(settings, variants)]


def _outcome(result) -> str:
    """`16 x baseline/activations, 1 x baseline/phase2_summary; checks: 6 passed, 0 failed`, then failed checks."""
    written = Counter(e.asset_key.to_user_string() for e in result.all_events
                      if e.event_type_value in ("ASSET_MATERIALIZATION", "ASSET_OBSERVATION"))
    checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    failed = [c for c in checks if not c.passed]
    line = ", ".join(f"{n} x {key}" for key, n in written.items()) or "nothing written"
    line += f"; checks: {len(checks) - len(failed)} passed, {len(failed)} failed"
    reasons = [f"FAILED {c.asset_key.to_user_string()}:{c.check_name}: {c.description}" for c in failed]
    return "\n    ".join([line, *reasons])


def run_steps(defs, steps: list[Step], instance, echo=print) -> bool:
    """Run `steps` in order, in this process, and stop at the first failed run.

    Dagster's console log (INFO) prints a line per partition as it is done; after each run one line sums up
    what was written and which checks failed.
    """
    import dagster as dg

    assets = [*defs.assets, *defs.asset_checks]
    log_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    for number, step in enumerate(steps, 1):
        echo(f"[{number}/{len(steps)}] {step.title}")
        started = time.perf_counter()
        result = dg.materialize(assets, selection=step.selection, instance=instance, resources=defs.resources,
                                tags={**step.tags, PROCESS_TAG: process_identity()}, run_config=log_config,
                                raise_on_error=False)
        echo(f"    {_outcome(result)}")
        outcome = "ok" if result.success else "FAILED"
        echo(f"    {outcome} in {time.perf_counter() - started:.1f}s (run {result.run_id})")
        if not result.success:
            for event in result.all_events:
                if event.is_step_failure:
                    echo(f"    {event.step_key}: {event.step_failure_data.error.message.strip()}")
            return False
    return True


def materialize(args) -> int:
    """Run every step of the plan in this process.

    When this call owns the process (the `emo-assets` program, which exits right after), `gc.freeze()` takes
    what is alive after the imports and the definitions (about 800k objects: torch, transformers, Dagster,
    MLflow), and again what is alive at the end, out of the garbage collector's scans: they live until the
    process exits anyway. Each full collection otherwise scanned them all (0.7 s), and the collections of the
    interpreter's shutdown took 4-5 s after the last run (measured on the 2-core CPU). A caller that goes on
    (`main([...])` from Python, e.g. tests) keeps the normal collector.
    """
    if args.profile:
        os.environ["EMO_ASSETS_PROFILE"] = args.profile
    from dagster import DagsterInstance

    from emo_assets.core.config import load_settings
    from emo_assets.definitions import build_defs

    settings = load_settings()
    unknown = sorted(set(args.variant or []) - set(settings.datasets))
    if unknown:
        print(f"error: unknown variant(s) {unknown}; configured: {sorted(settings.datasets)}", file=sys.stderr)
        return 2
    variants = args.variant or list(settings.datasets)
    home = prepare_dagster_home(settings.root)
    print(f"profile {settings.profile}: models {list(settings.model_slugs)}, variants {variants}, "
          f"results {settings.results_dir}, DAGSTER_HOME {home}")
    instance = DagsterInstance.get()
    release_abandoned_runs(instance)
    steps = plan(settings, variants) if args.phase2_only else full_plan(settings, variants)
    defs = build_defs(settings)
    if args.owns_process:
        gc.freeze()
    ok = run_steps(defs, steps, instance)
    if args.owns_process:
        gc.freeze()
    print("done" if ok else "failed", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def ui(args) -> int:
    from emo_assets.core.config import load_settings

    settings = load_settings()
    workspace = next((p for p in (settings.root / "workspace.yaml", PROJECT / "workspace.yaml") if p.is_file()), None)
    if workspace is None:
        print(f"error: no workspace.yaml in {settings.root} or {PROJECT}", file=sys.stderr)
        return 2
    prepare_dagster_home(settings.root)
    os.environ["EMO_ASSETS_ROOT"] = str(settings.root)  # the code server runs in the workspace's folder
    dagster = Path(sys.executable).with_name("dagster")
    program = str(dagster) if dagster.exists() else "dagster"
    os.execvp(program, [program, "dev", "-h", args.host, "-p", str(args.port), "-w", str(workspace)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("materialize", help="materialize every asset of a profile, in this process")
    run.add_argument("--profile", help="model profile from config.toml (offline | paper); default: the configured one")
    run.add_argument("--variant", action="append", help="dataset variant to build (repeatable); default: all")
    run.add_argument("--phase2-only", action="store_true",
                     help="stop after Phase 2 (datasets, models, activations, summaries): no analysis assets")
    run.set_defaults(handler=materialize)
    web = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this project")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    web.add_argument("--port", type=int, default=3000)
    web.set_defaults(handler=ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from emo_assets.core.config import ConfigError
    from emo_assets.core.paths import UnsafeNameError

    args = build_parser().parse_args(argv)
    args.owns_process = argv is None  # the console script: the process ends when this returns
    try:
        return args.handler(args)
    except (ConfigError, UnsafeNameError) as exc:  # a bad config.toml or EMO_ASSETS_* value: nothing was run
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
