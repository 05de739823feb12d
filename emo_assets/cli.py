"""`emo-assets`: materialize the asset graph of a profile by running its stage jobs, or start the Dagster UI.

    emo-assets materialize [--profile offline|paper] [--variant V ...] [--extraction-only] [--deployment local|cluster|kubernetes]
    emo-assets ui [--host 127.0.0.1] [--port 3000]     (dagster dev; stops with its webserver and daemon on SIGTERM or SIGINT)

`materialize` runs the stage jobs of `emo_assets.defs.jobs` in dependency order (`stage_order`), each over all
of its partitions. On the `local` deployment (the default) every job runs in this process on the persistent
local instance (`DAGSTER_HOME`, default `<root>/.dagster_home`, created from the committed `dagster.yaml`
template), so `emo-assets ui` afterwards shows the history. On `cluster` (`--deployment cluster` or
`EMO_ASSETS_DEPLOYMENT=cluster`) every job is submitted to the running deployment through Dagster's GraphQL API
(`--webserver`, `EMO_ASSETS_WEBSERVER`) and followed through the run records of its instance (`DAGSTER_HOME`).
Each run prints one line from its run record (job, partitions, outcome, seconds, run id) and its failed
checks; the first failed job stops the sequence and the command exits 1.
"""

import argparse
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from emo_assets.core.config import DEPLOYMENTS
from emo_assets.core.processes import process_identity, process_running

PROJECT = Path(__file__).resolve().parents[1]  # the source tree (editable install): workspace.yaml, template
TEMPLATE = PROJECT / ".dagster_home" / "dagster.yaml"
PROCESS_TAG = "emo_assets/cli_process"  # `pid:start time` of the process that ran a run in-process
DEFAULT_WEBSERVER = "http://127.0.0.1:3000"
POLL_SECONDS = 1.0
# The job lines say the rest, and each failure with its reason (emo_assets/defs/loggers.py).
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING", "failures": False}}}}
DEV_SUPERSEDED = "ignore:Function `dev_command` is superseded:Warning"  # a -W filter: that message, any category
UI_STOP_GRACE_S = 60.0  # dagster dev waits for its webserver and daemon to stop before it exits


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

    from emo_assets.dagster_private import end_abandoned_run

    unfinished = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=unfinished)):
        run = record.dagster_run
        owner = run.tags.get(PROCESS_TAG)
        if owner is None or process_running(owner):
            continue
        pid = owner.partition(":")[0]
        end_abandoned_run(instance, run, f"the emo-assets process {pid} that ran it is gone")
        echo(f"run {run.run_id} of the dead process {pid}: marked failed, its pool slots freed")


@dataclass(frozen=True)
class RunOutcome:
    """What a finished run reports beyond its record: its failed checks and, for a failed run, why it failed."""

    run_id: str
    failed_checks: list  # of dg.AssetCheckEvaluation
    failures: list[str]  # `step: message` per failed step, else the run failure's message


def step_failure(step_key: str, data) -> str:
    """`step: reason` of a failed step: a `dg.Failure`'s description (an asset's own message, e.g. the dataset
    validator's `FILE:LINE: field: reason` lines), else the error's `Type: message`; continuation lines indented
    under the run's line."""
    user = data.user_failure_data
    reason = user.description if user and user.description else data.error.message
    return f"{step_key}: " + "\n    ".join(reason.strip().splitlines())


def in_process_outcome(result) -> RunOutcome:
    """The outcome of a run executed here, from its `ExecuteInProcessResult`."""
    failed_checks = [check for check in result.get_asset_check_evaluations() if not check.passed]
    failures = []
    if not result.success:
        failures = [
            step_failure(event.step_key, result.failure_data_for_node(event.step_key))
            for event in result.get_step_failure_events()
        ] or [result.get_run_failure_event().message]
    return RunOutcome(result.run_id, failed_checks, failures)


def logged_outcome(instance, run_id: str) -> RunOutcome:
    """The outcome of a run executed by another process (a deployment's run worker), from its event log."""
    import dagster as dg

    from emo_assets.dagster_private import check_evaluation, run_events, step_failure_data

    checks = [check_evaluation(e) for e in run_events(instance, run_id, dg.DagsterEventType.ASSET_CHECK_EVALUATION)]
    failures = [
        step_failure(e.step_key, step_failure_data(e))
        for e in run_events(instance, run_id, dg.DagsterEventType.STEP_FAILURE)
    ] or [e.message for e in run_events(instance, run_id, dg.DagsterEventType.RUN_FAILURE)]
    return RunOutcome(run_id, [check for check in checks if not check.passed], failures)


def run_report(instance, name: str, outcome: RunOutcome, span: str) -> tuple[bool, list[str]]:
    """(succeeded, lines) of a finished run: one line for the job from its run record, then a line per failed
    check and, for a failed run, the message of each failed step (or of the run failure)."""
    import dagster as dg

    record = instance.get_run_record_by_id(outcome.run_id)
    ok = record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    seconds = (record.end_time or time.time()) - (record.start_time or record.create_timestamp.timestamp())
    lines = [f"{name} [{span}] {'ok' if ok else 'FAILED'} in {seconds:.1f}s (run {outcome.run_id})"]
    for check in outcome.failed_checks:
        lines.append(f"    FAILED {check.asset_key.to_user_string()}:{check.check_name}: {check.description}")
    if not ok:
        lines += [f"    {failure}" for failure in outcome.failures]
    return ok, lines


def run_jobs(defs, names: list[str], instance, launch, echo=print) -> bool:
    """Run the jobs `names` in order, each over its runs (`job_runs`), and report every run from its record;
    stop at the first failed run. `launch(name, job, tags)` starts one run and returns its `RunOutcome` once it
    ended."""
    from emo_assets.defs.jobs import job_runs

    for name in names:
        job = defs.resolve_job_def(name)
        for span, tags in job_runs(job):
            ok, lines = run_report(instance, name, launch(name, job, tags), span)
            for line in lines:
                echo(line)
            if not ok:
                return False
    return True


def run_in_process(defs, names: list[str], instance, echo=print) -> bool:
    """`run_jobs` in this process: each run executes here, on `instance`, tagged with this process."""

    def launch(name, job, tags) -> RunOutcome:
        tags = {**tags, PROCESS_TAG: process_identity()}
        result = job.execute_in_process(instance=instance, tags=tags, run_config=QUIET_LOGS, raise_on_error=False)
        return in_process_outcome(result)

    return run_jobs(defs, names, instance, launch, echo)


class WebserverUnreachable(Exception):
    """The deployment's webserver did not answer: nothing was submitted."""


def webserver_client(webserver: str, timeout_s: float = 10.0):
    """A GraphQL client of the webserver at `webserver`, once its `/server_info` answered; else
    `WebserverUnreachable` naming the URL and the reason (the client itself would fail at the first query,
    with the query and its variables as the message)."""
    from dagster_graphql import DagsterGraphQLClient

    url = urlsplit(webserver)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise WebserverUnreachable(f"{webserver!r} is not an http(s) URL")
    try:
        with urllib.request.urlopen(f"{webserver.rstrip('/')}/server_info", timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:  # URLError and socket errors are OSErrors; a bad port is a ValueError
        raise WebserverUnreachable(getattr(exc, "reason", None) or exc) from None
    prefix = url.path.rstrip("/")
    return DagsterGraphQLClient(url.hostname, port_number=url.port, use_https=url.scheme == "https", path_prefix=prefix)


def submit_and_wait(defs, names: list[str], instance, client, echo=print) -> bool:
    """`run_jobs` on the deployment behind the GraphQL `client`: each run is submitted through its API and
    followed through its status there; the report reads the run's record and events in the instance."""
    import dagster as dg

    finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

    def launch(name, job, tags) -> RunOutcome:
        run_id = client.submit_job_execution(name, tags=tags)
        while client.get_run_status(run_id) not in finished:
            time.sleep(POLL_SECONDS)
        return logged_outcome(instance, run_id)

    return run_jobs(defs, names, instance, launch, echo)


def unreachable(webserver: str, exc: Exception) -> int:
    """Say in one line that the deployment's webserver does not answer, and how to start it; exit status 1."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    print(
        f"error: the Dagster webserver at {webserver} (--webserver, $EMO_ASSETS_WEBSERVER) is not reachable: "
        f"{reason}. Start the deployment with `make cluster-up` and load its variables (set -a; . .cluster/env).",
        file=sys.stderr,
    )
    return 1


def materialize(args) -> int:
    """Run the stage jobs of the selected variants in dependency order.

    When this call owns the process (the `emo-assets` program, which exits right after), `gc.freeze()` takes
    what is alive after the imports and the definitions (torch, transformers, Dagster, MLflow), and again what
    is alive at the end, out of the garbage collector's scans: they live until the process exits anyway, and
    every full collection, including those of the interpreter's shutdown, would scan them all. A caller that
    goes on (`main([...])` from Python, e.g. tests) keeps the normal collector.
    """
    if args.deprecated_alias:
        print("warning: --phase2-only is deprecated and will be removed; use --extraction-only", file=sys.stderr)
    if args.profile:
        os.environ["EMO_ASSETS_PROFILE"] = args.profile
    from dagster import DagsterInstance
    from dagster_graphql import DagsterGraphQLClientError

    from emo_assets.core.config import load_settings
    from emo_assets.definitions import build_defs
    from emo_assets.defs.jobs import stage_order

    settings = load_settings()
    unknown = sorted(set(args.variant or []) - set(settings.datasets))
    if unknown:
        print(f"error: unknown variant(s) {unknown}; configured: {sorted(settings.datasets)}", file=sys.stderr)
        return 2
    variants = args.variant or list(settings.datasets)
    cluster = args.deployment != "local"  # every other deployment runs its jobs behind its own webserver
    if cluster and not os.environ.get("DAGSTER_HOME"):
        message = (
            f"error: --deployment {args.deployment} reads the runs from the deployment's instance: set DAGSTER_HOME"
        )
        print(message, file=sys.stderr)
        return 2
    if cluster:
        try:
            client = webserver_client(args.webserver)
        except WebserverUnreachable as exc:
            return unreachable(args.webserver, exc)
    home = os.environ["DAGSTER_HOME"] if cluster else prepare_dagster_home(settings.root)
    print(
        f"profile {settings.profile}: models {list(settings.model_slugs)}, variants {variants}, "
        f"results {settings.results_dir}, {args.deployment} deployment, DAGSTER_HOME {home}"
    )
    instance = DagsterInstance.get()
    names = stage_order(settings, variants, extraction_only=args.extraction_only or args.deprecated_alias)
    defs = build_defs(settings)
    if cluster:
        try:
            ok = submit_and_wait(defs, names, instance, client)
        except DagsterGraphQLClientError as exc:  # the webserver went away during the sequence
            return unreachable(args.webserver, exc)
    else:
        release_abandoned_runs(instance)
        if args.owns_process:
            gc.freeze()
        ok = run_in_process(defs, names, instance)
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
    # `dagster dev`, not `dg dev`: dg comes with the dev extra only. Its SupersessionWarning pointing to `dg dev`
    # is silenced by its exact message; every other warning is still printed.
    return supervise(
        [sys.executable, "-W", DEV_SUPERSEDED, "-m", "dagster", "dev"]
        + ["-h", args.host, "-p", str(args.port), "-w", str(workspace)]
    )


def supervise(command: list[str], grace_s: float = UI_STOP_GRACE_S) -> int:
    """Run `command` (`dagster dev`) in a session of its own until it exits; SIGTERM or SIGINT to this process
    (`docker stop`, systemd, Ctrl-C) stop it as Ctrl-C would, which `dagster dev` answers by stopping its webserver
    and daemon. What is left of its process group after it exited, or `grace_s` after the signal, is killed.
    Returns 0 after a requested stop, else the command's exit status.

    The handlers are installed before the child starts, so it begins with the default SIGINT disposition even
    when this process inherited SIGINT ignored (a background job of a shell): Python then turns SIGINT into the
    KeyboardInterrupt `dagster dev` handles.
    """
    requested: list[float] = []
    child: subprocess.Popen | None = None

    def stop(signum, frame) -> None:
        requested.append(time.monotonic())
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(command, start_new_session=True)
        if requested:  # a signal came while it started
            os.kill(child.pid, signal.SIGINT)
        while child.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
            if requested and time.monotonic() - requested[0] > grace_s:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # the group's stragglers; nothing when it stopped cleanly
            child.wait()
    return 0 if requested else child.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("materialize", help="materialize every asset of a profile by running its stage jobs")
    run.add_argument("--profile", help="model profile from config.toml (offline | paper); default: the configured one")
    run.add_argument("--variant", action="append", help="dataset variant to build (repeatable); default: all")
    run.add_argument(
        "--extraction-only",
        action="store_true",
        help="stop after the extraction (datasets, models, activations, summaries): no analysis assets",
    )
    run.add_argument(
        "--phase2-only", dest="deprecated_alias", action="store_true", help="deprecated alias of --extraction-only"
    )
    run.add_argument(
        "--deployment",
        choices=DEPLOYMENTS,
        default=os.environ.get("EMO_ASSETS_DEPLOYMENT", "local"),
        help="local: run the jobs in this process; cluster, kubernetes: submit them to the running deployment "
        "(default: $EMO_ASSETS_DEPLOYMENT or local)",
    )
    run.add_argument(
        "--webserver",
        default=os.environ.get("EMO_ASSETS_WEBSERVER", DEFAULT_WEBSERVER),
        help="the cluster deployment's Dagster webserver (default: $EMO_ASSETS_WEBSERVER or %(default)s)",
    )
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
