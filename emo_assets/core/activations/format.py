"""The activation file format (a public contract, documented in the README): tensors, layout and header.

One safetensors file per model x emotion:

* `input_ids`      [n_tokens] int64            the real tokens of every sentence, concatenated (no padding)
* `offsets`        [n_sentences + 1] int64     sentence i owns rows offsets[i]:offsets[i+1]
* `token_offsets`  [n_sentences + 1] int64     sentence i owns tokens token_offsets[i]:token_offsets[i+1] of
                                               `input_ids` (only when `positions` is not `all`: then rows and
                                               tokens differ; with `all` both are `offsets`)
* `resid_post`     [len(layers), n_rows, d_model]  residual stream after each stored block
* `mlp_out`        [len(layers), n_rows, d_model]  output of each stored block's MLP
* `attn_out`       [len(layers), n_rows, d_model]  output of each stored block's attention (only when requested)

`positions` (`all` | `sentence_end` | `mean` | `last:N`, see `selection`) says which rows a sentence stores;
`layers` lists the model layer indices stored, ascending; `n_layers` stays the model's layer count. A sentence's
representative row (its last token, or its mean) is always its last row, `offsets[i+1] - 1`.

Sharded partitions: a partition over the shard bound (`[extraction] shard_max_bytes` / `shard_sentences`) is
written as several files in the folder `<stem>.shards/` next to the partition's path, each a complete activation
file of a contiguous run of the partition's sentences with its own checksum, published atomically one by one; then
the partition's path gets a manifest: an activation file with the index tensors of the whole partition
(`input_ids`, `offsets`, `token_offsets`), no activation tensors, and `shards` in its header (each shard's path,
sentence range and checksum). `ActivationFile` presents a manifest and its shards as one file.

The `__metadata__` strings are the fields of `ActivationHeader`; every key is named once, in `_KEYS`, and is
written and read only through `ActivationHeader.to_metadata` / `from_metadata`. The header JSON has sorted keys
and no timestamps, so the same inputs give byte-identical files. The checksum field has a fixed width, so it
can be patched in after the data is written without moving the data section.

Format versions: `2` added `positions`, `layers`, `n_rows` and the `token_offsets` tensor. A version-1 file
reads as `positions = all`, every layer, `n_rows = n_tokens` (its rows are what version 2 stores with those
defaults), and is written back byte for byte (the version-2 keys are left out of a version-1 header). The optional
`reuse` field (rows copied from earlier files, see `emo_assets.core.activations.reuse`) only adds a key that older
readers ignore. A file whose version is newer than `FORMAT_VERSION` is refused with a message naming it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

import numpy as np

from emo_assets.core.dtypes import dtype
from emo_assets.core.selection import ALL, parse_positions

FORMAT_NAME = "emo_assets.activations"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ACTIVATION_KINDS = ("resid_post", "mlp_out", "attn_out")  # storage order in the file
BASE_KINDS = ("resid_post", "mlp_out")  # always extracted (and what the analysis reads); attn_out is optional
CHECKSUM_PLACEHOLDER = "0" * 32


def kinds_for(attention: bool) -> tuple[str, ...]:
    """The kinds an extraction stores: the base kinds, plus `attn_out` when attention outputs are asked for."""
    return (*BASE_KINDS, "attn_out") if attention else BASE_KINDS


class ActivationFileError(ValueError):
    """An activation file that cannot be trusted: truncated, corrupted, or not in this format."""


@dataclass(frozen=True)
class ReuseSource:
    """An earlier activation file whose rows were copied into this one."""

    path: str  # relative to the folder of the file that holds the copies
    checksum: str  # its data_xxh3_128 when the rows were copied
    sentences: int

    def as_dict(self) -> dict:
        return {"path": self.path, "data_xxh3_128": self.checksum, "sentences": self.sentences}


@dataclass(frozen=True)
class ReuseRecord:
    """How a file's sentences were obtained: `computed` forwarded now, `reused` copied from `sources`."""

    computed: int
    reused: int
    sources: tuple[ReuseSource, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "computed": self.computed,
                "reused": self.reused,
                "sources": [source.as_dict() for source in self.sources],
            },
            sort_keys=True,
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> ReuseRecord:
        raw = json.loads(text)
        sources = tuple(ReuseSource(s["path"], s["data_xxh3_128"], int(s["sentences"])) for s in raw["sources"])
        return cls(computed=int(raw["computed"]), reused=int(raw["reused"]), sources=sources)


@dataclass(frozen=True)
class ShardRef:
    """One shard of a sharded partition, as its manifest lists it: sentences `first:end` of the partition."""

    path: str  # relative to the manifest's folder
    first: int
    end: int
    checksum: str  # the shard's data_xxh3_128

    def as_dict(self) -> dict:
        return {"path": self.path, "sentences": [self.first, self.end], "data_xxh3_128": self.checksum}

    @classmethod
    def from_dict(cls, raw: Mapping) -> ShardRef:
        first, end = raw["sentences"]
        return cls(str(raw["path"]), int(first), int(end), str(raw["data_xxh3_128"]))


@dataclass(frozen=True)
class DatasetSource:
    """Where a file's sentences come from (recorded in its header; None fields are not recorded)."""

    emotion: str | None = None
    variant: str | None = None
    path: str | None = None
    sha256: str | None = None


# How each field is stored: a plain string, an int, or JSON (booleans and lists as JSON too).
_STR, _INT, _JSON, _JSON_UNICODE = "str", "int", "json", "json-unicode"


@dataclass(frozen=True)
class ActivationHeader:
    """Everything `__metadata__` holds. Shape fields (`n_layers`, `d_model`, `kinds`, `storage_dtype`,
    `positions`, `layers`) describe the tensors; the writer fills `n_sentences`, `n_tokens`, `n_rows` and
    `checksum`. Provenance fields are None when a file does not record them (they are then absent from
    `__metadata__`). `layers` None means every layer and `n_rows` None means one row per token (version 1)."""

    n_layers: int
    d_model: int
    kinds: tuple[str, ...]
    storage_dtype: str = "float32"
    n_sentences: int = 0
    n_tokens: int = 0
    checksum: str = CHECKSUM_PLACEHOLDER
    format_version: int = FORMAT_VERSION
    model_id: str | None = None
    model_revision: str | None = None
    architecture: str | None = None
    compute_dtype: str | None = None
    hook_points: Mapping[str, list[str]] | None = None
    prepend_bos: bool | None = None
    truncated_to_context: bool | None = None
    sentence_ids: tuple[str, ...] | None = None
    emotion: str | None = None
    dataset_variant: str | None = None
    dataset_path: str | None = None
    dataset_sha256: str | None = None
    package_version: str | None = None
    reuse: ReuseRecord | None = field(default=None, compare=False)
    positions: str = "all"
    layers: tuple[int, ...] | None = None
    n_rows: int | None = None
    shards: tuple[ShardRef, ...] | None = None  # a manifest: the rows are in these files, not in this one

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(ACTIVATION_KINDS)
        if unknown:
            raise ValueError(f"unknown activation kinds {sorted(unknown)}")
        dtype(self.storage_dtype)  # ValueError naming the accepted dtypes
        parse_positions(self.positions)  # SelectionError (a ValueError) naming the value
        layers = self.stored_layers
        if list(layers) != sorted(set(layers)) or any(not 0 <= layer < self.n_layers for layer in layers):
            raise ValueError(f"layers {list(layers)} must be ascending, unique and within 0..{self.n_layers - 1}")

    @property
    def stored_layers(self) -> tuple[int, ...]:
        """The model layer indices whose rows the file holds, ascending."""
        return tuple(range(self.n_layers)) if self.layers is None else tuple(self.layers)

    @property
    def rows(self) -> int:
        """Rows per stored layer."""
        return self.n_tokens if self.n_rows is None else self.n_rows

    @property
    def has_token_offsets(self) -> bool:
        """Whether rows and tokens differ, so that the file holds a `token_offsets` tensor."""
        return self.positions != ALL

    def to_metadata(self) -> dict[str, str]:
        """The `__metadata__` strings (None fields left out)."""
        meta = {"format": FORMAT_NAME}
        for name, (key, encoding) in _KEYS.items():
            value = getattr(self, name)
            if value is None or (name in _SINCE_VERSION_2 and self.format_version < 2):
                continue
            if name == "reuse":
                meta[key] = value.to_json()
            elif name == "shards":
                meta[key] = json.dumps([shard.as_dict() for shard in value], sort_keys=True, ensure_ascii=False)
            elif encoding == _STR:
                meta[key] = value
            elif encoding == _INT:
                meta[key] = str(int(value))
            else:
                plain = (
                    list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value
                )
                meta[key] = json.dumps(plain, ensure_ascii=encoding != _JSON_UNICODE)
        return meta

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: object = "activation file") -> ActivationHeader:
        """Parse `__metadata__`; `ActivationFileError` naming `source` for another format, an unknown or newer
        version, or a missing or malformed field."""
        if metadata.get("format") != FORMAT_NAME:
            raise ActivationFileError(
                f"{source}: not an emo_assets activation file (format={metadata.get('format')!r})"
            )
        version = metadata.get("format_version")
        if not (version or "").isdigit() or int(version) not in READABLE_VERSIONS:
            newer = (version or "").isdigit() and int(version) > FORMAT_VERSION
            raise ActivationFileError(
                f"{source}: activation format version {version!r} "
                + ("is newer than this emo_assets reads: upgrade emo_assets" if newer else "is unknown")
                + f" (readable versions: {list(READABLE_VERSIONS)})"
            )
        values = {}
        for name, (key, encoding) in _KEYS.items():
            if key not in metadata:
                continue
            raw = metadata[key]
            try:
                if name == "reuse":
                    values[name] = ReuseRecord.from_json(raw)
                elif name == "shards":
                    values[name] = tuple(ShardRef.from_dict(item) for item in json.loads(raw))
                elif encoding == _STR:
                    values[name] = raw
                elif encoding == _INT:
                    values[name] = int(raw)
                else:
                    value = json.loads(raw)
                    values[name] = tuple(value) if isinstance(value, list) else value
            except (ValueError, KeyError, TypeError) as exc:
                raise ActivationFileError(f"{source}: header field {key!r} is malformed ({raw[:80]!r}): {exc}") from exc
        missing = [_KEYS[name][0] for name in _REQUIRED if name not in values]
        if missing:
            raise ActivationFileError(f"{source}: header fields missing: {missing}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ActivationFileError(f"{source}: invalid header: {exc}") from exc

    def row_inputs(self) -> tuple | None:
        """Everything besides a sentence's token ids that decides its rows: model and revision, architecture and
        hooked modules, compute and storage dtype, kinds, BOS and truncation, stored positions and layers. Two files with equal
        `row_inputs` hold interchangeable rows for equal token ids (the tokenizer, the text, the BOS choice and
        truncation all act through the ids). None when a file does not record enough to tell."""
        values = (
            self.positions,
            self.stored_layers,
            self.model_id,
            self.model_revision,
            self.architecture,
            self.compute_dtype,
            self.storage_dtype,
            self.kinds,
            self.n_layers,
            self.d_model,
            self.prepend_bos,
            self.truncated_to_context,
            json.dumps(self.hook_points, sort_keys=True),
        )
        return None if any(v is None for v in values) or self.hook_points is None else values

    def with_source(self, source: DatasetSource) -> ActivationHeader:
        return replace(
            self,
            emotion=source.emotion,
            dataset_variant=source.variant,
            dataset_path=source.path,
            dataset_sha256=source.sha256,
        )

    def with_shape(self, n_sentences: int, n_tokens: int, n_rows: int | None = None) -> ActivationHeader:
        """The header with its sizes; `n_rows` is recorded in version 2 (None: one row per token)."""
        if self.format_version >= 2 and n_rows is None:
            n_rows = n_tokens
        return replace(self, n_sentences=n_sentences, n_tokens=n_tokens, n_rows=n_rows)


# field -> (`__metadata__` key, encoding). The one place where keys are spelled.
_KEYS = {
    "format_version": ("format_version", _INT),
    "n_layers": ("n_layers", _INT),
    "d_model": ("d_model", _INT),
    "kinds": ("kinds", _JSON),
    "storage_dtype": ("dtype", _STR),
    "n_sentences": ("n_sentences", _INT),
    "n_tokens": ("n_tokens", _INT),
    "checksum": ("data_xxh3_128", _STR),
    "model_id": ("model_id", _STR),
    "model_revision": ("model_revision", _STR),
    "architecture": ("architecture", _STR),
    "compute_dtype": ("compute_dtype", _STR),
    "hook_points": ("hook_points", _JSON),
    "prepend_bos": ("prepend_bos", _JSON),
    "truncated_to_context": ("truncated_to_context", _JSON),
    "sentence_ids": ("sentence_ids", _JSON_UNICODE),
    "emotion": ("emotion", _STR),
    "dataset_variant": ("dataset_variant", _STR),
    "dataset_path": ("dataset_path", _STR),
    "dataset_sha256": ("dataset_sha256", _STR),
    "package_version": ("package_version", _STR),
    "reuse": ("reuse", _JSON_UNICODE),
    "positions": ("positions", _STR),
    "layers": ("layers", _JSON),
    "n_rows": ("n_rows", _INT),
    "shards": ("shards", _JSON_UNICODE),
}
_SINCE_VERSION_2 = ("positions", "layers", "n_rows")  # left out of a version-1 header: it is written back as it was
_REQUIRED = ("format_version", "n_layers", "d_model", "kinds", "storage_dtype", "n_sentences", "n_tokens", "checksum")
assert set(_KEYS) == {f.name for f in fields(ActivationHeader)}, "every header field needs a metadata key"


# -- byte layout ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype code
    shape: tuple[int, ...]
    start: int  # offset within the data section
    itemsize: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.itemsize

    def header(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.start, self.start + self.nbytes]}


def offsets_of(counts) -> np.ndarray:
    """The int64 offsets [0, c0, c0 + c1, ...] of consecutive runs of `counts` rows or tokens (`offsets`,
    `token_offsets`)."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def layout(header: ActivationHeader) -> dict[str, TensorEntry]:
    """Tensor placement: the int64 index tensors first (8-byte aligned), then the activations by kind."""
    stored = dtype(header.storage_dtype)
    specs = [("input_ids", "I64", (header.n_tokens,), 8), ("offsets", "I64", (header.n_sentences + 1,), 8)]
    if header.has_token_offsets:
        specs.append(("token_offsets", "I64", (header.n_sentences + 1,), 8))
    if header.shards is None:  # a manifest holds the index tensors only
        specs += [
            (kind, stored.safetensors, (len(header.stored_layers), header.rows, header.d_model), stored.itemsize)
            for kind in header.kinds
        ]
    entries, start = {}, 0
    for name, code, shape, size in specs:
        entries[name] = TensorEntry(name, code, shape, start, size)
        start += entries[name].nbytes
    return entries


def encode_header(entries: Mapping[str, TensorEntry], header: ActivationHeader) -> bytes:
    """The file's first bytes: the 8-byte length and the JSON header, padded so that the data starts 8-aligned."""
    raw_header = {name: entry.header() for name, entry in entries.items()}
    raw_header["__metadata__"] = header.to_metadata()
    raw = json.dumps(raw_header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw
