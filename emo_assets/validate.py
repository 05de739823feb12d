"""`python -m emo_assets.validate FILE [FILE...]`: check emotion datasets before any model is loaded.

Every error of every file goes to stderr as `FILE:LINE: field: reason [error]`, and so do its first five
warnings (`... [warning]`), followed by one line with the number left out; `--all-warnings` prints every
warning (a file with hundreds of duplicate texts would otherwise bury its errors and summary). The
severity is put at the *end* so that the `FILE:LINE:` prefix stays at the start of the line, where
terminals, editors and CI problem matchers look for it. A valid file gets a summary on stdout,
`FILE: N samples (gratitude=70, ...) OK` (`OK with 1 warning` when it has warnings); a file with errors gets
`FILE: FAILED (2 errors, 1 warning)` on stderr.

Exit status: 0 when every file is valid, 2 when any file has an error (with `--strict`, warnings are
errors) — the same status argparse uses for a rejected command line.

The emotion list comes from `--emotions`, else from the project configuration, else `DEFAULT_EMOTIONS`
(with a note on stderr): the validator must keep working when the configuration is broken, since that is
when it is most needed. `--tokenizer DIR --max-tokens N` counts tokens with a local Hugging Face tokenizer
(special tokens it adds included, as they take context too) and rejects longer texts; it is opt-in because
importing transformers takes seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from emo_assets.core.config import ConfigError, load_settings
from emo_assets.core.datasets import DEFAULT_EMOTIONS, WARNINGS_SHOWN, Dataset, Issue, condensed, validate_dataset
from emo_assets.core.paths import UnsafeNameError


def _emotion_list(value: str) -> tuple[str, ...]:
    emotions = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not emotions:
        raise argparse.ArgumentTypeError("expected a comma-separated list of emotions")
    return emotions


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emo_assets.validate",
        description="Validate emotion datasets (JSON Lines); print every problem as FILE:LINE: field: reason.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="dataset files to check")
    parser.add_argument("--strict", action="store_true", help="treat warnings (duplicate texts) as errors")
    parser.add_argument(
        "--all-warnings",
        action="store_true",
        help=f"print every warning (default: the first {WARNINGS_SHOWN}, then how many more)",
    )
    parser.add_argument(
        "--emotions", type=_emotion_list, help="comma-separated allowed emotions (default: from the configuration)"
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="local Hugging Face tokenizer directory")
    parser.add_argument("--max-tokens", type=_positive_int, metavar="N", help="reject texts of more than N tokens")
    return parser


def _configured_emotions() -> tuple[str, ...]:
    try:
        return load_settings().emotions
    except (ConfigError, UnsafeNameError) as exc:
        print(f"note: configuration not loaded ({exc}); using {', '.join(DEFAULT_EMOTIONS)}", file=sys.stderr)
        return DEFAULT_EMOTIONS


def _token_counter(directory: str) -> Callable[[str], int]:
    from transformers import AutoTokenizer  # imported here: slow, and only needed with --tokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return lambda text: len(tokenizer(text)["input_ids"])


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _summary(name: str, dataset: Dataset) -> str:
    counts = ", ".join(f"{emotion}={len(dataset.by_emotion(emotion))}" for emotion in dataset.emotions())
    status = f"OK with {_plural(len(dataset.warnings), 'warning')}" if dataset.warnings else "OK"
    return f"{name}: {len(dataset.samples)} samples ({counts}) {status}"


def _failure(name: str, issues: list[Issue]) -> str:
    errors = sum(issue.severity == "error" for issue in issues)
    warnings = len(issues) - errors
    return f"{name}: FAILED ({_plural(errors, 'error')}, {_plural(warnings, 'warning')})"


def _print_issues(name: str, issues: list[Issue], all_warnings: bool) -> None:
    shown, hidden = (issues, 0) if all_warnings else condensed(issues)
    for issue in shown:
        print(issue.describe(), file=sys.stderr)
    if hidden:
        total = sum(issue.severity == "warning" for issue in issues)
        print(
            f"{name}: {_plural(hidden, 'more warning')} not shown ({total} in all); --all-warnings prints every "
            "one, --strict makes them errors",
            file=sys.stderr,
        )


def check_file(
    name: str,
    emotions: Sequence[str],
    strict: bool,
    counter: Callable[[str], int] | None,
    max_tokens: int | None,
    all_warnings: bool = False,
) -> bool:
    """Validate one file, print its issues (`condensed` unless `all_warnings`) and summary; True if it is valid."""
    dataset, issues = validate_dataset(name, emotions, strict=strict, token_counter=counter, max_tokens=max_tokens)
    _print_issues(name, issues, all_warnings)
    if dataset is None:
        print(_failure(name, issues), file=sys.stderr)
        return False
    print(_summary(name, dataset))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tokenizer is None) != (args.max_tokens is None):
        parser.error("--tokenizer and --max-tokens go together")
    counter = None
    if args.tokenizer is not None:
        if not Path(args.tokenizer).is_dir():
            parser.error(f"--tokenizer {args.tokenizer}: not a directory")
        try:
            counter = _token_counter(args.tokenizer)
        except (OSError, ValueError) as exc:
            parser.error(f"--tokenizer {args.tokenizer}: cannot load the tokenizer: {exc}")
    emotions = args.emotions or _configured_emotions()
    results = [
        check_file(name, emotions, args.strict, counter, args.max_tokens, args.all_warnings) for name in args.files
    ]
    return 0 if all(results) else 2


if __name__ == "__main__":
    raise SystemExit(main())
