"""What an extraction stores: which token positions of each sentence (`positions`) and which layers (`layers`).

The one home of both spellings (plain Python: the configuration imports it before any heavy module), shared by `[extraction]`, the environment, the CLI and the Dagster config:

* `positions`: `all` (every real token: the default), `sentence_end` (the last real token), `mean` (the mean over
  the sentence's real tokens, computed in float32 before the cast to the storage dtype) or `last:N` (the last N
  real tokens, fewer when the sentence is shorter). Every sentence's representative row is its last stored row.
* `layers`: `all`, or a comma-separated list of model layer indices and inclusive ranges (`0,6,11`, `6-11`);
  negative indices count from the end (`-1` is the last layer, `-4--1` the last four). Stored ascending, each once.

`parse_*` check the spelling alone (configuration time, no model needed); `resolve_layers` checks the indices
against the model's layer count (extraction time). Both raise `SelectionError` naming the value.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ALL = "all"
POSITIONS = ("all", "sentence_end", "mean", "last:N")
_LAST = re.compile(r"^last:(\d+)$")
_LAYER_ITEM = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


class SelectionError(ValueError):
    """A `positions` or `layers` value that cannot be used."""


def parse_positions(value: object) -> str:
    """The canonical spelling of a `positions` value, or `SelectionError`."""
    text = str(value).strip()
    if text in ("all", "sentence_end", "mean"):
        return text
    match = _LAST.match(text)
    if match and int(match[1]) >= 1:
        return f"last:{int(match[1])}"
    raise SelectionError(f"positions {value!r} is not one of {', '.join(POSITIONS)} (N >= 1)")


def parse_layers(value: object) -> str:
    """The canonical spelling of a `layers` value (a string, or a list of ints from TOML), or `SelectionError`."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    text = str(value).replace(" ", "")
    if text == ALL:
        return ALL
    items = text.split(",")
    if not text or any(not _LAYER_ITEM.match(item) for item in items):
        raise SelectionError(
            f"layers {value!r} is not 'all' or a comma-separated list of layer indices and ranges (e.g. 0,6,11 or "
            "6-11 or -1)"
        )
    return ",".join(items)


def resolve_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    """The model layer indices `spec` names, ascending and unique, checked against `n_layers`."""
    spec = parse_layers(spec)
    if spec == ALL:
        return tuple(range(n_layers))
    chosen: set[int] = set()
    for item in spec.split(","):
        match = _LAYER_ITEM.match(item)
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        bounds = []
        for index in (first, last):
            if not -n_layers <= index < n_layers:
                raise SelectionError(f"layers {spec!r}: layer {index} is out of range for a model of {n_layers} layers")
            bounds.append(index % n_layers)
        if bounds[0] > bounds[1]:
            raise SelectionError(f"layers {spec!r}: range {item!r} is empty (first layer after last)")
        chosen.update(range(bounds[0], bounds[1] + 1))
    return tuple(sorted(chosen))


def last_n(positions: str) -> int | None:
    """N of `last:N`, else None."""
    match = _LAST.match(positions)
    return int(match[1]) if match else None


def rows_per_sentence(positions: str, lengths: Sequence[int]) -> list[int]:
    """How many rows each sentence of these token counts stores under `positions`."""
    n = last_n(positions)
    if positions == ALL:
        return [int(length) for length in lengths]
    return [min(int(length), n) if n is not None else 1 for length in lengths]


def selected_token_positions(positions: str, length: int) -> range:
    """The token positions (0-based, within the sentence) whose rows are stored or averaged (`mean`)."""
    n = last_n(positions)
    if positions in (ALL, "mean"):
        return range(length)
    if positions == "sentence_end":
        return range(length - 1, length)
    return range(max(0, length - n), length)
