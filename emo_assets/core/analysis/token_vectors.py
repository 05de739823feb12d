"""Vectors built from token-level activations instead of the sentence-end token.

Token-level activations of one layer are stored ragged: `acts` [n_tokens, d] with `offsets` [n_sentences + 1]
so that sentence i owns rows offsets[i]:offsets[i+1], and `tokens[j]` is the decoded string of row j.

(a) `sentence_content_means`: per-sentence mean over tokens *excluding the first token*. In GPT-2-style models
    without a BOS token the first position is an attention sink whose residual norm is tens of times larger
    than any other token's, so including it would make every sentence mean point along the sink direction
    (another face of the anisotropy trap). A one-token sentence has nothing else, so it falls back to that
    token (recorded in `ContentMeans.fallback`). The result [n_sentences, d] feeds `vectors.emotion_vectors`.
(b) `emotion_word_vectors`: the mean activation over tokens that are emotion words ("thank", "sorry", ...)
    - a second reading of each emotion, useful where sentence-end vectors are dominated by a shared direction.
    A token matches emotion e when its normalised string (leading space / "Ġ" / "▁" markers stripped,
    lowercased) starts with one of e's lexicon stems. By default only tokens of sentences labelled e count for
    e, and the first token is excluded even if it is an emotion word ("Thanks ..."): its activation is the
    sink's, whatever its identity. An emotion with no matched token (neutral has no stems) gets a NaN vector
    and count 0 - never a zero vector that would look like a real direction.

An emotion word split by the tokenizer before the end of its stem (" ap" + "ologize") is not matched; the
counts tell how much of the lexicon the tokenizer left visible.

`token_vectors_by_layer` computes both for every layer at once, from the stored rows as they are (per-emotion
pieces of the token axis, float32, memory-mapped); the one-layer functions above are its [1, n_tokens, d] case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from emo_assets.core.analysis.blas import single_blas_thread
from emo_assets.core.analysis.labels import DEFAULT_EMOTIONS, encode_labels
from emo_assets.core.analysis.vectors import EmotionVectors, cosine_matrix

_TOKEN_MARKERS = " \t\r\n\u0120\u2581\u010a"  # space, tab, CR, LF, "Ġ", "▁", "Ċ"


def normalise_token(token: str) -> str:
    """Lowercase a decoded token after stripping leading whitespace and BPE/SentencePiece space markers."""
    return token.lstrip(_TOKEN_MARKERS).lower()


def validate_offsets(offsets: Sequence[int] | np.ndarray, n_tokens: int) -> np.ndarray:
    """Offsets as int64; they must start at 0, end at `n_tokens` and be strictly increasing (no empty
    sentence: an empty sentence has no activation to average)."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"offsets must be a 1-D integer array [n_sentences + 1], got {offsets.dtype} {offsets.shape}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ValueError(f"offsets must run from 0 to n_tokens={n_tokens}, got {offsets[0]}..{offsets[-1]}")
    if np.any(np.diff(offsets) <= 0):
        raise ValueError("offsets must be strictly increasing (every sentence needs at least one token)")
    return offsets


@dataclass(frozen=True)
class ContentMeans:
    """Per-sentence means over tokens 1.. (first token excluded); `fallback[i]` marks one-token sentences."""

    means: np.ndarray  # [..., n_sentences, d] float64 (a leading layer axis when computed for all layers)
    fallback: np.ndarray  # [n_sentences] bool


def sentence_content_means(acts: np.ndarray, offsets: Sequence[int] | np.ndarray) -> ContentMeans:
    """Mean activation of each sentence over its tokens except the first (attention sink); see module doc."""
    acts = _as_2d(acts)
    offsets = validate_offsets(offsets, acts.shape[0])
    sums, counts, fallback = _content_sums([acts[None]], offsets)
    return ContentMeans(means=sums[0] / counts[:, None], fallback=fallback)


def _as_2d(acts: np.ndarray) -> np.ndarray:
    acts = np.asarray(acts)
    if acts.ndim != 2:
        raise ValueError(f"acts must be 2-D [n, d], got shape {acts.shape}")
    return acts if np.issubdtype(acts.dtype, np.floating) else acts.astype(np.float64)


def _content_sums(blocks: Sequence[np.ndarray], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sums [L, n_sentences, d] float64, counts, fallback) over each sentence's rows first+1 .. end (its only
    row for a one-token sentence). `blocks` [L, n_tokens_b, d] of any float type are consecutive pieces of the
    token axis that split it between sentences (the per-emotion files), so nothing is concatenated or
    converted as a whole.

    Each sentence's rows of every layer are summed in one reduce over its rows, accumulated in float64 in row
    order - the additions of a float64 reduce over each sentence - while only the stored float32 rows are read,
    once: a few hundred small reduces, where a scatter-add per token or a float64 copy of every layer costs
    far more."""
    lengths = np.diff(offsets)
    fallback = lengths == 1
    first = np.where(fallback, offsets[:-1], offsets[:-1] + 1)
    counts = np.where(fallback, 1, lengths - 1)
    sums = np.empty((blocks[0].shape[0], len(counts), blocks[0].shape[-1]))
    base, sentence = 0, 0
    for block in blocks:
        end = base + block.shape[-2]
        stop = int(np.searchsorted(offsets, end))
        if stop >= len(offsets) or offsets[stop] != end:
            raise ValueError(f"token blocks must end at sentence boundaries (a block ends at row {end})")
        for i in range(sentence, stop):
            block[:, first[i] - base : offsets[i + 1] - base].sum(axis=1, dtype=np.float64, out=sums[:, i])
        base, sentence = end, stop
    if base != offsets[-1]:
        raise ValueError(f"token blocks hold {base} rows, offsets {int(offsets[-1])}")
    return sums, counts, fallback


def first_token_excluded_mask(offsets: np.ndarray) -> np.ndarray:
    """Boolean mask over tokens: True for every token that is not the first of its sentence."""
    keep = np.ones(int(offsets[-1]), dtype=bool)
    keep[offsets[:-1]] = False
    return keep


def lexicon_matches(
    tokens: Sequence[str],
    offsets: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    lexicon: Mapping[str, Sequence[str]],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    *,
    within_label: bool = True,
    exclude_first: bool = True,
) -> np.ndarray:
    """Boolean [n_emotions, n_tokens]: token j is an emotion word of emotion e (see module doc).

    `within_label`: count a match for e only in sentences labelled e. `exclude_first`: never match a
    sentence's first token (attention sink). Emotions missing from `lexicon` have no stems.
    """
    emotions = tuple(emotions)
    offsets = validate_offsets(offsets, len(tokens))
    y = encode_labels(labels, emotions)
    if len(y) != len(offsets) - 1:
        raise ValueError(f"{len(y)} labels for {len(offsets) - 1} sentences")
    unknown = sorted(set(lexicon) - set(emotions))
    if unknown:
        raise ValueError(f"lexicon emotions {unknown} are not in {list(emotions)}")
    normalised = [normalise_token(str(t)) for t in tokens]
    token_label = np.repeat(y, np.diff(offsets))
    allowed = first_token_excluded_mask(offsets) if exclude_first else np.ones(len(tokens), dtype=bool)
    matches = np.zeros((len(emotions), len(tokens)), dtype=bool)
    for e, emotion in enumerate(emotions):
        stems = tuple(s.strip().lower() for s in lexicon.get(emotion, ()))
        if any(not s for s in stems):
            raise ValueError(f"empty stem in the lexicon of {emotion!r}")
        if not stems:
            continue
        hit = np.fromiter((t.startswith(stems) for t in normalised), dtype=bool, count=len(normalised))
        if within_label:
            hit &= token_label == e
        matches[e] = hit & allowed
    return matches


@dataclass(frozen=True)
class TokenVectors:
    """Emotion-word token vectors of one layer. Rows follow `emotions`; NaN rows where `counts` is 0."""

    emotions: tuple[str, ...]
    vectors: np.ndarray  # [E, d] mean activation of the matched tokens
    centred: np.ndarray  # [E, d] vectors - content_grand_mean
    counts: np.ndarray  # [E] matched tokens
    sentence_counts: np.ndarray  # [E] sentences with at least one matched token
    content_grand_mean: np.ndarray  # [d] unweighted mean over emotions of their content-token means


def emotion_word_vectors(
    acts: np.ndarray,
    offsets: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    matches: np.ndarray,
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
) -> TokenVectors:
    """Mean activation over each emotion's matched tokens (`matches` from `lexicon_matches`, computed once
    for all layers). `centred` subtracts the content-token grand mean - the mean over emotions of the mean of
    all non-first tokens of that emotion's sentences - because raw token activations share the same
    anisotropic offset as sentence-end ones, so only centred vectors can be compared by cosine."""
    acts = _as_2d(acts)
    return token_vectors_by_layer([acts[None]], offsets, labels, matches, emotions)[1][0]


@single_blas_thread
def token_vectors_by_layer(
    blocks: Sequence[np.ndarray],
    offsets: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    matches: np.ndarray | None,
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
) -> tuple[ContentMeans, list[TokenVectors] | None]:
    """`sentence_content_means` and `emotion_word_vectors` of every layer at once. `blocks` [L, n_tokens_b, d]
    are consecutive pieces of the token axis split between sentences (see `_content_sums`); `matches` None
    skips the emotion-word vectors."""
    emotions = tuple(emotions)
    n_tokens = sum(b.shape[-2] for b in blocks)
    offsets = validate_offsets(offsets, n_tokens)
    y = encode_labels(labels, emotions)
    if len(y) != len(offsets) - 1:
        raise ValueError(f"{len(y)} labels for {len(offsets) - 1} sentences")
    if matches is not None and matches.shape != (len(emotions), n_tokens):
        raise ValueError(f"matches must be [{len(emotions)}, {n_tokens}], got {matches.shape}")
    sums, counts, fallback = _content_sums(blocks, offsets)
    n_layers, d = sums.shape[0], sums.shape[-1]
    # content-token means per emotion, from the sentence sums (a one-token sentence has no content token)
    sizes = np.bincount(y, weights=np.diff(offsets) - 1, minlength=len(emotions))
    present = sizes > 0
    if present.any():
        members = np.stack([(y == e) & ~fallback for e in np.flatnonzero(present)]).astype(np.float64)
        grand = (members @ sums / sizes[present, None]).mean(axis=1)
    else:
        grand = np.full((n_layers, d), np.nan)
    sums /= counts[:, None]  # now the means, without another [L, n_sentences, d] array
    content = ContentMeans(means=sums, fallback=fallback)
    if matches is None:
        return content, None
    sentence = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    bases = np.concatenate([[0], np.cumsum([b.shape[-2] for b in blocks])])
    vectors = np.full((n_layers, len(emotions), d), np.nan)
    match_counts = matches.sum(axis=1).astype(np.int64)
    sentence_counts = np.zeros(len(emotions), dtype=np.int64)
    for e in np.flatnonzero(match_counts):
        index = np.flatnonzero(matches[e])
        which = np.searchsorted(bases, index, side="right") - 1
        rows = np.concatenate([blocks[b][:, index[which == b] - bases[b]] for b in np.unique(which)], axis=1)
        vectors[:, e] = rows.sum(axis=1, dtype=np.float64) / len(index)
        sentence_counts[e] = len(np.unique(sentence[index]))
    words = [
        TokenVectors(
            emotions=emotions,
            vectors=vectors[layer],
            centred=vectors[layer] - grand[layer],
            counts=match_counts,
            sentence_counts=sentence_counts,
            content_grand_mean=grand[layer],
        )
        for layer in range(n_layers)
    ]
    return content, words


def cosine_with_sentence_end(token: TokenVectors, sentence_end: EmotionVectors) -> dict[str, dict[str, float]]:
    """Per emotion: cosine of the centred token vector with the centred sentence-end vector ("centred") and
    of the raw vectors ("raw", inflated by anisotropy; for comparison only). NaN where a vector is NaN/zero."""
    if token.emotions != sentence_end.emotions:
        raise ValueError(f"emotion orders differ: {token.emotions} vs {sentence_end.emotions}")
    centred = np.diag(cosine_matrix(token.centred, sentence_end.centred))
    raw = np.diag(cosine_matrix(token.vectors, sentence_end.means))
    return {e: {"centred": float(c), "raw": float(r)} for e, c, r in zip(token.emotions, centred, raw)}


def token_vector_rows(
    acts_layers: Sequence[np.ndarray] | np.ndarray,
    offsets: Sequence[int] | np.ndarray,
    tokens: Sequence[str],
    labels: Sequence[str],
    lexicon: Mapping[str, Sequence[str]],
    sentence_end_by_layer: Sequence[EmotionVectors],
    emotions: Sequence[str] = DEFAULT_EMOTIONS,
    *,
    within_label: bool = True,
    exclude_first: bool = True,
    **keys: object,
) -> list[dict]:
    """Tidy rows (layer x emotion): matched-token counts and the cosine of each emotion-word vector with the
    sentence-end vector of the same layer. `acts_layers` is [n_layers, n_tokens, d] (or a list of layers)
    and must have as many layers as `sentence_end_by_layer`; `keys` are copied into every row."""
    if len(acts_layers) != len(sentence_end_by_layer):
        raise ValueError(f"{len(acts_layers)} token-level layers vs {len(sentence_end_by_layer)} sentence-end layers")
    matches = lexicon_matches(
        tokens, offsets, labels, lexicon, emotions, within_label=within_label, exclude_first=exclude_first
    )
    layers = acts_layers if isinstance(acts_layers, np.ndarray) else np.stack([_as_2d(a) for a in acts_layers])
    _, words = token_vectors_by_layer([layers], offsets, labels, matches, emotions)
    rows = []
    for layer, (tv, sent) in enumerate(zip(words, sentence_end_by_layer)):
        cos = cosine_with_sentence_end(tv, sent)
        for e, emotion in enumerate(tv.emotions):
            row = dict(keys)
            row.update(
                layer=layer,
                emotion=emotion,
                n_tokens=int(tv.counts[e]),
                n_sentences=int(tv.sentence_counts[e]),
                cosine_centred=cos[emotion]["centred"],
                cosine_raw=cos[emotion]["raw"],
            )
            rows.append(row)
    return rows
