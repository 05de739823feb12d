"""Reading and validating the emotion-sentence datasets (JSON Lines), reporting every problem at once.

A dataset is a UTF-8 JSON Lines file: one object per line with a `text`, an `emotion` from the configured
list and, optionally, an `id` (a non-empty string or an integer); any other field (e.g. `lang`) is kept
as-is in `Sample.extra`. Validation collects *all* problems as `Issue`s printed `FILE:LINE: field: reason`,
so whoever fixes a file by hand sees the whole list in one run instead of one error per attempt.

Decisions, and why:

- The file is read in binary, one bounded `readline` at a time, and decoded line by line. A bad byte is
  then reported on its own line (`encoding: invalid UTF-8 at byte N`, N counted from 1 within the line)
  while the other lines are still checked. A line longer than `MAX_LINE_BYTES` (its `\\n` / `\\r\\n` not
  counted) is skipped in chunks without being decoded or parsed: a 50 MB line costs about 1 MB of memory,
  not 50 MB held twice.
- The SHA-256 is computed from the very bytes that are validated, while they are read, so it describes
  exactly the content that was checked even if the file is replaced meanwhile.
- A UTF-8 byte-order mark at the start of the file is accepted and stripped on purpose: Windows editors
  write one and it carries no meaning. CRLF line endings are accepted. Blank and whitespace-only lines are
  skipped; line numbers stay physical so that they match an editor.
- A file whose first record starts with `[` is one JSON array, not JSON Lines: it gets a single message on
  that line (suggesting JSON Lines) instead of an error for each of its lines.
- Duplicate texts (compared after collapsing whitespace, case-sensitive) are warnings: they give a sentence
  double weight in its emotion's mean but are not wrong in themselves. `strict=True` makes warnings errors.
- Texts are kept exactly as written (no stripping, no Unicode normalisation), so CJK, emoji and
  right-to-left text round-trip unchanged. JSON escapes that decode to an unpaired UTF-16 surrogate are
  rejected, because such a string cannot be encoded as UTF-8 by a tokenizer or a file writer later.
- Token counting is injected (`token_counter`) so that this module needs no model library; texts over
  `max_tokens` are errors, never truncated here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

DEFAULT_EMOTIONS = ("gratitude", "anger", "apology", "neutral")
MAX_LINE_BYTES = 1 << 20
WARNINGS_SHOWN = 5  # warnings printed before a count (`condensed`)
_SKIP_CHUNK = 1 << 16
_RESERVED_FIELDS = ("id", "text", "emotion")
_ARRAY_HINT = (
    "expected a JSON object per line, got array "
    "(the file looks like one JSON array; write JSON Lines: one object per line)"
)

StrPath = str | os.PathLike


@dataclass(frozen=True)
class Sample:
    id: str  # the record's "id" as a string, or f"line-{line}" when the record has none
    text: str
    emotion: str
    line: int  # 1-based physical line number in the file
    extra: dict = field(default_factory=dict, hash=False)  # fields other than id/text/emotion, as written


@dataclass(frozen=True)
class Issue:
    path: str
    line: int | None
    field: str
    reason: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.reason}"

    def describe(self) -> str:
        """`str(issue)` with the severity in brackets at the end, keeping the `FILE:LINE:` prefix intact."""
        return f"{self} [{self.severity}]"


@dataclass(frozen=True)
class Dataset:
    path: Path
    sha256: str
    samples: tuple[Sample, ...]
    warnings: tuple[Issue, ...] = ()
    emotion_order: tuple[str, ...] = DEFAULT_EMOTIONS

    def emotions(self) -> list[str]:
        """The emotions that have samples, in the configured order."""
        present = {sample.emotion for sample in self.samples}
        return [emotion for emotion in self.emotion_order if emotion in present]

    def by_emotion(self, emotion: str) -> list[Sample]:
        """The samples of one emotion, in file order."""
        return [sample for sample in self.samples if sample.emotion == emotion]


def condensed(issues: Iterable[Issue], limit: int = WARNINGS_SHOWN) -> tuple[list[Issue], int]:
    """Every error and the first `limit` warnings, in their order; and how many warnings were left out.

    A file with hundreds of duplicate texts would otherwise print as many warning lines, burying its errors
    and the summary; every error is always kept.
    """
    shown, warnings = [], 0
    for issue in issues:
        warnings += issue.severity == "warning"
        if issue.severity != "warning" or warnings <= limit:
            shown.append(issue)
    return shown, max(warnings - limit, 0)


class DatasetError(ValueError):
    """A dataset has errors; `issues` holds all of them (and the warnings). The message has one line per error,
    then the first warnings (`condensed`) and how many more there are."""

    def __init__(self, issues: Iterable[Issue]):
        self.issues = list(issues)
        ordered = sorted(self.issues, key=lambda issue: issue.severity != "error")  # stable: errors first
        shown, hidden = condensed(ordered)
        more = [f"... and {hidden} more warnings"] if hidden else []
        super().__init__("\n".join([*(issue.describe() for issue in shown), *more]))


def file_sha256(path: StrPath) -> str:
    """Hex SHA-256 of the file's bytes."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def read_dataset(
    path: StrPath,
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    *,
    required: Sequence[str] | None = None,
    strict: bool = False,
    token_counter: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> Dataset:
    """Read a valid dataset or raise `DatasetError` listing every problem (warnings only under `strict`)."""
    dataset, issues = validate_dataset(
        path, emotions, required=required, strict=strict, token_counter=token_counter, max_tokens=max_tokens
    )
    if dataset is None:
        raise DatasetError(issues)
    return dataset


def validate_dataset(
    path: StrPath,
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    *,
    required: Sequence[str] | None = None,
    strict: bool = False,
    token_counter: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
) -> tuple[Dataset | None, list[Issue]]:
    """Check a dataset file; return (the dataset, or None if there is any error; all issues in file order).

    Every record's emotion must be one of `emotions`; each of `required` (default: all of `emotions`) must have
    at least one sample. Bad content and unreadable or missing files are reported as issues, never raised.
    """
    if max_tokens is not None and token_counter is None:
        raise ValueError("max_tokens needs a token_counter")
    emotions = tuple(emotions)
    required = emotions if required is None else tuple(required)
    validator = _Validator(str(path), emotions, required, strict, token_counter, max_tokens)
    hasher = hashlib.sha256()
    problem = _not_a_regular_file(path)
    if problem is not None:
        return None, [Issue(str(path), None, "file", problem)]
    try:
        with open(path, "rb") as stream:
            for number, content in _physical_lines(stream, hasher):
                if not validator.feed(number, content):
                    break
    except OSError as exc:
        return None, [*validator.issues, Issue(str(path), None, "file", f"cannot read: {exc.strerror or exc}")]
    issues = validator.finish()
    if any(issue.severity == "error" for issue in issues):
        return None, issues
    dataset = Dataset(Path(path), hasher.hexdigest(), tuple(validator.samples), tuple(issues), emotions)
    return dataset, issues


def _not_a_regular_file(path: StrPath) -> str | None:
    """Why `path` cannot be a dataset file (missing, a directory, a device ...), or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a directory, expected a JSON Lines file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


# --- reading physical lines in bounded memory ---------------------------------------------------------


@dataclass(frozen=True)
class _Overlong:
    size: int  # bytes of the line, without its terminator


def _without_eol(chunk: bytes) -> bytes:
    if chunk.endswith(b"\r\n"):
        return chunk[:-2]
    return chunk[:-1] if chunk.endswith(b"\n") else chunk


def _physical_lines(stream: BinaryIO, hasher: Any) -> Iterator[tuple[int, bytes | _Overlong]]:
    """Yield (1-based line number, line bytes without terminator), or an `_Overlong` for a too-long line."""
    for number in itertools.count(1):
        chunk = stream.readline(MAX_LINE_BYTES + 2)  # the longest allowed line plus "\r\n"
        if not chunk:
            return
        hasher.update(chunk)
        content = _without_eol(chunk)
        if len(content) <= MAX_LINE_BYTES:
            yield number, content
        else:
            yield number, _Overlong(_overlong_size(chunk, stream, hasher))


def _overlong_size(first: bytes, stream: BinaryIO, hasher: Any) -> int:
    """Consume the rest of a too-long line in small chunks (hashing them); return its length."""
    total, tail, piece = len(first), first[-2:], first
    while not piece.endswith(b"\n") and (piece := stream.readline(_SKIP_CHUNK)):
        hasher.update(piece)
        total += len(piece)
        tail = (tail + piece)[-2:]
    return total - (len(tail) - len(_without_eol(tail)))


# --- checking records ---------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _parse_json(text: str) -> tuple[object, str | None]:
    """(value, None), or (None, why the line is not valid JSON)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except (ValueError, RecursionError) as exc:  # e.g. an integer of > 4300 digits, absurd nesting
        return None, f"invalid JSON: {exc}"


def _text_problem(record: dict) -> str | None:
    if "text" not in record:
        return "missing"
    value = record["text"]
    if not isinstance(value, str):
        return f"expected a string, got {_json_type(value)}"
    if not value:
        return "empty"
    if not value.strip():
        return "whitespace only"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"unpaired UTF-16 surrogate escape at character {exc.start + 1} (not valid Unicode text)"
    return None


def _emotion_problem(record: dict, allowed: tuple[str, ...]) -> str | None:
    choices = f"(allowed: {', '.join(allowed)})"
    if "emotion" not in record:
        return f"missing {choices}"
    value = record["emotion"]
    if not isinstance(value, str):
        return f"expected a string, got {_json_type(value)} {choices}"
    if value not in allowed:
        return f"unknown emotion {value!r} {choices}"
    return None


def _id_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"expected a non-empty string or an integer, got {_json_type(value)}"
    if isinstance(value, str) and not value.strip():
        return "empty (expected a non-empty string or an integer)"
    return None


class _Validator:
    """Checks one file's lines in order, keeping what cross-line checks need (ids, texts, counts)."""

    def __init__(
        self,
        path: str,
        emotions: tuple[str, ...],
        required: tuple[str, ...],
        strict: bool,
        token_counter: Callable[[str], int] | None,
        max_tokens: int | None,
    ):
        self.path = path
        self.emotions = emotions
        self.duplicate_severity = "error" if strict else "warning"
        self.token_counter = token_counter
        self.max_tokens = max_tokens
        self.issues: list[Issue] = []
        self.samples: list[Sample] = []
        self.counts = dict.fromkeys(emotions, 0)
        self.required = required
        self.first_line_of_id: dict[str, int] = {}
        self.first_line_of_text: dict[str, int] = {}
        self.records = 0  # non-blank lines seen
        self.whole_file_array = False

    def add(self, line: int | None, field_name: str, reason: str, severity: str = "error") -> None:
        self.issues.append(Issue(self.path, line, field_name, reason, severity))

    def feed(self, number: int, content: bytes | _Overlong) -> bool:
        """Check one physical line; False when the rest of the file is not worth reading."""
        if isinstance(content, _Overlong):
            self.records += 1
            self.add(number, "line", f"{content.size} bytes exceeds the limit of {MAX_LINE_BYTES}")
            return True
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.records += 1
            self.add(number, "encoding", f"invalid UTF-8 at byte {exc.start + 1}")
            return True
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            return True
        self.records += 1
        if self.records == 1 and text.lstrip().startswith("["):
            self.whole_file_array = True
            self.add(number, "json", _ARRAY_HINT)
            return False
        self.check_line(number, text)
        return True

    def check_line(self, number: int, line: str) -> None:
        record, problem = _parse_json(line)
        if problem is None and not isinstance(record, dict):
            problem = f"expected a JSON object per line, got {_json_type(record)}"
        if problem is not None:
            self.add(number, "json", problem)
            return
        text = self.check_text(number, record)
        emotion = self.check_emotion(number, record)
        sample_id = self.check_id(number, record)
        if text is not None and emotion is not None and sample_id is not None:
            extra = {key: value for key, value in record.items() if key not in _RESERVED_FIELDS}
            self.samples.append(Sample(sample_id, text, emotion, number, extra))

    def check_text(self, number: int, record: dict) -> str | None:
        problem = _text_problem(record)
        if problem is not None:
            self.add(number, "text", problem)
            return None
        text = record["text"]
        self.check_duplicate_text(number, text)
        if self.max_tokens is not None:
            count = self.token_counter(text)
            if count > self.max_tokens:
                self.add(number, "text", f"{count} tokens exceed the model context of {self.max_tokens}")
                return None
        return text

    def check_duplicate_text(self, number: int, text: str) -> None:
        first = self.first_line_of_text.setdefault(" ".join(text.split()), number)
        if first != number:
            reason = f"duplicate text of line {first} (compared after collapsing whitespace, case-sensitive)"
            self.add(number, "text", reason, self.duplicate_severity)

    def check_emotion(self, number: int, record: dict) -> str | None:
        problem = _emotion_problem(record, self.emotions)
        if problem is not None:
            self.add(number, "emotion", problem)
            return None
        self.counts[record["emotion"]] += 1
        return record["emotion"]

    def check_id(self, number: int, record: dict) -> str | None:
        if "id" in record:
            problem = _id_problem(record["id"])
            if problem is not None:
                self.add(number, "id", problem)
                return None
        sample_id = str(record["id"]) if "id" in record else f"line-{number}"
        first = self.first_line_of_id.setdefault(sample_id, number)
        if first == number:
            return sample_id
        note = "" if "id" in record else "; a record without an id gets the id 'line-N'"
        self.add(number, "id", f"duplicate id {sample_id!r} (first seen on line {first}{note})")
        return None

    def finish(self) -> list[Issue]:
        """Add the whole-file checks and return every issue."""
        if self.whole_file_array:
            return self.issues
        if self.records == 0:
            self.add(None, "file", "no samples (the file is empty or has only blank lines)")
            return self.issues
        for emotion in self.required:
            if self.counts[emotion] == 0:
                self.add(None, "emotion", f"no samples for emotion {emotion!r}")
        return self.issues
