"""Tests of `python -m emo_assets.validate` over the committed corpus of malformed and accepted files.

Each file under `data/bad/` carries exactly one problem (they all contain every emotion, so nothing else
fires); `BAD_CASES` says where it must be reported. A file added to `data/bad/` without an expectation
fails `test_every_bad_file_has_an_expectation`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emo_assets.validate import main

TESTS = Path(__file__).resolve().parent
BAD = TESTS / "data" / "bad"
GOOD = TESTS / "data" / "good"
PROJECT = TESTS.parent
TOKENIZER = "<tokenizer>"  # replaced by the tiny word-level tokenizer directory built below

# file name -> (line or None, field, extra CLI arguments)
BAD_CASES = {
    "invalid_json.jsonl": (3, "json", []),
    "non_object_line.jsonl": (3, "json", []),
    "top_level_array.jsonl": (1, "json", []),
    "missing_text.jsonl": (3, "text", []),
    "non_string_text.jsonl": (3, "text", []),
    "empty_text.jsonl": (3, "text", []),
    "whitespace_only_text.jsonl": (3, "text", []),
    "unpaired_surrogate_text.jsonl": (3, "text", []),
    "missing_emotion.jsonl": (3, "emotion", []),
    "non_string_emotion.jsonl": (3, "emotion", []),
    "unknown_emotion.jsonl": (3, "emotion", []),
    "id_wrong_type.jsonl": (3, "id", []),
    "duplicate_id.jsonl": (3, "id", []),
    "duplicate_text.jsonl": (3, "text", ["--strict"]),
    "invalid_utf8.jsonl": (3, "encoding", []),
    "zero_samples_for_an_emotion.jsonl": (None, "emotion", []),
    "too_many_tokens.jsonl": (3, "text", ["--tokenizer", TOKENIZER, "--max-tokens", "20"]),
    "empty_file.jsonl": (None, "file", []),
    "directory_not_a_file.jsonl": (None, "file", []),
    "does_not_exist.jsonl": (None, "file", []),  # deliberately absent
}


@pytest.fixture(autouse=True)
def default_configuration(monkeypatch):
    """Use the packaged configuration (its four emotions), whatever the environment says."""
    for name in ("EMO_ASSETS_CONFIG", "EMO_ASSETS_EMOTIONS", "EMO_ASSETS_PROFILE", "EMO_ASSETS_MODELS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> str:
    """A local Hugging Face tokenizer directory that counts whitespace-separated words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)


def expected_prefix(path: str, line: int | None, field: str) -> str:
    return f"{path}: {field}: " if line is None else f"{path}:{line}: {field}: "


def cli_args(name: str, request) -> tuple[str, list[str]]:
    path = str(BAD / name)
    extra = BAD_CASES[name][2]
    if TOKENIZER in extra:
        tokenizer = request.getfixturevalue("word_tokenizer")
        extra = [tokenizer if arg == TOKENIZER else arg for arg in extra]
    return path, [path, *extra]


def test_every_bad_file_has_an_expectation():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(set(BAD_CASES) - {"does_not_exist.jsonl"})
    assert not (BAD / "does_not_exist.jsonl").exists()


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file_fails_with_the_expected_issue(name, request, capsys):
    path, args = cli_args(name, request)
    line, field, _ = BAD_CASES[name]

    assert main(args) == 2

    err = capsys.readouterr().err.splitlines()
    error_lines = [entry for entry in err if entry.endswith("[error]")]
    prefix = expected_prefix(path, line, field)
    assert error_lines and all(entry.startswith(prefix) for entry in error_lines), err
    assert f"{path}: FAILED (" in "\n".join(err)


def test_bad_file_via_subprocess():
    path = str(BAD / "invalid_json.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMO_ASSETS_")}
    result = subprocess.run(
        [sys.executable, "-m", "emo_assets.validate", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:3: json: invalid JSON: ")
    assert result.stdout == ""


def test_good_files_via_subprocess_print_a_summary():
    paths = [str(p) for p in sorted(GOOD.iterdir())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMO_ASSETS_")}
    result = subprocess.run(
        [sys.executable, "-m", "emo_assets.validate", "--strict", *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    summary = f"{GOOD / 'bom.jsonl'}: 8 samples (gratitude=2, anger=2, apology=2, neutral=2) OK"
    assert summary in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == len(paths)


def test_duplicate_text_warns_by_default_and_fails_when_strict(capsys):
    path = str(BAD / "duplicate_text.jsonl")
    assert main([path]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"{path}:3: text: duplicate text of line 1 ")
    assert err.rstrip().endswith("[warning]")
    assert out == f"{path}: 9 samples (gratitude=3, anger=2, apology=2, neutral=2) OK with 1 warning\n"

    assert main([path, "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: text: duplicate text of line 1 " in err and "[error]" in err


def test_all_files_are_checked_and_any_failure_fails(capsys):
    good, bad = str(GOOD / "crlf.jsonl"), str(BAD / "missing_text.jsonl")
    assert main([bad, good]) == 2
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: 8 samples")
    assert f"{bad}:3: text: missing [error]" in err


def test_token_limit_passes_when_the_text_fits(word_tokenizer, capsys):
    path = str(BAD / "too_many_tokens.jsonl")
    assert main([path, "--tokenizer", word_tokenizer, "--max-tokens", "30"]) == 0
    assert main([path, "--tokenizer", word_tokenizer, "--max-tokens", "29"]) == 2
    assert f"{path}:3: text: 30 tokens exceed the model context of 29 [error]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--max-tokens", "5"],
        ["--tokenizer", "."],
        ["--tokenizer", "/nonexistent-dir", "--max-tokens", "5"],
        ["--max-tokens", "0"],
    ],
    ids=["max-tokens-alone", "tokenizer-alone", "missing-tokenizer-dir", "zero-max-tokens"],
)
def test_bad_token_options_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as caught:
        main([str(GOOD / "crlf.jsonl"), *args])
    assert caught.value.code == 2


def test_emotions_option_overrides_the_configuration(tmp_path, capsys):
    path = tmp_path / "two.jsonl"
    path.write_text(
        json.dumps({"text": "I love this!", "emotion": "joy"})
        + "\n"
        + json.dumps({"text": "Oh no.", "emotion": "sadness"})
        + "\n",
        encoding="utf-8",
    )
    assert main([str(path), "--emotions", "joy, sadness"]) == 0
    assert capsys.readouterr().out == f"{path}: 2 samples (joy=1, sadness=1) OK\n"
    assert main([str(path)]) == 2
    assert "unknown emotion 'joy' (allowed: gratitude, anger, apology, neutral)" in capsys.readouterr().err


def test_broken_configuration_falls_back_to_the_default_emotions(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EMO_ASSETS_CONFIG", str(tmp_path / "missing.toml"))
    assert main([str(GOOD / "crlf.jsonl")]) == 0
    assert "note: configuration not loaded" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["emotion_dataset.jsonl", "emotion_dataset_extended.jsonl"])
def test_real_datasets_pass_strict(name, capsys):
    path = PROJECT / "data" / name
    if not path.exists():
        pytest.skip(f"{path} has not been written yet")
    assert main([str(path), "--strict"]) == 0, capsys.readouterr().err


def _with_duplicates(tmp_path, copies: int, errors: int = 0) -> tuple[str, list[int], list[int]]:
    """The good 8-sample file plus `copies` repeated texts and `errors` unknown emotions; (path, warning lines,
    error lines)."""
    records = [json.loads(line) for line in (GOOD / "crlf.jsonl").read_text(encoding="utf-8").splitlines()]
    extra = [{**records[i % len(records)], "id": f"copy-{i}"} for i in range(copies)]
    extra += [{"text": f"Joyful sentence {i}.", "emotion": "joy"} for i in range(errors)]
    path = tmp_path / "duplicates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records + extra), encoding="utf-8")
    first = len(records) + 1
    return str(path), list(range(first, first + copies)), list(range(first + copies, first + copies + errors))


def test_many_warnings_print_the_first_five_and_a_count(tmp_path, capsys):
    path, warning_lines, _ = _with_duplicates(tmp_path, copies=12)
    assert main([path]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert [line.split(":")[1] for line in lines[:-1]] == [str(n) for n in warning_lines[:5]]
    assert all(line.endswith("[warning]") for line in lines[:-1])
    assert lines[-1] == (
        f"{path}: 7 more warnings not shown (12 in all); --all-warnings prints every one, --strict makes them errors"
    )
    assert out.endswith("OK with 12 warnings\n")

    assert main([path, "--all-warnings"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in lines] == [str(n) for n in warning_lines]

    assert main([path, "--strict"]) == 2  # as errors, every one is printed
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in lines if line.endswith("[error]")] == [str(n) for n in warning_lines]


def test_every_error_is_printed_beside_condensed_warnings(tmp_path, capsys):
    path, warning_lines, error_lines = _with_duplicates(tmp_path, copies=9, errors=8)
    assert main([path]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in lines if line.endswith("[error]")] == [str(n) for n in error_lines]
    assert [line.split(":")[1] for line in lines if line.endswith("[warning]")] == [str(n) for n in warning_lines[:5]]
    assert f"{path}: 4 more warnings not shown (9 in all); " in "\n".join(lines)
    assert lines[-1] == f"{path}: FAILED (8 errors, 9 warnings)"
