"""Two writers of the same output at the same time: the final file is one complete run's output, byte-equal to
a single run's, never an interleaving of the two, and no temp file is left behind.

Each writer streams into its own temp file (`.<name>.tmp-<pid>-<random>`) and publishes with an atomic rename,
so the last rename wins and both candidates are identical for identical inputs. A live writer's temp file is
never taken for a stale one (`remove_stale_temps` only deletes temps of dead processes).
"""

from __future__ import annotations

import subprocess

import pytest

from emo_assets.core.activations import ActivationFile, ActivationWriter
from emo_assets.core.atomic import temp_path_for, write_bytes_atomic
from emo_assets.extract import main as extract_main
from emo_assets_tests.reliability.helpers import (
    CLI_WRAPPER,
    PYTHON,
    dataset_env,
    extract_command,
    sha256,
    temp_files,
)
from emo_assets_tests.reliability.test_write_faults import arrays, header, layout, write_good


def test_interleaved_writers_in_one_process_do_not_mix(tmp_path):
    """Two writers of one path, batches alternating, different data: the result is exactly one of them."""
    final = tmp_path / "activations_anger.safetensors"
    lengths = [7, 3, 9, 5]
    offsets, ids = layout(lengths)
    reference = {}
    for seed in (1, 2):
        write_good(tmp_path / f"ref{seed}.safetensors", seed=seed, lengths=lengths)
        reference[seed] = (tmp_path / f"ref{seed}.safetensors").read_bytes()
    writers = {seed: ActivationWriter(final, header(seed), offsets=offsets, input_ids=ids) for seed in (1, 2)}
    data = {seed: arrays(seed, lengths) for seed in (1, 2)}
    for writer in writers.values():
        writer.__enter__()
    assert len(temp_files(tmp_path)) == 2
    for index, length in enumerate(lengths):
        start = int(offsets[index])
        for seed, writer in writers.items():
            writer.write_batch({k: a[:, start : start + length] for k, a in data[seed].items()}, [index], [length])
    writers[1].commit()
    assert final.read_bytes() == reference[1]
    assert len(temp_files(tmp_path)) == 1, "the first publish removed the live writer's temp file"
    writers[2].commit()
    assert final.read_bytes() == reference[2]
    assert temp_files(tmp_path) == []


def test_live_temp_of_this_process_survives_a_publish(tmp_path):
    final = tmp_path / "summary.json"
    mine = temp_path_for(final)
    mine.write_text("in progress")
    write_bytes_atomic(final, b"{}")
    assert mine.exists()


# Both CLI processes wait in `commit` until the other one has its temp file of the same output too, so the two
# writes of every emotion's file overlap for sure; then both publish.
BARRIER = """
import glob, os, time
from pathlib import Path
from emo_assets.core.activations import ActivationWriter
_commit = ActivationWriter.commit
def _commit_when_both_write(self):
    # this writer's temp file is complete; say so, then wait until the other writer's is too
    barrier = Path(os.environ["RELIABILITY_BARRIER"])
    (barrier / f"{self.final_path.name}.{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(glob.glob(str(barrier / f"{self.final_path.name}.*"))) < 2:
        if time.monotonic() > deadline:
            raise SystemExit("the other writer never got there")
        time.sleep(0.01)
    assert len(glob.glob(str(self.final_path.parent / f".{self.final_path.name}.tmp-*"))) >= 1
    return _commit(self)
ActivationWriter.commit = _commit_when_both_write
"""


@pytest.mark.slow
def test_two_concurrent_cli_runs_on_one_output(tmp_path, small_datasets, offline_models, monkeypatch, capsys):
    env = dataset_env(small_datasets)
    monkeypatch.setenv("EMO_ASSETS_DATASETS", env["EMO_ASSETS_DATASETS"])
    dataset = small_datasets["extended"]
    single = tmp_path / "single"
    assert (
        extract_main(
            [
                "--model",
                "tiny-pythia",
                "--dataset",
                str(dataset),
                "--output",
                str(single),
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()

    shared = tmp_path / "shared"
    env["RELIABILITY_BARRIER"] = str(tmp_path / "barrier")
    (tmp_path / "barrier").mkdir()
    command = extract_command("tiny-pythia", dataset, shared, "--batch-size", "2")
    racing = [
        subprocess.Popen(
            [PYTHON, "-c", CLI_WRAPPER.format(prelude=BARRIER), *command[3:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for process in racing:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err

    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(list((tmp_path / "barrier").iterdir())) == 2 * len(list(single.iterdir()))
    for path in single.iterdir():
        ActivationFile(shared / path.name)
        assert sha256(shared / path.name) == sha256(path), f"{path.name} differs from a single run's output"
    assert temp_files(shared) == []


@pytest.mark.slow
def test_two_concurrent_dagster_materializations_of_one_partition(tmp_path, small_datasets, monkeypatch):
    """Two runs (two instances, two threads) materialize `baseline/activations[anger|tiny-gpt2]` at once into
    one results folder; both wait in `commit` until the other has written its file too."""
    import threading

    import dagster as dg

    from emo_assets.definitions import build_defs
    from emo_assets.defs.activations import activation_path, activations_key
    from emo_assets.defs.jobs import LOAD_MODELS, datasets_job
    from emo_assets_tests.pipeline import materialize, run_jobs
    from emo_assets_tests.reliability.helpers import dagster_settings

    settings = dagster_settings(tmp_path, small_datasets, EMO_ASSETS_MODELS="tiny-gpt2")
    defs = build_defs(settings)
    final = activation_path(settings, "baseline", "tiny-gpt2", "anger")
    partition = {"dagster/partition": "anger|tiny-gpt2"}
    with dg.DagsterInstance.ephemeral() as instance:
        assert run_jobs(defs, [LOAD_MODELS, datasets_job("baseline")], instance)
        assert materialize(defs, [activations_key("baseline")], instance, partition).success
    single = final.read_bytes()
    final.unlink()

    barrier = threading.Barrier(2, timeout=120)
    commit = ActivationWriter.commit

    def commit_together(self):
        barrier.wait()  # both temp files are complete now
        assert len(temp_files(final.parent)) == 2
        return commit(self)

    monkeypatch.setattr(ActivationWriter, "commit", commit_together)
    results = []

    def run():
        with dg.DagsterInstance.ephemeral() as instance:
            results.append(
                dg.materialize(
                    defs.assets,
                    selection=[activations_key("baseline")],
                    instance=instance,
                    resources=defs.resources,
                    tags=partition,
                    raise_on_error=False,
                )
            )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 2 and all(r.success for r in results)
    assert final.read_bytes() == single
    ActivationFile(final)
    assert temp_files(settings.results_dir) == []
