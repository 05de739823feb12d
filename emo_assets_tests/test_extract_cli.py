"""The seed-compatible CLI: files, counts, exit codes, nothing written on bad input, SIGKILL safety."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emo_assets.core.activations import ActivationFile
from emo_assets.core.models import corpus_texts, weights_sha256
from emo_assets.core.offline_models import tiny_model_dir
from emo_assets.extract import main
from emo_assets_tests.conftest import BASELINE, EXTENDED, REPO_ROOT, read_records, write_records

EMOTIONS = ("gratitude", "anger", "apology", "neutral")


@pytest.fixture
def cli_env(monkeypatch, small_datasets):
    """Configure the tiny models' training corpus exactly like the session fixture (cache hit, fast)."""
    monkeypatch.setenv("EMO_ASSETS_DATASETS", ",".join(f"{k}={v}" for k, v in small_datasets.items()))
    return small_datasets


def test_every_emotion_gets_a_file_with_the_dataset_counts(cli_env, tmp_path, capsys):
    dataset = cli_env["baseline"]
    assert (
        main(["--model", "tiny-gpt2", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    records = read_records(dataset)
    for emotion in EMOTIONS:
        stored = ActivationFile(tmp_path / "out" / f"activations_{emotion}.safetensors")
        expected_ids = [r["id"] for r in records if r["emotion"] == emotion]
        assert stored.sentence_ids == expected_ids
        assert stored.metadata["emotion"] == emotion
        assert stored.metadata["dataset_sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
        assert stored.kinds == ["resid_post", "mlp_out"]
    assert "samples/s" in capsys.readouterr().out


def test_single_emotion_and_options(cli_env, tmp_path):
    args = [
        "--model",
        "tiny-pythia",
        "--dataset",
        str(cli_env["baseline"]),
        "--output",
        str(tmp_path),
        "--emotion",
        "apology",
        "--attention",
        "--prepend-bos",
        "--storage-dtype",
        "float16",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activations_apology.safetensors"]
    stored = ActivationFile(tmp_path / "activations_apology.safetensors")
    assert stored.kinds == ["resid_post", "mlp_out", "attn_out"]
    assert (stored.metadata["prepend_bos"], stored.dtype) == ("true", "float16")


def test_rerun_reuses_rows_and_no_reuse_reproduces_the_files(cli_env, tmp_path, capsys):
    """The extended dataset after the baseline into the same folder: only sentences not in the baseline files are
    forwarded; `--no-reuse` writes exactly the bytes of a from-scratch run."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    base = ["--model", "tiny-gpt2", "--no-progress"]
    assert main([*base, "--dataset", str(cli_env["baseline"]), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main([*base, "--dataset", str(cli_env["extended"]), "--output", str(out)]) == 0
    assert "reused" in capsys.readouterr().out
    baseline, extended = read_records(cli_env["baseline"]), read_records(cli_env["extended"])
    for emotion in EMOTIONS:
        reuse = ActivationFile(out / f"activations_{emotion}.safetensors").header.reuse
        shared = {r["text"] for r in baseline if r["emotion"] == emotion}
        n_extended = sum(r["emotion"] == emotion for r in extended)
        in_baseline = sum(r["emotion"] == emotion and r["text"] in shared for r in extended)
        assert (reuse.reused, reuse.computed) == (in_baseline, n_extended - in_baseline) and in_baseline > 0
    assert main([*base, "--dataset", str(cli_env["extended"]), "--output", str(scratch)]) == 0
    assert main([*base, "--dataset", str(cli_env["extended"]), "--output", str(out), "--no-reuse"]) == 0
    for emotion in EMOTIONS:
        name = f"activations_{emotion}.safetensors"
        assert (out / name).read_bytes() == (scratch / name).read_bytes()


def _assert_rejected(args, tmp_path, capsys, *fragments, code=2):
    assert main(args + ["--output", str(tmp_path / "out"), "--no-progress"]) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_invalid_dataset_exits_2_and_writes_nothing(cli_env, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = cli_env["baseline"].read_text().splitlines()
    lines[2] = '{"id": "x", "emotion": "anger"'
    bad.write_text("\n".join(lines) + "\n")
    _assert_rejected(["--model", "tiny-gpt2", "--dataset", str(bad)], tmp_path, capsys, f"{bad}:3: json:")


def test_unknown_and_unsafe_emotions_exit_2(cli_env, tmp_path, capsys):
    base = ["--model", "tiny-gpt2", "--dataset", str(cli_env["baseline"])]
    _assert_rejected(base + ["--emotion", "joy"], tmp_path, capsys, "'joy' is not one of")
    _assert_rejected(base + ["--emotion", "../../etc"], tmp_path, capsys, "invalid emotion")


def test_text_longer_than_context_exits_2_naming_the_line(cli_env, tmp_path, capsys):
    records = read_records(cli_env["baseline"])
    records[5]["text"] = " ".join(["remarkably"] * 700)
    long_file = write_records(tmp_path / "long.jsonl", records)
    _assert_rejected(
        ["--model", "tiny-gpt2", "--dataset", str(long_file)], tmp_path, capsys, f"{long_file}:6: text:", "exceed"
    )


def test_model_load_failure_exits_1(cli_env, tmp_path, capsys):
    _assert_rejected(
        ["--model", str(tmp_path / "no-such-model"), "--dataset", str(cli_env["baseline"])],
        tmp_path,
        capsys,
        "does not exist",
        code=1,
    )


def test_missing_dataset_exits_2(cli_env, tmp_path, capsys):
    _assert_rejected(
        ["--model", "tiny-gpt2", "--dataset", str(tmp_path / "none.jsonl")], tmp_path, capsys, "none.jsonl"
    )


@pytest.mark.parametrize("where", ["file", "file/sub", "/proc/nope"])
def test_an_output_that_cannot_be_a_folder_exits_2_before_the_model_loads(cli_env, tmp_path, capsys, where):
    """The model named does not exist: had it been loaded first, the exit would be 1 with its error."""
    (tmp_path / "file").write_text("not a folder")
    output = where if where.startswith("/") else str(tmp_path / where)
    args = ["--model", str(tmp_path / "no-such-model"), "--dataset", str(cli_env["baseline"]), "--output", output]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {output}") and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "not a folder" and not Path("/proc/nope").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the write check left nothing behind


def test_an_unknown_device_exits_2_with_one_line(cli_env, tmp_path, capsys):
    _assert_rejected(
        ["--model", "tiny-gpt2", "--dataset", str(cli_env["baseline"]), "--device", "tpu"],
        tmp_path,
        capsys,
        "error: --device must be one of ('cpu', 'cuda', 'auto') or cuda:N, got 'tpu'\n",
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [("EMO_ASSETS_MAX_AGE_HOURS", "soon"), ("EMO_ASSETS_REUSE", "maybe"), ("EMO_ASSETS_TRUST_REMOTE_CODE", "maybe")],
)
def test_an_invalid_environment_value_exits_2_naming_it(cli_env, tmp_path, capsys, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    _assert_rejected(
        ["--model", "tiny-gpt2", "--dataset", str(cli_env["baseline"])], tmp_path, capsys, f"{variable}={value!r}: "
    )


def test_another_models_files_are_kept_unless_overwrite_is_given(cli_env, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--dataset", str(cli_env["baseline"]), "--output", str(out), "--emotion", "anger", "--no-progress"]
    assert main(["--model", "tiny-gpt2", *base]) == 0
    first = (out / "activations_anger.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["--model", "tiny-pythia", *base]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'activations_anger.safetensors'} holds the activations of model 'tiny-gpt2'" in err
    assert "--overwrite" in err and (out / "activations_anger.safetensors").read_bytes() == first
    assert main(["--model", "tiny-gpt2", *base]) == 0  # the same model may rerun into its own folder
    assert main(["--model", "tiny-pythia", *base, "--overwrite"]) == 0
    assert ActivationFile(out / "activations_anger.safetensors").header.model_id == "tiny-pythia"


def test_a_file_that_is_not_activations_is_not_replaced_without_overwrite(cli_env, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "activations_anger.safetensors").write_text("my notes")
    args = ["--model", "tiny-gpt2", "--dataset", str(cli_env["baseline"]), "--output", str(tmp_path / "out")]
    assert main([*args, "--emotion", "anger", "--no-progress"]) == 2
    assert "is not a readable activation file" in capsys.readouterr().err
    assert (tmp_path / "out" / "activations_anger.safetensors").read_text() == "my notes"


def test_a_repeated_emotion_flag_extracts_each_emotion_asked_for(cli_env, tmp_path):
    out = tmp_path / "out"
    args = ["--model", "tiny-gpt2", "--dataset", str(cli_env["baseline"]), "--output", str(out), "--no-progress"]
    assert main([*args, "--emotion", "neutral", "--emotion", "anger", "--emotion", "neutral"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["activations_anger.safetensors", "activations_neutral.safetensors"]
    records = read_records(cli_env["baseline"])
    for emotion in ("anger", "neutral"):
        expected = [r["id"] for r in records if r["emotion"] == emotion]
        assert ActivationFile(out / f"activations_{emotion}.safetensors").sentence_ids == expected


def test_a_dataset_of_only_the_emotion_asked_for_is_accepted(cli_env, tmp_path, capsys):
    records = [r for r in read_records(cli_env["baseline"]) if r["emotion"] == "anger"]
    anger_only = write_records(tmp_path / "anger_only.jsonl", records)
    args = ["--model", "tiny-gpt2", "--dataset", str(anger_only), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "out"), "--emotion", "anger"]) == 0
    stored = ActivationFile(tmp_path / "out" / "activations_anger.safetensors")
    assert stored.sentence_ids == [r["id"] for r in records]
    # every emotion asked for (here: all, by default) must still have sentences
    _assert_rejected(args, tmp_path / "all", capsys, "no samples for emotion 'gratitude'")


def test_an_offline_model_name_means_one_model_from_any_folder(tmp_path, monkeypatch, small_datasets):
    """The packaged configuration, run from the project folder (as `make demo`) and from another folder with another
    EMO_ASSETS_ROOT: the same tiny model, trained on the committed dataset files, writes the same bytes."""
    for name in ("EMO_ASSETS_DATASETS", "EMO_ASSETS_CONFIG", "EMO_ASSETS_ROOT"):
        monkeypatch.delenv(name, raising=False)
    dataset = str(small_datasets["baseline"])
    args = ["--model", "tiny-gpt2", "--dataset", dataset, "--emotion", "anger", "--no-progress"]
    monkeypatch.chdir(REPO_ROOT)
    assert main([*args, "--output", str(tmp_path / "from_project")]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("EMO_ASSETS_ROOT", str(tmp_path / "another_root"))
    assert main([*args, "--output", "out"]) == 0
    name = "activations_anger.safetensors"
    assert (tmp_path / "elsewhere" / "out" / name).read_bytes() == (tmp_path / "from_project" / name).read_bytes()
    committed = tiny_model_dir("tiny-gpt2", corpus_texts([BASELINE, EXTENDED]))
    assert ActivationFile(tmp_path / "from_project" / name).header.model_revision == weights_sha256(committed)


def test_a_missing_configured_dataset_stops_a_tiny_model_instead_of_changing_it(
    small_datasets, tmp_path, monkeypatch, capsys
):
    absent = tmp_path / "absent.jsonl"
    monkeypatch.setenv("EMO_ASSETS_DATASETS", f"baseline={small_datasets['baseline']},extended={absent}")
    args = ["--model", "tiny-gpt2", "--dataset", str(small_datasets["baseline"]), "--emotion", "anger"]
    _assert_rejected(args, tmp_path, capsys, "--model tiny-gpt2 is trained on", str(absent), "EMO_ASSETS_ROOT")


@pytest.mark.slow
def test_sigkill_mid_write_leaves_no_file_and_keeps_the_previous_one(tmp_path):
    """Kill the CLI while the temp file of the second run exists: final path holds the first run's bytes."""
    out = tmp_path / "out"
    big = write_records(tmp_path / "big.jsonl", read_records(REPO_ROOT / "data" / "emotion_dataset_extended.jsonl"))
    env = {**os.environ, "EMO_ASSETS_DATASETS": f"extended={big}"}
    command = [
        sys.executable,
        "-m",
        "emo_assets.extract",
        "--model",
        "minilm",
        "--dataset",
        str(big),
        "--output",
        str(out),
        "--emotion",
        "neutral",
        "--no-progress",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    final = out / "activations_neutral.safetensors"
    good = final.read_bytes()

    # --no-reuse: the second run really rewrites the file (with reuse it would keep the up-to-date one)
    process = subprocess.Popen(
        command + ["--batch-size", "1", "--no-reuse"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".activations_neutral") for p in out.iterdir()):
        assert process.poll() is None, "the extraction finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.3)  # let it write some batches
    assert process.poll() is None, "the extraction finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert final.read_bytes() == good
    ActivationFile(final)  # still valid
    assert any(p.name.startswith(".activations_neutral") for p in out.iterdir())  # the killed run's temp

    subprocess.run(command + ["--no-reuse"], env=env, check=True, capture_output=True, timeout=300)
    assert [p.name for p in out.iterdir()] == ["activations_neutral.safetensors"]  # stale temp cleaned
    assert final.read_bytes() == good  # deterministic rerun


def _imported_modules(args: list[str], env: dict) -> tuple[int, set[str]]:
    """Exit code and every module a fresh CLI process imported (from `python -X importtime`)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "emo_assets.extract", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    names = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.returncode, names


def test_the_process_imports_only_what_extraction_needs(cli_env, tmp_path):
    env = {"EMO_ASSETS_DATASETS": os.environ["EMO_ASSETS_DATASETS"]}
    bad = write_records(tmp_path / "bad.jsonl", [{"id": "x", "emotion": "anger"}])
    code, names = _imported_modules(
        ["--model", "tiny-gpt2", "--dataset", str(bad), "--output", str(tmp_path / "o")], env
    )
    assert code == 2 and "emo_assets.core.datasets" in names
    assert not {"torch", "transformers", "numpy"} & names  # invalid input is reported before the heavy imports
    code, names = _imported_modules(
        [
            "--model",
            "tiny-gpt2",
            "--dataset",
            str(cli_env["baseline"]),
            "--output",
            str(tmp_path / "out"),
            "--emotion",
            "anger",
            "--no-progress",
        ],
        env,
    )
    assert code == 0 and {"torch", "transformers", "emo_assets.core.extraction"} <= names
    assert not {"sklearn", "matplotlib", "polars", "mlflow", "dagster", "emo_assets.core.analysis"} & names
