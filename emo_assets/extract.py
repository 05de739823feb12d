"""Extraction CLI: `python -m emo_assets.extract --model gpt2 --output DIR [--emotion E]`.

`--dataset` defaults to `data/emotion_dataset.jsonl`; no `--emotion` means every emotion, one file each, written
as `<output>/activations_<emotion>.safetensors`. The whole dataset is validated, and every sentence checked
against the model's context, before anything is written.

Exit codes: 0 success; 2 invalid input (dataset, emotion, names; nothing written); 1 model loading or
extraction failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emo_assets.core.config import ConfigError, load_settings
from emo_assets.core.datasets import DatasetError, condensed, read_dataset
from emo_assets.core.dtypes import DTYPES
from emo_assets.core.models import ModelLoadError, load_configured_model
from emo_assets.core.paths import UnsafeNameError, activation_file, safe_name
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
    parser.add_argument("--emotion", help="extract only this emotion (default: every configured emotion)")
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
        if args.emotion is not None:
            safe_name(args.emotion, "emotion")
            if args.emotion not in emotions:
                return _fail(EXIT_INVALID_INPUT, f"--emotion {args.emotion!r} is not one of {list(emotions)}")
        dataset = read_dataset(args.dataset, emotions, strict=args.strict)
        targets = [args.emotion] if args.emotion else dataset.emotions()
        outputs = {emotion: activation_file(args.output, emotion) for emotion in targets}
    except DatasetError as exc:
        return _fail(EXIT_INVALID_INPUT, f"invalid dataset {args.dataset}:\n{exc}")
    except UnsafeNameError as exc:
        return _fail(EXIT_INVALID_INPUT, str(exc))
    shown, hidden = condensed(dataset.warnings)
    for warning in shown:
        print(f"warning: {warning}", file=sys.stderr)
    if hidden:
        print(
            f"warning: {hidden} more, listed by `python -m emo_assets.validate {args.dataset} --all-warnings`",
            file=sys.stderr,
        )

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


def _quiet_transformers() -> None:
    """transformers' per-load progress bars would drown the extraction's own progress output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    raise SystemExit(main())
