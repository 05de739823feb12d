"""Inputs and outputs of the per-model analysis: one model's activation files, its sentences' texts
and token strings, and where every analysis output lives.

`ModelActivations.load` opens the model's per-emotion activation files once each (the checksum is verified
on open) and concatenates them in emotion order, so that every analysis sees one sentence axis:
`labels[i]`, `sentence_ids[i]`, `sentence_end(kind)[:, i]` and the token rows `offsets[i]:offsets[i+1]`
all describe the same sentence. Arrays come back as float32 (stored precision); the math library accumulates
in float64. The analysis reads them a layer at a time (`sentence_end_layers`, a lazy `LayerStack`), so it
holds the layers at hand and never the whole [layers, sentences, d] block. Files that store one row per
sentence (`positions` other than `all`, activation format version 2; `stored_positions`) serve every
sentence-end analysis; the token-level one reports itself not applicable (`token_level_unavailable`).
Files that store a selection of layers (`layers`, the MODEL layer indices stored) are read by stored position
(a `LayerStack`'s `[i]` is model layer `layers[i]`); every output table labels its rows by the model layer
(`label_layers`) and every output tensor stacked over layers records the `layers` it holds in its metadata.

Output layout (`results/<variant>/analysis/...`):

    <model-slug>/emotion_vectors.safetensors, emotion_vectors.parquet, emotion_cosines.parquet, separation.parquet
    <model-slug>/token_vectors.safetensors, token_vectors.parquet, lexicon_tokens.parquet
    <model-slug>/emotion_subspaces.safetensors, subspaces.parquet, subspace_pairs.parquet
    <model-slug>/probes.parquet
    <model-slug>/layer_profile.png, cosine_heatmap.png
    _cross_model/cka.parquet, rsa.parquet, subspace_overlap.parquet, cka_heatmap.png (debiased CKA)
    report.md
    results/_cross_variant/vector_stability.parquet

Folders that are not model slugs start with `_`, which no slug can (`paths.safe_name`), so they never clash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from emo_assets.core.activations import BASE_KINDS, ActivationFile, offsets_of
from emo_assets.core.atomic import atomic_path
from emo_assets.core.datasets import read_dataset
from emo_assets.core.dtypes import to_float32
from emo_assets.core.paths import activation_dir, activation_file, safe_name, variant_dir
from emo_assets.core.tokenization import bos_token_id

ANALYSIS_STAGE = "analysis"
CROSS_MODEL = "_cross_model"
CROSS_VARIANT = "_cross_variant"
KINDS = BASE_KINDS  # the kinds analysed (attn_out, when stored, is left out)
REPORT_NAME = "report.md"
ALL_POSITIONS = "all"  # every token of a sentence stored: what the token-level analysis needs


# -- paths ------------------------------------------------------------------------------------------------
def analysis_root(results_dir: Path, variant: str) -> Path:
    """`results/<variant>/analysis/`."""
    return variant_dir(Path(results_dir), variant, ANALYSIS_STAGE)


def model_analysis_dir(results_dir: Path, variant: str, slug: str) -> Path:
    """`results/<variant>/analysis/<model-slug>/`."""
    return analysis_root(results_dir, variant) / safe_name(slug, "model slug")


def cross_model_dir(results_dir: Path, variant: str) -> Path:
    """`results/<variant>/analysis/_cross_model/`."""
    return analysis_root(results_dir, variant) / CROSS_MODEL


def cross_variant_dir(results_dir: Path) -> Path:
    """`results/_cross_variant/` (comparisons between dataset variants)."""
    return Path(results_dir) / CROSS_VARIANT


def report_path(results_dir: Path, variant: str) -> Path:
    """`results/<variant>/analysis/report.md`."""
    return analysis_root(results_dir, variant) / REPORT_NAME


# -- atomic writers ---------------------------------------------------------------------------------------
def write_parquet(frame: pl.DataFrame, path: Path, metadata: Mapping[str, str] | None = None) -> int:
    """Write `frame` atomically; returns its height (the row count recorded in asset metadata)."""
    with atomic_path(path) as temp:
        frame.write_parquet(temp, metadata=dict(metadata) if metadata else None)
    return frame.height


def write_safetensors(arrays: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str]) -> Path:
    """`safetensors.numpy.save_file` into an atomic temp path (contiguous copies; string metadata)."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={str(k): str(v) for k, v in metadata.items()})
    return Path(path)


def frame(rows: Sequence[Mapping], schema: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame:
    """Rows as a polars frame; with `schema` the columns are fixed even when `rows` is empty."""
    if schema is not None:
        return (
            pl.DataFrame(list(rows), schema=dict(schema), orient="row") if rows else pl.DataFrame(schema=dict(schema))
        )
    return pl.DataFrame(list(rows), infer_schema_length=None)


# -- activations of one model -----------------------------------------------------------------------------
class AnalysisInputError(ValueError):
    """Activation files or texts that cannot be analysed together (missing, inconsistent, stale)."""


@dataclass
class ModelActivations:
    """The activation files of one model and variant, concatenated in emotion order."""

    variant: str
    slug: str
    model_id: str
    model_revision: str
    emotions: tuple[str, ...]
    files: dict[str, ActivationFile]
    labels: list[str]  # per sentence
    sentence_ids: list[str]  # per sentence
    offsets: np.ndarray  # [n_sentences + 1] int64, concatenated token rows
    n_layers: int
    d_model: int
    kinds: tuple[str, ...]
    dataset_sha256: str
    prepend_bos: bool
    texts: list[str] | None = None  # per sentence, when a dataset was given
    notes: list[str] = field(default_factory=list)
    positions: str = ALL_POSITIONS  # the rows stored per sentence (`stored_positions`)
    layers: tuple[int, ...] = ()  # the model layer indices stored, ascending (`ActivationFile.layers`)

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers) or tuple(range(self.n_layers))

    @property
    def n_sentences(self) -> int:
        return len(self.labels)

    def token_level_unavailable(self) -> str | None:
        """Why the token-level analysis cannot run on these files, or None when every token is stored."""
        if self.positions == ALL_POSITIONS:
            return None
        return (
            f"the activation files store positions = {self.positions} (one representative row per sentence, "
            "not every token); token-level vectors need an extraction with positions = all"
        )

    @property
    def counts(self) -> dict[str, int]:
        return {emotion: self.files[emotion].n_sentences for emotion in self.emotions}

    @classmethod
    def load(
        cls,
        results_dir: Path,
        variant: str,
        slug: str,
        emotions: Sequence[str],
        *,
        dataset_path: Path | None = None,
        kinds: Sequence[str] = KINDS,
    ) -> ModelActivations:
        """Open `results/<variant>/activations/<slug>/activations_<emotion>.safetensors` for every emotion
        (checksums verified) and, with `dataset_path`, look up each sentence's text by its id."""
        folder = activation_dir(Path(results_dir), variant, slug)
        paths = {emotion: activation_file(folder, emotion) for emotion in emotions}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise AnalysisInputError(
                f"{variant}/{slug}: activation files missing (materialize {variant}/activations for model {slug} "
                f"first): {missing}"
            )
        files = {emotion: _open_verified(path) for emotion, path in paths.items()}
        return cls.from_files(variant, slug, files, dataset_path=dataset_path, kinds=kinds)

    @classmethod
    def from_files(
        cls,
        variant: str,
        slug: str,
        files: Mapping[str, ActivationFile],
        *,
        dataset_path: Path | None = None,
        kinds: Sequence[str] = KINDS,
    ) -> ModelActivations:
        emotions = tuple(files)
        first = files[emotions[0]]
        facts = {}
        for emotion, f in files.items():
            recorded = f.header.emotion
            if recorded is not None and recorded != emotion:
                raise AnalysisInputError(f"{f.path}: holds emotion {recorded!r}, expected {emotion!r}")
            h = f.header
            facts[emotion] = (h.model_id, h.model_revision, h.n_layers, tuple(f.layers), h.d_model, h.dataset_sha256)
        if len(set(facts.values())) != 1:
            raise AnalysisInputError(
                f"{variant}/{slug}: the emotion files come from different models, shapes, layers or datasets "
                f"(model_id, revision, n_layers, stored layers, d_model, dataset_sha256): {facts}"
            )
        positions = {emotion: stored_positions(f) for emotion, f in files.items()}
        if len(set(positions.values())) != 1:
            raise AnalysisInputError(f"{variant}/{slug}: the emotion files store different positions: {positions}")
        common = [k for k in kinds if all(k in f.kinds for f in files.values())]
        if not common:
            raise AnalysisInputError(f"{variant}/{slug}: no activation kind of {list(kinds)} in every file")
        labels, ids, lengths = [], [], []
        for emotion, f in files.items():
            labels += [emotion] * f.n_sentences
            ids += f.sentence_ids
            lengths.append(np.diff(np.asarray(f.offsets, dtype=np.int64)))
        if len(set(ids)) != len(ids):
            raise AnalysisInputError(f"{variant}/{slug}: sentence ids repeat across emotion files")
        offsets = offsets_of(np.concatenate(lengths))
        acts = cls(
            variant=variant,
            slug=slug,
            model_id=first.header.model_id or slug,
            model_revision=first.header.model_revision or "",
            emotions=emotions,
            files=dict(files),
            labels=labels,
            sentence_ids=ids,
            offsets=offsets,
            n_layers=first.n_layers,
            d_model=first.d_model,
            kinds=tuple(common),
            dataset_sha256=first.header.dataset_sha256 or "",
            prepend_bos=bool(first.header.prepend_bos),
            positions=positions[emotions[0]],
            layers=tuple(first.layers),
        )
        if dataset_path is not None:
            acts.attach_texts(dataset_path)
        return acts

    def attach_texts(self, dataset_path: Path) -> None:
        """Texts per sentence from the dataset file, matched by sentence id (a stale file fails loudly)."""
        dataset = read_dataset(dataset_path, self.emotions)
        by_id = {sample.id: sample for sample in dataset.samples}
        missing = [sid for sid in self.sentence_ids if sid not in by_id]
        if missing:
            raise AnalysisInputError(
                f"{self.variant}/{self.slug}: {len(missing)} sentence ids of the activation files are not in "
                f"{dataset_path} (e.g. {missing[:3]}); the activations are stale: extract them again"
            )
        wrong = [sid for sid, label in zip(self.sentence_ids, self.labels) if by_id[sid].emotion != label]
        if wrong:
            raise AnalysisInputError(
                f"{self.variant}/{self.slug}: sentences {wrong[:3]} changed emotion in {dataset_path}"
            )
        if self.dataset_sha256 and dataset.sha256 != self.dataset_sha256:
            self.notes.append(
                f"{dataset_path} changed since extraction (sha256 {dataset.sha256[:12]} vs {self.dataset_sha256[:12]} "
                "recorded in the activation files); texts were matched by sentence id"
            )
        self.texts = [by_id[sid].text for sid in self.sentence_ids]

    # -- arrays -----------------------------------------------------------------------------------------
    def sentence_end_layer(self, kind: str, layer: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Sentence-end activations of MODEL layer `layer`: float32 [n_sentences, d_model] (or the sentences
        `rows`), read from each file's memory map (`ActivationFile.sentence_end`)."""
        out = np.concatenate([self.files[e].sentence_end(kind, layer) for e in self.emotions])
        return out if rows is None else out[rows]

    def sentence_end_layers(self, kind: str, rows: np.ndarray | None = None) -> LayerStack:
        """Every stored layer's sentence-end activations [len(layers), n_sentences, d_model] as a `LayerStack`,
        which reads a layer only when it is asked for."""
        return LayerStack(self, kind, rows)

    def sentence_end(self, kind: str) -> np.ndarray:
        """Sentence-end activations of every stored layer: float32 [len(layers), n_sentences, d_model]."""
        out = np.empty((len(self.layers), self.n_sentences, self.d_model), dtype=np.float32)
        start = 0
        for emotion in self.emotions:
            f = self.files[emotion]
            # only the end rows are read from the memory map, every layer at once
            out[:, start : start + f.n_sentences] = to_float32(f.mapped(kind)[:, f.offsets[1:] - 1], f.dtype)
            start += f.n_sentences
        return out

    def token_blocks(self, kind: str) -> list[np.ndarray]:
        """Per emotion (in `emotions` order), all token rows of every stored layer: float32 [len(layers), n_tokens_e,
        d_model]; for float32 storage a read-only view of the memory-mapped file, so nothing is copied."""
        return [to_float32(self.files[e].mapped(kind), self.files[e].dtype) for e in self.emotions]

    def release(self, kind: str) -> None:
        """Give back the pages of `kind` that reads through the files' memory maps brought in (`token_blocks`
        once its arrays have been used; see `ActivationFile.release`)."""
        for emotion in self.emotions:
            self.files[emotion].release(kind)

    def input_ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.files[emotion].input_ids) for emotion in self.emotions])

    def subset(self, sentence_ids: Sequence[str]) -> np.ndarray:
        """Row indices of `sentence_ids` in this model's sentence order."""
        index = {sid: i for i, sid in enumerate(self.sentence_ids)}
        return np.array([index[sid] for sid in sentence_ids], dtype=np.int64)

    def keys(self) -> dict[str, str]:
        """String metadata shared by every output file of this model."""
        return {
            "variant": self.variant,
            "model": self.slug,
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "dataset_sha256": self.dataset_sha256,
            "emotions": json.dumps(list(self.emotions)),
            "n_sentences": str(self.n_sentences),
            "n_layers": str(self.n_layers),
            "layers": json.dumps(list(self.layers)),
            "d_model": str(self.d_model),
        }


def label_layers(table: pl.DataFrame, layers: Sequence[int], columns: Sequence[str] = ("layer",)) -> pl.DataFrame:
    """`table` with the stored layer positions in `columns` (0..len(layers)-1, as the math modules number the
    layers they are given) replaced by the model layer indices `layers` they hold."""
    lookup = np.asarray(layers, dtype=np.int64)
    present = [c for c in columns if c in table.columns]
    return table.with_columns([pl.Series(c, lookup[table[c].to_numpy()], dtype=pl.Int64) for c in present])


def stored_layers(metadata: Mapping[str, str], n_stacked: int) -> list[int]:
    """The model layer indices of an analysis tensor stacked over `n_stacked` layers, from its file's `layers`
    metadata (`ModelActivations.keys`); files written without it hold every layer."""
    return json.loads(metadata["layers"]) if "layers" in metadata else list(range(n_stacked))


def stored_positions(file: ActivationFile) -> str:
    """Which rows of each sentence a file stores: `all` | `sentence_end` | `mean` | `last:N` (the `positions` of
    activation format version 2, exposed by the reader); files without it store every token (`all`). With any
    of them, a sentence's representative row is its last one, which is what `sentence_end_layer` reads."""
    return str(getattr(file, "positions", None) or getattr(file.header, "positions", None) or ALL_POSITIONS)


class LayerStack:
    """One kind's sentence-end activations of one model seen as [len(layers), n_sentences, d_model] (`shape`,
    `len`), where `[i]` reads stored layer i (model layer `layers[i]`) from the memory-mapped files (float32
    [n, d]): the analysis holds the layers at hand, not the whole block (see `layerwise`). `rows` keeps only
    those sentences, in that order."""

    ndim = 3

    def __init__(self, acts: ModelActivations, kind: str, rows: np.ndarray | None = None) -> None:
        self.acts, self.kind, self.rows, self.layers = acts, kind, rows, acts.layers
        n = acts.n_sentences if rows is None else len(rows)
        self.shape = (len(self.layers), n, acts.d_model)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, layer: int) -> np.ndarray:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < len(self):
            raise IndexError(f"{self.acts.slug}/{self.kind}: stored layer {layer!r} is not one of 0..{len(self) - 1}")
        return self.acts.sentence_end_layer(self.kind, self.layers[layer], self.rows)


# (path, device, inode, size, mtime in ns, stored checksum) of the files whose data this process has hashed
_VERIFIED: set[tuple] = set()


def _open_verified(path: Path) -> ActivationFile:
    """`ActivationFile(path)` with its checksum verified once per process: the per-model analysis steps of a
    run (in-process, or on one long-lived worker) each open the same files, and hashing them again would cost
    more than most steps compute. A rewritten file has another inode or mtime and is hashed again."""
    before = os.stat(path)
    file = ActivationFile(path, verify=False)
    after = os.stat(path)
    where = (str(Path(path).resolve()), after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
    key = (*where, file.header.checksum)
    if key not in _VERIFIED or before != after:
        file.verify()
        _VERIFIED.add(key)
    return file


def reference_emotion(emotions: Sequence[str]) -> str:
    """`neutral` when configured, else the last emotion (the vs-reference differences need one)."""
    return "neutral" if "neutral" in emotions else tuple(emotions)[-1]


# -- token strings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStrings:
    tokens: list[str] | None  # one per token row, or None when the tokenizer could not be trusted
    status: str


class _Transformers:
    """A transformers tokenizer seen through the four questions `token_strings` asks."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def bos(self) -> int:
        return bos_token_id(self.tokenizer)

    def size(self) -> int:
        return len(self.tokenizer)

    def tokens(self, ids: list[int]) -> list[str]:
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]


class _TokenizerFile:
    """A model folder's `tokenizer.json` read by the `tokenizers` library alone: what a transformers fast
    tokenizer wraps, without importing transformers (and torch with it). The BOS (else CLS) token is the one
    `tokenizer_config.json` / `special_tokens_map.json` name, as transformers reads them."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()  # transformers resets both unless asked for them
        self.tokenizer.no_padding()
        self.special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                self.special.update(json.loads((folder / name).read_text(encoding="utf-8")))

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def bos(self) -> int:
        for name in ("bos_token", "cls_token"):
            token = self.special.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None and (index := self.tokenizer.token_to_id(token)) is not None:
                return index
        raise ValueError("prepend_bos requested but the tokenizer has neither a BOS nor a CLS token")

    def size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def tokens(self, ids: list[int]) -> list[str]:
        strings = [self.tokenizer.id_to_token(i) for i in ids]
        if any(t is None for t in strings):
            raise ValueError("an id has no token in tokenizer.json")
        return strings


def token_strings(
    acts: ModelActivations,
    training_texts: Callable[[], Sequence[str]] | None = None,
    *,
    tokenizer=None,
) -> TokenStrings:
    """Decode every stored token id to its token string (`convert_ids_to_tokens`), with the model's own
    tokenizer loaded alone (no weights).

    The tokenizer is checked before it is trusted: with the sentences' texts attached, re-tokenizing them
    must give exactly the stored ids (the offline models train their tokenizer on the configured datasets,
    so a changed dataset means a different tokenizer); without texts, every id must be in its vocabulary.
    If the check fails or the tokenizer cannot be loaded, `tokens` is None and `status` says why.

    Without a `tokenizer`, the model folder's `tokenizer.json` is read with the `tokenizers` library first;
    where there is none, or it does not pass the check on its own, transformers' `AutoTokenizer` decides.
    """
    if (reason := acts.token_level_unavailable()) is not None:
        return TokenStrings(None, f"not applicable: {reason}")
    ids = acts.input_ids()
    if tokenizer is None:
        try:
            from emo_assets.core.models import resolve_model_path

            _, path, _ = resolve_model_path(acts.model_id, training_texts=training_texts)
            if (decoded := _decode_with_file(acts, ids, Path(path))) is not None:
                return decoded
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "no token strings", reported in status
            return TokenStrings(None, f"tokenizer not loaded ({type(exc).__name__}: {str(exc)[:200]})")
    return _decode(acts, ids, _Transformers(tokenizer))


def _decode_with_file(acts: ModelActivations, ids: np.ndarray, folder: Path) -> TokenStrings | None:
    """`_decode` with the folder's `tokenizer.json`; None when it is absent, unreadable or not trusted."""
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        decoded = _decode(acts, ids, _TokenizerFile(folder))
    except Exception:  # noqa: BLE001 - what the bare library cannot read is left to transformers
        return None
    return decoded if decoded.tokens is not None else None


def _decode(acts: ModelActivations, ids: np.ndarray, tokenizer: _Transformers | _TokenizerFile) -> TokenStrings:
    if acts.texts is not None:
        encoded = tokenizer.encode(list(acts.texts))
        if acts.prepend_bos:
            try:
                bos = tokenizer.bos()
            except ValueError as exc:
                return TokenStrings(None, str(exc))
            encoded = [[bos, *e] for e in encoded]
        stored = [ids[a:b].tolist() for a, b in zip(acts.offsets[:-1], acts.offsets[1:])]
        mismatched = sum(1 for e, s in zip(encoded, stored) if e[: len(s)] != s)
        if mismatched:
            return TokenStrings(None, f"tokenizer does not reproduce the stored ids of {mismatched} sentences")
        status = "verified (texts re-tokenize to the stored ids)"
    else:
        if int(ids.max()) >= tokenizer.size():
            return TokenStrings(None, f"stored id {int(ids.max())} is outside the tokenizer's vocabulary")
        status = "vocabulary checked (no texts to re-tokenize)"
    try:
        return TokenStrings(tokenizer.tokens(ids.tolist()), status)
    except ValueError as exc:
        return TokenStrings(None, str(exc))


def read_parquet_if_exists(paths: Iterable[Path]) -> pl.DataFrame | None:
    """Vertical concatenation of the existing files (schemas relaxed), or None if there is none."""
    frames = [pl.read_parquet(p) for p in paths if Path(p).is_file()]
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None
