"""The cluster deployment under test: started by `deploy/cluster/up.sh` (what `make cluster-up` runs), driven
through the webserver's GraphQL API as the UI drives it, read back from PostgreSQL itself and from the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from emo_assets_tests.conftest import REPO_ROOT

UP, DOWN = REPO_ROOT / "deploy" / "cluster" / "up.sh", REPO_ROOT / "deploy" / "cluster" / "down.sh"
LOCATION = {"repositoryLocationName": "emo_assets", "repositoryName": "__repository__"}
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def read_pairs(path: Path) -> dict[str, str]:
    """KEY=VALUE pairs of up.sh's `env` and `state` files (several per line in `state`)."""
    return dict(item.split("=", 1) for item in path.read_text().split())


@dataclass
class Cluster:
    folder: Path  # EMO_ASSETS_CLUSTER_DIR
    env: dict  # the environment the services were started with, plus the client variables of `env`

    @property
    def state(self) -> dict[str, str]:
        return read_pairs(self.folder / "state")

    @property
    def url(self) -> str:
        return self.env["EMO_ASSETS_WEBSERVER"]

    def worker_pids(self) -> dict[str, int]:
        """worker name -> pid of its `dagster-celery worker start` process (the leader of its process group)."""
        return {key[len("PROC_") :]: int(pid) for key, pid in self.state.items() if key.startswith("PROC_worker")}

    def psql(self, sql: str) -> list[list[str]]:
        """Rows of `sql` run by PostgreSQL's own client on the instance database (tab-separated fields)."""
        out = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                self.env["EMO_ASSETS_PG_PORT"],
                "-U",
                "postgres",
                "-d",
                "dagster",
                "-tA",
                "-F",
                "\t",
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    @contextlib.contextmanager
    def instance(self):
        """The instance, for reading run records and event logs through Dagster's own API."""
        import dagster as dg
        import pytest

        with pytest.MonkeyPatch.context() as patch:  # dagster.yaml reads the connection from the environment
            for key in (key for key in self.env if key.startswith("EMO_ASSETS_PG_")):
                patch.setenv(key, self.env[key])
            instance = dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])
        with instance:
            yield instance

    def graphql(self, query: str, **variables) -> dict:
        """POST one GraphQL request; retried on a server error, as a user reloads the page: after a PostgreSQL
        restart the webserver answers one error per pooled connection the restart closed, then reconnects."""
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        for attempt in range(3):
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    payload = json.load(response)
                break
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == 2:
                    raise
                time.sleep(1)
        assert not payload.get("errors"), payload["errors"]
        return payload["data"]

    def launch_backfill(self, asset_paths: list[list[str]], **params) -> str:
        """Launch an asset backfill as the UI's "Materialize" dialog does; return its id."""
        data = self.graphql(
            """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack } } }""",
            params={
                "assetSelection": [{"path": path} for path in asset_paths],
                "fromFailure": False,
                "tags": [],
                **params,
            },
        )["launchPartitionBackfill"]
        assert data["__typename"] == "LaunchBackfillSuccess", data
        return data["backfillId"]

    def wait_backfill(self, backfill_id: str, timeout_s: float) -> str:
        """The backfill's final status (after its runs ended)."""
        query = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                     ... on PartitionBackfill { status } ... on PythonError { message } } }"""
        return self._wait(
            lambda: self.graphql(query, id=backfill_id)["partitionBackfillOrError"]["status"],
            BACKFILL_DONE,
            timeout_s,
            f"backfill {backfill_id}",
        )

    def backfill_error(self, backfill_id: str) -> str:
        """The error message the daemon recorded on a failed backfill ("" when there is none)."""
        query = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
                     ... on PartitionBackfill { error { message } } } }"""
        error = self.graphql(query, id=backfill_id)["partitionBackfillOrError"]["error"]
        return error["message"] if error else ""

    def launch_run(self, tags: dict[str, str], asset_paths: list[list[str]] | None = None, job: str = "") -> str:
        """Launch one run of `job`, or of the implicit asset job over `asset_paths` (as the UI's Materialize
        button does)."""
        selector = (
            {**LOCATION, "jobName": job}
            if job
            else {**LOCATION, "jobName": "__ASSET_JOB", "assetSelection": [{"path": path} for path in asset_paths]}
        )
        data = self.graphql(
            """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
                 ... on InvalidSubsetError { message } ... on RunConfigValidationInvalid { errors { message } } } }""",
            params={
                "selector": selector,
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
            },
        )["launchRun"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def reexecute_from_failure(self, run_id: str) -> str:
        data = self.graphql(
            """mutation($params: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $params) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack } } }""",
            params={"parentRunId": run_id, "strategy": "FROM_FAILURE"},
        )["launchRunReexecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def set_sensor(self, name: str, running: bool) -> str:
        """Turn a sensor on or off as the UI's toggle does; return its new status."""
        selector = {**LOCATION, "sensorName": name}
        if running:
            data = self.graphql(
                """mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
                                     ... on Sensor { sensorState { status } } } }""",
                s=selector,
            )["startSensor"]
            return data["sensorState"]["status"]
        sensor_id = self.graphql(
            """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
                                      ... on Sensor { id } } }""",
            s=selector,
        )["sensorOrError"]["id"]
        data = self.graphql(
            """mutation($id: String!) { stopSensor(id: $id) {
                                 ... on StopSensorMutationResult { instigationState { status } } } }""",
            id=sensor_id,
        )
        return data["stopSensor"]["instigationState"]["status"]

    def wait_run(self, run_id: str, timeout_s: float) -> str:
        query = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
        return self._wait(
            lambda: self.graphql(query, id=run_id)["runOrError"]["status"], RUN_DONE, timeout_s, f"run {run_id}"
        )

    def _wait(self, poll, done: set[str], timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            status = poll()
            if status in done:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} still {status} after {timeout_s}s; logs in {self.folder / 'logs'}")
            time.sleep(1)


def start_cluster(folder: Path, env: dict[str, str]) -> Cluster:
    """Run up.sh (it stops what it started when it fails); raise with the log tails on failure."""
    env = {**env, "EMO_ASSETS_CLUSTER_DIR": str(folder)}
    result = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted((folder / "logs").glob("*.log"))
        )
        raise RuntimeError(f"up.sh failed ({result.returncode}): {result.stdout}{result.stderr}\n{logs}")
    return Cluster(folder, {**env, **read_pairs(folder / "env")})


def stop_cluster(folder: Path) -> None:
    subprocess.run(
        ["bash", str(DOWN)],
        env={**os.environ, "EMO_ASSETS_CLUSTER_DIR": str(folder)},
        check=True,
        capture_output=True,
        timeout=180,
    )
