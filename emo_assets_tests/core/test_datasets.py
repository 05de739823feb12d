"""Tests of `emo_assets.core.datasets`: reading, validation rules, bounded memory, Unicode round-trip.

The malformed-file corpus is exercised end to end through the CLI in `test_validate_cli.py`; this module
tests the library API and the cases that need generated files (the 50 MB line, exact size limits).
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from emo_assets.core.datasets import (
    DEFAULT_EMOTIONS,
    MAX_LINE_BYTES,
    WARNINGS_SHOWN,
    Dataset,
    DatasetError,
    Issue,
    condensed,
    file_sha256,
    read_dataset,
    validate_dataset,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = DATA / "good"

RECORDS = [
    {"text": "Thank you for the lovely flowers.", "emotion": "gratitude"},
    {"text": "I cannot believe you lied to me again!", "emotion": "anger"},
    {"text": "I am sorry I forgot to call you back.", "emotion": "apology"},
    {"text": "The meeting is on the third floor.", "emotion": "neutral"},
]


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    """Write one line per entry (dicts as JSON) and return the path."""
    encoded = [json.dumps(line, ensure_ascii=False) if isinstance(line, dict) else line for line in lines]
    path.write_text("".join(line + "\n" for line in encoded), encoding="utf-8")
    return path


def errors(issues: list[Issue]) -> list[tuple[int | None, str]]:
    return [(issue.line, issue.field) for issue in issues if issue.severity == "error"]


def test_valid_file_reads_samples_in_order(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"id": "a", **RECORDS[0]}, {"id": 2, **RECORDS[1]}, *RECORDS[2:]])
    dataset = read_dataset(path)
    assert [s.id for s in dataset.samples] == ["a", "2", "line-3", "line-4"]
    assert [s.line for s in dataset.samples] == [1, 2, 3, 4]
    assert dataset.emotions() == list(DEFAULT_EMOTIONS)
    assert [s.text for s in dataset.by_emotion("anger")] == [RECORDS[1]["text"]]
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert dataset.path == path and dataset.warnings == ()


def test_emotions_follow_the_configured_order_not_the_file_order(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", list(reversed(RECORDS)))
    dataset = read_dataset(path, emotions=("neutral", "gratitude", "anger", "apology"))
    assert dataset.emotions() == ["neutral", "gratitude", "anger", "apology"]


def test_every_problem_is_reported_not_only_the_first(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            *RECORDS,
            "{broken",
            {"emotion": "anger"},
            {"text": "x", "emotion": "joy"},
            {"id": "", "text": "y", "emotion": "anger"},
        ],
    )
    dataset, issues = validate_dataset(path)
    assert dataset is None
    assert errors(issues) == [(5, "json"), (6, "text"), (7, "emotion"), (8, "id")]
    assert all(issue.path == str(path) for issue in issues)


def test_issue_format_with_and_without_line():
    assert str(Issue("d.jsonl", 3, "text", "empty", "error")) == "d.jsonl:3: text: empty"
    assert str(Issue("d.jsonl", None, "emotion", "no samples for emotion 'apology'", "error")) == (
        "d.jsonl: emotion: no samples for emotion 'apology'"
    )
    assert Issue("d.jsonl", 3, "text", "dup", "warning").describe() == "d.jsonl:3: text: dup [warning]"


def test_dataset_error_lists_errors_before_warnings(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS, RECORDS[0], {"text": "z", "emotion": "joy"}])
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:6: emotion: unknown emotion 'joy' (allowed: gratitude, anger, apology, neutral) [error]",
        f"{path}:5: text: duplicate text of line 1 (compared after collapsing whitespace, case-sensitive) [warning]",
    ]
    assert len(caught.value.issues) == 2


def test_many_warnings_are_condensed_and_every_error_kept(tmp_path):
    copies = [{**RECORDS[0], "id": f"copy-{i}"} for i in range(WARNINGS_SHOWN + 4)]
    unknown = [{"text": f"joy {i}", "emotion": "joy"} for i in range(WARNINGS_SHOWN + 2)]
    lines = [*RECORDS, *[row for pair in zip(copies, unknown) for row in pair], *copies[len(unknown) :]]
    path = write_lines(tmp_path / "d.jsonl", lines)
    _, issues = validate_dataset(path)
    warning_lines = [n for n, line in enumerate(lines, 1) if line.get("id", "").startswith("copy-")]
    error_lines = [n for n, line in enumerate(lines, 1) if line.get("emotion") == "joy"]

    shown, hidden = condensed(issues)
    assert [i.line for i in shown if i.severity == "error"] == error_lines
    assert [i.line for i in shown if i.severity == "warning"] == warning_lines[:WARNINGS_SHOWN]
    assert [i.line for i in shown] == sorted(i.line for i in shown)  # file order kept
    assert hidden == len(warning_lines) - WARNINGS_SHOWN == 4
    assert condensed(issues, limit=len(warning_lines)) == (issues, 0)

    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    message = str(caught.value).splitlines()
    assert len(caught.value.issues) == len(issues)
    assert sum(line.endswith("[error]") for line in message) == len(error_lines)
    assert sum(line.endswith("[warning]") for line in message) == WARNINGS_SHOWN
    assert message[-1] == "... and 4 more warnings"


def test_duplicate_text_is_a_warning_and_an_error_when_strict(tmp_path):
    copy = {"text": "  Thank you for\tthe lovely   flowers. ", "emotion": "gratitude"}
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS, copy])
    dataset, issues = validate_dataset(path)
    assert dataset is not None and len(dataset.samples) == 5
    assert [str(w) for w in dataset.warnings] == [
        f"{path}:5: text: duplicate text of line 1 (compared after collapsing whitespace, case-sensitive)"
    ]
    dataset, issues = validate_dataset(path, strict=True)
    assert dataset is None and errors(issues) == [(5, "text")]


def test_different_case_is_not_a_duplicate(tmp_path):
    shouted = {"text": RECORDS[0]["text"].upper(), "emotion": "gratitude"}
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS, shouted])
    assert read_dataset(path, strict=True).warnings == ()


def test_duplicate_ids_name_the_first_line_and_int_equals_string(tmp_path):
    again = {"id": "7", "text": "q", "emotion": "anger"}
    path = write_lines(tmp_path / "d.jsonl", [{"id": 7, **RECORDS[0]}, *RECORDS[1:], again])
    _, issues = validate_dataset(path)
    assert [str(i) for i in issues] == [f"{path}:5: id: duplicate id '7' (first seen on line 1)"]


def test_an_explicit_id_cannot_collide_with_a_derived_one(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"id": "line-2", **RECORDS[0]}, *RECORDS[1:]])
    _, issues = validate_dataset(path)
    assert errors(issues) == [(2, "id")]
    assert "a record without an id gets the id 'line-N'" in issues[0].reason


def test_missing_emotion_samples_are_errors_without_a_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", RECORDS[:2])
    _, issues = validate_dataset(path)
    assert [str(i) for i in issues] == [
        f"{path}: emotion: no samples for emotion 'apology'",
        f"{path}: emotion: no samples for emotion 'neutral'",
    ]


def test_a_line_with_other_errors_still_counts_for_its_emotion(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS[:3], {"id": True, **RECORDS[3]}])
    _, issues = validate_dataset(path)
    assert errors(issues) == [(4, "id")]  # no extra "no samples for emotion 'neutral'"


def test_token_limit(tmp_path):
    long_text = " ".join(["word"] * 12)
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS, {"text": long_text, "emotion": "neutral"}])
    count_words = lambda text: len(text.split())  # noqa: E731
    _, issues = validate_dataset(path, token_counter=count_words, max_tokens=10)
    assert [str(i) for i in issues] == [f"{path}:5: text: 12 tokens exceed the model context of 10"]
    assert read_dataset(path, token_counter=count_words, max_tokens=12).samples[-1].text == long_text
    with pytest.raises(ValueError, match="token_counter"):
        validate_dataset(path, max_tokens=10)


def test_whole_file_json_array_gets_one_message(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2), encoding="utf-8")
    _, issues = validate_dataset(path)
    assert len(issues) == 1
    assert str(issues[0]).startswith(f"{path}:1: json: expected a JSON object per line, got array")
    assert "JSON Lines" in issues[0].reason


@pytest.mark.parametrize(
    "line",
    ["[" * 200_000 + "]" * 200_000, '{"text": "x", "emotion": "anger", "n": ' + "9" * 5000 + "}"],
    ids=["deep-nesting", "huge-integer"],
)
def test_pathological_json_is_an_issue_not_an_exception(tmp_path, line):
    path = write_lines(tmp_path / "d.jsonl", [*RECORDS, line])
    _, issues = validate_dataset(path)
    assert errors(issues) == [(5, "json")]
    assert issues[0].reason.startswith("invalid JSON: ")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: tmp / "absent.jsonl", "does not exist"),
        (lambda tmp: tmp, "is a directory, expected a JSON Lines file"),
    ],
    ids=["missing", "directory"],
)
def test_unusable_paths_are_issues(tmp_path, make, reason):
    path = make(tmp_path)
    dataset, issues = validate_dataset(path)
    assert dataset is None
    assert [str(i) for i in issues] == [f"{path}: file: {reason}"]
    with pytest.raises(DatasetError, match=reason):
        read_dataset(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file permissions do not bind root")
def test_unreadable_file_is_an_issue(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", RECORDS)
    path.chmod(0)
    _, issues = validate_dataset(path)
    assert [(i.line, i.field) for i in issues] == [(None, "file")]
    assert "Permission denied" in issues[0].reason


def test_invalid_utf8_is_reported_per_line_and_other_lines_are_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r).encode() for r in RECORDS]
    path.write_bytes(b"\n".join([lines[0], b'{"text": "caf\xe9"}', *lines[1:], b'{"text": 1}']) + b"\n")
    _, issues = validate_dataset(path)
    assert [str(i) for i in issues][:1] == [f"{path}:2: encoding: invalid UTF-8 at byte 14"]
    assert errors(issues) == [(2, "encoding"), (6, "text"), (6, "emotion")]


# --- line-length limit and bounded memory ---------------------------------------------------------------


def record_of_size(size: int, emotion: str = "anger", eol: bytes = b"\n") -> bytes:
    """A valid record line of exactly `size` bytes (without `eol`)."""
    shell = json.dumps({"text": "", "emotion": emotion}).encode()
    text = "x" * (size - len(shell))
    return json.dumps({"text": text, "emotion": emotion}).encode() + eol


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b""], ids=["lf", "crlf", "no-final-newline"])
def test_line_limit_is_exact_and_excludes_the_line_ending(tmp_path, eol):
    head = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    at_limit = tmp_path / "at_limit.jsonl"
    at_limit.write_bytes(head + record_of_size(MAX_LINE_BYTES, eol=eol))
    assert len(read_dataset(at_limit).samples[-1].text) > MAX_LINE_BYTES - 100
    over = tmp_path / "over.jsonl"
    over.write_bytes(head + record_of_size(MAX_LINE_BYTES + 1, eol=eol))
    _, issues = validate_dataset(over)
    assert [str(i) for i in issues] == [f"{over}:5: line: {MAX_LINE_BYTES + 1} bytes exceeds the limit of 1048576"]


def test_a_50mb_line_is_skipped_in_bounded_memory(tmp_path):
    size = 50 * 1024 * 1024
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as stream:
        stream.write(json.dumps(RECORDS[0]).encode() + b"\n\n")
        stream.write(b'{"emotion": "anger", "text": "')
        for _ in range(size // (1 << 20)):
            stream.write(b"a" * (1 << 20))
        stream.write(b'"}\r\n')
        stream.write(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS[1:]))
        stream.write(b"{not json}\n")
    huge_line = size + len(b'{"emotion": "anger", "text": "') + len(b'"}')

    tracemalloc.start()
    try:
        dataset, issues = validate_dataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert dataset is None
    assert [str(i) for i in issues] == [
        f"{path}:3: line: {huge_line} bytes exceeds the limit of 1048576",
        f"{path}:7: json: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert peak < 10 * 1024 * 1024, f"validation allocated {peak / 2**20:.1f} MiB"


# --- accepted variants (the committed good corpus) -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in GOOD.iterdir()))
def test_good_corpus_is_valid_even_when_strict(name):
    dataset = read_dataset(GOOD / name, strict=True)
    assert dataset.emotions() == list(DEFAULT_EMOTIONS)
    assert dataset.warnings == ()


def test_bom_is_stripped_and_still_hashed():
    path = GOOD / "bom.jsonl"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    dataset = read_dataset(path)
    assert dataset.samples[0].id == "g1"
    assert not any("\ufeff" in s.text for s in dataset.samples)
    assert dataset.sha256 == file_sha256(path)


def test_crlf_line_endings_leave_no_carriage_returns():
    path = GOOD / "crlf.jsonl"
    assert b"\r\n" in path.read_bytes()
    dataset = read_dataset(path)
    assert len(dataset.samples) == 8
    assert not any("\r" in s.text or "\r" in s.emotion for s in dataset.samples)


def test_blank_lines_are_skipped_line_numbers_stay_physical_and_extra_fields_are_kept():
    dataset = read_dataset(GOOD / "blank_lines_and_extra_fields.jsonl")
    assert [s.line for s in dataset.samples] == [1, 3, 5, 6]
    assert [s.id for s in dataset.samples] == ["line-1", "line-3", "7", "line-6"]
    assert all(s.extra["lang"] == "en" for s in dataset.samples)
    assert dataset.samples[1].extra == {"lang": "en", "source": {"kind": "handwritten"}}


def test_committed_unicode_file_round_trips():
    path = GOOD / "unicode_cjk_emoji_rtl.jsonl"
    expected = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert [s.text for s in read_dataset(path).samples] == expected


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["raw-utf8", "ascii-escaped"])
def test_unicode_text_round_trips_exactly(tmp_path, ensure_ascii):
    texts = {
        "gratitude": "谢谢你！🙏🏽 ありがとう",
        "anger": "אני כועס מאוד — ‏!",
        "apology": "أنا آسف جدا 🙇‍♀️",
        "neutral": "  Leading and trailing spaces, e\u0301 (combining), \u00e9 (precomposed)  ",
    }
    records = [{"text": text, "emotion": emotion} for emotion, text in texts.items()]
    lines = [json.dumps(record, ensure_ascii=ensure_ascii) for record in records]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = read_dataset(path, strict=True)
    assert {s.emotion: s.text for s in dataset.samples} == texts


def test_dataset_is_immutable(tmp_path):
    dataset = read_dataset(write_lines(tmp_path / "d.jsonl", RECORDS))
    assert isinstance(dataset, Dataset) and isinstance(dataset.samples, tuple)
    with pytest.raises(AttributeError):
        dataset.samples[0].text = "changed"  # type: ignore[misc]
