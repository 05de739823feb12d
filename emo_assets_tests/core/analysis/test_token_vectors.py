import numpy as np
import pytest

from emo_assets.core.analysis.token_vectors import (
    emotion_word_vectors,
    lexicon_matches,
    normalise_token,
    sentence_content_means,
    token_vector_rows,
    validate_offsets,
)
from emo_assets.core.analysis.vectors import emotion_vectors
from emo_assets_tests.core.analysis.synthetic import EMOTIONS

LEXICON = {"gratitude": ["thank", "grate"], "anger": ["furious", "angry"], "apology": ["sorry", "apolog"]}
WORDS = {
    "gratitude": ["Ġthanks", "ĠThank", "Ġgrateful"],
    "anger": ["Ġfurious", "ĠAngry"],
    "apology": ["ĠSorry", "▁apologize"],
}
FILLER = ["Ġthe", "Ġday", "Ġwas", "Ġlong", "Ġand", "Ġwe", "Ġwalked", "Ġhome", "."]


def _corpus(d=32, per_emotion=20, seed=0):
    """Sentences: first token 'I' (sink, huge norm), fillers, and one emotion word (except neutral).
    Emotion-word tokens carry strength * planted[e]; every token shares an offset; noise is small."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 3)))
    planted = 5.0 * q.T
    offset = np.full(d, 3.0)
    tokens, labels, rows, offsets, n_words = [], [], [], [0], dict.fromkeys(EMOTIONS, 0)
    for e, emotion in enumerate(EMOTIONS):
        for _ in range(per_emotion):
            sent = ["I"] + list(rng.choice(FILLER, size=rng.integers(2, 6)))
            if emotion != "neutral":
                sent.insert(int(rng.integers(1, len(sent) + 1)), str(rng.choice(WORDS[emotion])))
                n_words[emotion] += 1
            for j, tok in enumerate(sent):
                x = offset + 0.3 * rng.standard_normal(d)
                if j == 0:
                    x = x + 100.0  # attention-sink-like first token
                elif emotion != "neutral" and normalise_token(tok).startswith(tuple(LEXICON[emotion])):
                    x = x + planted[e]
                rows.append(x)
            tokens += sent
            labels.append(emotion)
            offsets.append(offsets[-1] + len(sent))
    return np.array(rows, dtype=np.float32), np.array(offsets), tokens, labels, planted, n_words


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_normalise_token():
    assert normalise_token("ĠThank") == "thank"
    assert normalise_token("▁Sorry") == "sorry"
    assert normalise_token("  furious") == "furious"
    assert normalise_token("Ċ") == ""


def test_emotion_word_vectors_recover_planted_direction():
    acts, offsets, tokens, labels, planted, n_words = _corpus()
    matches = lexicon_matches(tokens, offsets, labels, LEXICON, EMOTIONS)
    tv = emotion_word_vectors(acts, offsets, labels, matches, EMOTIONS)
    for e, emotion in enumerate(EMOTIONS[:3]):
        assert tv.counts[e] == n_words[emotion] == 20
        assert tv.sentence_counts[e] == 20
        # raw vector = offset + planted; centring by the content-token mean removes the offset
        assert _cos(tv.centred[e], planted[e]) >= 0.99
    assert tv.counts[3] == 0 and np.isnan(tv.vectors[3]).all() and np.isnan(tv.centred[3]).all()


def test_first_token_excluded_from_sentence_means():
    acts, offsets, tokens, labels, *_ = _corpus()
    base = sentence_content_means(acts, offsets)
    spiked = acts.astype(np.float64).copy()
    spiked[offsets[:-1]] += 1e6
    after = sentence_content_means(spiked, offsets)
    np.testing.assert_allclose(after.means, base.means, rtol=0, atol=1e-9)
    i = 5
    np.testing.assert_allclose(base.means[i], acts[offsets[i] + 1 : offsets[i + 1]].astype(np.float64).mean(axis=0))
    assert not base.fallback.any()


def test_one_token_sentence_falls_back_to_its_token():
    acts = np.arange(12, dtype=np.float64).reshape(6, 2)
    res = sentence_content_means(acts, [0, 1, 4, 6])
    np.testing.assert_allclose(res.means[0], acts[0])
    np.testing.assert_allclose(res.means[1], acts[2:4].mean(axis=0))
    np.testing.assert_allclose(res.means[2], acts[5])
    assert res.fallback.tolist() == [True, False, False]


def test_lexicon_matching_rules():
    tokens = ["ĠSorry", "Ġthanks", "Ġfor", "Ġwaiting", "Ġsorry", "Ġmad"]
    offsets = [0, 4, 6]
    labels = ["gratitude", "apology"]
    m = lexicon_matches(tokens, offsets, labels, LEXICON, EMOTIONS)
    # "Sorry" in a gratitude sentence is not an apology token; "thanks" at position 1 is gratitude
    assert m[0].tolist() == [False, True, False, False, False, False]
    # "sorry" is the first token of sentence 2 -> excluded (attention sink); "mad" is not in this lexicon
    assert not m[2].any() and not m[1].any() and not m[3].any()
    m2 = lexicon_matches(tokens, offsets, labels, LEXICON, EMOTIONS, within_label=False, exclude_first=False)
    assert m2[2].tolist() == [True, False, False, False, True, False]


def test_rows_compare_with_sentence_end_vectors():
    acts, offsets, tokens, labels, planted, _ = _corpus()
    # sentence-end activations carrying the same planted directions (plus a different offset)
    rng = np.random.default_rng(1)
    y = np.array([EMOTIONS.index(lab) for lab in labels])
    full = np.vstack([planted, np.zeros(planted.shape[1])])
    X_end = 40.0 + full[y] + 0.3 * rng.standard_normal((len(y), planted.shape[1]))
    sent = emotion_vectors(X_end, labels, EMOTIONS)
    rows = token_vector_rows([acts, acts], offsets, tokens, labels, LEXICON, [sent, sent], EMOTIONS, model="m")
    assert len(rows) == 8 and rows[0]["model"] == "m"
    by = {(r["layer"], r["emotion"]): r for r in rows}
    # centred sentence-end vectors are p_e - mean(p incl. neutral's 0); still close to p_e for 3 planted
    for emotion in EMOTIONS[:3]:
        assert by[(1, emotion)]["cosine_centred"] > 0.8
        assert by[(1, emotion)]["n_tokens"] == 20
    assert np.isnan(by[(0, "neutral")]["cosine_centred"]) and by[(0, "neutral")]["n_tokens"] == 0


def test_offsets_validation():
    with pytest.raises(ValueError):
        validate_offsets([0, 2, 2, 5], 5)
    with pytest.raises(ValueError):
        validate_offsets([1, 5], 5)
    with pytest.raises(ValueError):
        validate_offsets([0, 4], 5)
    with pytest.raises(ValueError):
        validate_offsets(np.array([0.0, 5.0]), 5)
