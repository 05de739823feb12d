"""Extraction CLI: `python -m emo_assets.extract --model gpt2 --output DIR [--emotion E ...]`.

`--dataset` defaults to `data/emotion_dataset.jsonl`; no `--emotion` means every emotion, one file each, written
as `<output>/activations_<emotion>.safetensors` (`--emotion` may be repeated). The dataset must hold sentences
of each emotion asked for. The whole dataset is validated, every sentence checked against the model's context,
and the output folder checked (writable; no file of another model replaced without `--overwrite`), before
anything is written.

Exit codes: 0 success; 2 invalid input (dataset, emotion, device, output folder, names; nothing written);
1 model loading or extraction failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from emo_assets.core.config import ConfigError, Settings, check_device, load_settings
from emo_assets.core.datasets import DatasetError, condensed, read_dataset
from emo_assets.core.dtypes import DTYPES
from emo_assets.core.models import ModelLoadError, hide_load_progress, load_configured_model
from emo_assets.core.offline_models import TINY_RECIPES
from emo_assets.core.paths import UnsafeNameError, activation_file, nearest_existing, safe_name
from emo_assets.core.selection import SelectionError, parse_layers, parse_positions

EXIT_INVALID_INPUT = 2
EXIT_FAILURE = 1


def build_parser(defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emo_assets.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="hub id (gpt2), local model directory, or offline model (tiny-gpt2, minilm)"
    )
    parser.add_argument(
        "--dataset", default="data/emotion_dataset.jsonl", type=Path, help="JSONL dataset (default: %(default)s)"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="output directory for activations_<emotion>.safetensors"
    )
    parser.add_argument(
        "--emotion",
        action="append",
        help="extract only this emotion; repeat for several (default: every configured emotion)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", default=defaults.device, help="cpu | cuda | auto (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=defaults.compute_dtype, help="compute dtype (default: %(default)s)"
    )
    parser.add_argument(
        "--storage-dtype",
        choices=DTYPES,
        default=defaults.storage_dtype,
        help="dtype stored in the file (default: %(default)s)",
    )
    parser.add_argument(
        "--attention", action="store_true", default=defaults.attention, help="also store attention outputs"
    )
    parser.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=defaults.prepend_bos,
        help="prepend the tokenizer's BOS (CLS for encoders) token (default: %(default)s)",
    )
    parser.add_argument(
        "--truncate", action="store_true", help="truncate sentences longer than the model context instead of failing"
    )
    parser.add_argument("--strict", action="store_true", help="treat dataset warnings (duplicate texts) as errors")
    parser.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=defaults.reuse,
        help="copy rows of sentences already extracted with identical inputs from the files in --output "
        "instead of forwarding them; --no-reuse forwards every sentence (byte-identical reruns) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--positions",
        type=_checked(parse_positions),
        default=defaults.positions,
        help="token rows stored per sentence: all | sentence_end | mean | last:N (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        type=_checked(parse_layers),
        default=defaults.layers,
        help="layers stored: all, or indices and ranges such as 0,6,11 or 6-11 or -1 (default: %(default)s)",
    )
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="print the bytes the extraction would write and the free space, write nothing (no forward pass)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace activation files in --output that hold another model's activations (refused by default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _checked(parse):
    """An argparse type from a `core.selection` parser: a bad value exits 2 with its message."""

    def check(value: str) -> str:
        try:
            return parse(value)
        except SelectionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return check


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except (ConfigError, UnsafeNameError) as exc:
        return _fail(EXIT_INVALID_INPUT, str(exc))
    args = build_parser(settings.extraction).parse_args(argv)
    if args.batch_size < 1:
        return _fail(EXIT_INVALID_INPUT, f"--batch-size must be >= 1, got {args.batch_size}")
    emotions = settings.emotions
    try:
        check_device(args.device, "--device")
        targets = _requested_emotions(args.emotion, emotions)
        dataset = read_dataset(args.dataset, emotions, required=targets, strict=args.strict)
        outputs = {emotion: activation_file(args.output, emotion) for emotion in targets}
    except DatasetError as exc:
        return _fail(EXIT_INVALID_INPUT, f"invalid dataset {args.dataset}:\n{exc}")
    except (ConfigError, UnsafeNameError, _InputError) as exc:
        return _fail(EXIT_INVALID_INPUT, str(exc))
    shown, hidden = condensed(dataset.warnings)
    for warning in shown:
        print(f"warning: {warning}", file=sys.stderr)
    if hidden:
        print(
            f"warning: {hidden} more, listed by `python -m emo_assets.validate {args.dataset} --all-warnings`",
            file=sys.stderr,
        )

    problem = (
        _tiny_model_corpus_problem(args.model, settings)
        or _output_problem(args.output)
        or (None if args.overwrite else _other_model_file(outputs, args.model))
    )
    if problem is not None:
        return _fail(EXIT_INVALID_INPUT, problem)

    # torch and transformers are imported here, after the input is known to be valid: a bad dataset or
    # argument is reported without paying for them
    from emo_assets.core.activations import ActivationWriteError, DatasetSource
    from emo_assets.core.activations.diskspace import DiskSpaceError
    from emo_assets.core.extraction import (
        ExtractionError,
        ExtractionJob,
        ExtractionOptions,
        estimate_files,
        extract_files,
    )

    _quiet_transformers()
    try:
        loaded = load_configured_model(args.model, settings, device=args.device, compute_dtype=args.dtype)
    except (ModelLoadError, UnsafeNameError) as exc:
        return _fail(EXIT_FAILURE, str(exc))
    if not args.truncate:
        try:
            read_dataset(
                args.dataset,
                emotions,
                required=targets,
                strict=args.strict,
                token_counter=loaded.count_tokens,
                max_tokens=loaded.context_length - int(args.prepend_bos),
            )
        except DatasetError as exc:
            return _fail(EXIT_INVALID_INPUT, f"invalid dataset {args.dataset} for {args.model}:\n{exc}")

    options = ExtractionOptions.from_settings(
        settings.extraction,
        batch_size=args.batch_size,
        prepend_bos=args.prepend_bos,
        attention=args.attention,
        storage_dtype=args.storage_dtype,
        progress=not args.no_progress,
        truncate=args.truncate,
        reuse=args.reuse,
        positions=args.positions,
        layers=args.layers,
    )
    print(
        f"{loaded.model_id} ({loaded.architecture}, {loaded.n_layers} layers, d={loaded.d_model}, "
        f"revision {loaded.revision[:12]}, {loaded.device}/{loaded.compute_dtype}) loaded in {loaded.load_seconds:.1f}s"
    )
    jobs = [
        ExtractionJob(
            [s.text for s in samples],
            [s.id for s in samples],
            path,
            DatasetSource(emotion=emotion, path=str(args.dataset), sha256=dataset.sha256),
            reuse_from=[path, *(activation_file(args.output, e) for e in emotions if e != emotion)],
        )
        for emotion, path in outputs.items()
        for samples in [dataset.by_emotion(emotion)]
    ]
    try:
        if args.estimate:
            estimate = estimate_files(loaded, jobs, options)
            for path, size in estimate.files.items():
                print(f"{path}: {size} bytes" + ("" if size else " (kept as it is)"))
            print(estimate.summary())
            return 0
        results = extract_files(loaded, jobs, options, on_estimate=lambda estimate: print(estimate.summary()))
    except DiskSpaceError as exc:
        return _fail(EXIT_INVALID_INPUT, str(exc))
    except ExtractionError as exc:
        return _fail(EXIT_INVALID_INPUT, f"{args.dataset}: {exc}")
    except ActivationWriteError as exc:
        return _fail(EXIT_FAILURE, str(exc))
    for result in results:
        reused = f", {result.reuse.reused} reused" if result.reuse.reused else ""
        print(
            f"{result.path}: {result.n_sentences} samples{reused}, {result.n_tokens} tokens, "
            f"{result.file_bytes / 2**20:.2f} MB, {result.wall_seconds:.2f}s ({result.samples_per_s:.1f} samples/s)"
        )
    return 0


class _InputError(ValueError):
    """A command-line value that is not valid; the message is the whole error line."""


def _requested_emotions(requested: list[str] | None, configured: tuple[str, ...]) -> list[str]:
    """The emotions to extract, in the configured order: the `--emotion` values, or every configured one."""
    for emotion in requested or ():
        safe_name(emotion, "emotion")
        if emotion not in configured:
            raise _InputError(f"--emotion {emotion!r} is not one of {list(configured)}")
    return [emotion for emotion in configured if not requested or emotion in requested]


def _tiny_model_corpus_problem(model_id: str, settings: Settings) -> str | None:
    """A tiny offline model is trained on the configured dataset files' texts: one of them missing would make it
    another model without a word (the graph reports a missing file itself, the CLI reads only `--dataset`)."""
    missing = [str(path) for path in settings.datasets.values() if not path.is_file()]
    if model_id not in TINY_RECIPES or not missing:
        return None
    return (
        f"--model {model_id} is trained on the texts of the configured dataset files, and {missing} do not exist "
        f"(relative paths are resolved against {settings.root}): set EMO_ASSETS_DATASETS or EMO_ASSETS_ROOT"
    )


def _output_problem(output: Path) -> str | None:
    """Why the activation files cannot be written under `output` (checked by writing a temp entry that is
    removed at once, since `os.access` says yes to root on read-only places such as /proc), or None."""
    existing = nearest_existing(output)
    if not existing.is_dir():
        where = "is a file" if existing == output else f"is under {existing}, which is a file"
        return f"--output {output} {where}, not a folder"
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".emo_assets-write-check-"):
            pass
    except OSError as exc:
        return f"--output {output}: cannot write in {existing} ({exc.strerror or exc})"
    return None


def _other_model_file(outputs: dict[str, Path], model_id: str) -> str | None:
    """The refusal of a run that would replace a file holding another model's (or unreadable) activations."""
    from emo_assets.core.activations import ActivationFile, ActivationFileError

    for path in outputs.values():
        if not path.exists():
            continue
        try:
            held = ActivationFile(path, verify=False).header.model_id
        except ActivationFileError as exc:
            return f"{path} exists and is not a readable activation file ({exc}); --overwrite replaces it"
        if held != model_id:
            return f"{path} holds the activations of model {held!r}, not {model_id!r}; --overwrite replaces it"
    return None


def _quiet_transformers() -> None:
    """transformers' per-load progress bars and warnings would drown the extraction's own progress output."""
    from transformers.utils import logging as hf_logging

    hide_load_progress()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    raise SystemExit(main())
