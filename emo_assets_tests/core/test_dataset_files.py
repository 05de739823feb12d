"""Content and format controls for the emotion-sentence datasets in ``data/``.

Checks both the baseline (``emotion_dataset.jsonl``, 70 per emotion) and the
extended file (``emotion_dataset_extended.jsonl``, 100 per emotion), and that
the baseline is the first 70 records of each emotion in the extended file.

The length-only probe uses scikit-learn (a runtime dependency of the project);
everything else needs only the standard library and pytest.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
BASELINE = DATA_DIR / "emotion_dataset.jsonl"
EXTENDED = DATA_DIR / "emotion_dataset_extended.jsonl"

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
KEY_ORDER = ["id", "emotion", "text"]
BASELINE_PER_EMOTION = 70

FILES = {
    "baseline": (BASELINE, 70),
    "extended": (EXTENDED, 100),
}

# Lexical controls: at least MIN_KEYWORD_FREE of each emotion's sentences must
# contain none of these substrings (case-insensitive substring matching, so
# e.g. "made" counts as containing "mad").
KEYWORDS = {
    "gratitude": ("thank",),
    "apology": ("sorry", "apolog"),
    "anger": ("angry", "furious", "mad"),
}
MIN_KEYWORD_FREE = 0.30

# Mean token length of any emotion may exceed any other's by at most 15 %.
MAX_MEAN_LENGTH_RATIO = 1.15
# A logistic regression on sentence length alone (words and characters) must stay
# near chance (0.25 with four balanced emotions), so that no probe can succeed on
# length. The margin above chance covers the fold-to-fold noise of 280-400 samples.
MAX_LENGTH_PROBE_ACCURACY = 0.30
# "Most sentences end with punctuation."
MIN_FINAL_PUNCT = 0.90
# Sentences are meant to be roughly 6-25 words; allow a little slack.
MIN_WORDS, MAX_WORDS = 5, 30

ID_RE = re.compile(r"^(?P<emotion>[a-z]+)-(?P<num>\d{3})$")
TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def token_length(text: str) -> int:
    return len(TOKEN_RE.findall(text))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def read_raw(path: Path) -> bytes:
    assert path.is_file(), f"missing dataset file: {path}"
    return path.read_bytes()


def load_records(path: Path) -> list[dict]:
    text = read_raw(path).decode("utf-8")
    return [json.loads(line) for line in text.split("\n") if line]


def by_emotion(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {e: [] for e in EMOTIONS}
    for rec in records:
        groups.setdefault(rec["emotion"], []).append(rec)
    return groups


def slices(records: list[dict], per_emotion: int):
    """Yield (label, groups) for the whole file and for the first-70 slice."""
    groups = by_emotion(records)
    yield f"all {per_emotion}", groups
    if per_emotion > BASELINE_PER_EMOTION:
        yield (
            f"first {BASELINE_PER_EMOTION}",
            {e: recs[:BASELINE_PER_EMOTION] for e, recs in groups.items()},
        )


@pytest.fixture(params=sorted(FILES), ids=sorted(FILES))
def dataset(request):
    path, per_emotion = FILES[request.param]
    return request.param, path, per_emotion, load_records(path)


# --------------------------------------------------------------------- format


@pytest.mark.parametrize("name", sorted(FILES))
def test_raw_encoding_and_line_format(name):
    path, _ = FILES[name]
    raw = read_raw(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # pragma: no cover - message only
        pytest.fail(f"{path.name}: not valid UTF-8 ({exc})")
    assert not text.startswith("\ufeff"), f"{path.name}: must not start with a BOM"
    assert "\r" not in text, f"{path.name}: must use \\n line endings only (found \\r)"
    assert text.endswith("\n"), f"{path.name}: last line must end with \\n"
    lines = text[:-1].split("\n")
    for lineno, line in enumerate(lines, 1):
        assert line.strip(), f"{path.name}:{lineno}: blank line"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{path.name}:{lineno}: invalid JSON ({exc}): {line!r}")
        assert isinstance(obj, dict), f"{path.name}:{lineno}: line is not a JSON object"
        assert list(obj) == KEY_ORDER, (
            f"{path.name}:{lineno}: keys must be exactly {KEY_ORDER} in that order, got {list(obj)}"
        )
        assert line == json.dumps(obj, ensure_ascii=False), (
            f"{path.name}:{lineno}: line is not in json.dumps(obj, ensure_ascii=False) form: {line!r}"
        )


def test_field_types_and_text_hygiene(dataset):
    name, path, _, records = dataset
    for i, rec in enumerate(records, 1):
        for key in KEY_ORDER:
            assert isinstance(rec[key], str), f"{path.name} record {i}: {key!r} must be a string"
        text = rec["text"]
        assert text == text.strip(), f"{path.name} {rec['id']}: text has leading/trailing whitespace"
        assert "\n" not in text and "\t" not in text, f"{path.name} {rec['id']}: text has control whitespace"
        assert text, f"{path.name} {rec['id']}: empty text"


def test_counts_per_emotion(dataset):
    name, path, per_emotion, records = dataset
    counts = Counter(rec["emotion"] for rec in records)
    assert set(counts) == set(EMOTIONS), (
        f"{path.name}: emotions must be exactly {sorted(EMOTIONS)}, got {sorted(counts)}"
    )
    for emotion in EMOTIONS:
        assert counts[emotion] == per_emotion, (
            f"{path.name}: expected {per_emotion} '{emotion}' sentences, got {counts[emotion]}"
        )
    assert len(records) == per_emotion * len(EMOTIONS), (
        f"{path.name}: expected {per_emotion * len(EMOTIONS)} lines, got {len(records)}"
    )


def test_grouped_in_emotion_order(dataset):
    name, path, per_emotion, records = dataset
    order = [rec["emotion"] for rec in records]
    expected = [e for e in EMOTIONS for _ in range(per_emotion)]
    assert order == expected, f"{path.name}: lines must be grouped by emotion in the order {list(EMOTIONS)}"


def test_ids_are_sequential_and_match_emotion(dataset):
    name, path, per_emotion, records = dataset
    ids = [rec["id"] for rec in records]
    dupes = [i for i, c in Counter(ids).items() if c > 1]
    assert not dupes, f"{path.name}: duplicate ids {dupes}"
    for emotion, recs in by_emotion(records).items():
        got = [rec["id"] for rec in recs]
        expected = [f"{emotion}-{n:03d}" for n in range(1, per_emotion + 1)]
        mismatch = next(((g, x) for g, x in zip(got, expected) if g != x), "count differs")
        assert got == expected, (
            f"{path.name}: '{emotion}' ids must run {expected[0]}..{expected[-1]} in order; "
            f"first mismatch (got, expected): {mismatch}"
        )
        for rec in recs:
            m = ID_RE.match(rec["id"])
            assert m and m["emotion"] == rec["emotion"], (
                f"{path.name}: id {rec['id']!r} does not match emotion {rec['emotion']!r}"
            )


# -------------------------------------------------------------------- content


def test_no_duplicate_texts(dataset):
    name, path, _, records = dataset
    seen: dict[str, str] = {}
    for rec in records:
        key = normalise(rec["text"])
        assert key not in seen, f"{path.name}: duplicate text in {rec['id']} and {seen[key]}: {rec['text']!r}"
        seen[key] = rec["id"]


def test_no_one_word_near_duplicates(dataset):
    name, path, _, records = dataset
    words = [(rec["id"], re.findall(r"\w+", rec["text"].lower())) for rec in records]
    for (id_a, a), (id_b, b) in combinations(words, 2):
        if len(a) != len(b):
            continue
        diff = sum(x != y for x, y in zip(a, b))
        assert diff > 1, f"{path.name}: near-duplicate texts {id_a} and {id_b} differ in only {diff} word(s)"


def test_keyword_free_share(dataset):
    name, path, per_emotion, records = dataset
    for label, groups in slices(records, per_emotion):
        for emotion, keywords in KEYWORDS.items():
            texts = [rec["text"].lower() for rec in groups[emotion]]
            free = sum(1 for t in texts if not any(k in t for k in keywords))
            share = free / len(texts)
            assert share >= MIN_KEYWORD_FREE, (
                f"{path.name} ({label}): only {free}/{len(texts)} = {share:.0%} of '{emotion}' "
                f"sentences avoid {list(keywords)}; need >= {MIN_KEYWORD_FREE:.0%}"
            )


def test_mean_token_length_balanced(dataset):
    name, path, per_emotion, records = dataset
    for label, groups in slices(records, per_emotion):
        means = {e: sum(token_length(r["text"]) for r in recs) / len(recs) for e, recs in groups.items()}
        for (e1, m1), (e2, m2) in combinations(means.items(), 2):
            ratio = max(m1, m2) / min(m1, m2)
            assert ratio <= MAX_MEAN_LENGTH_RATIO, (
                f"{path.name} ({label}): mean token length of '{e1}' ({m1:.2f}) and '{e2}' "
                f"({m2:.2f}) differ by {ratio - 1:.1%} (> {MAX_MEAN_LENGTH_RATIO - 1:.0%}); "
                f"all means: { {k: round(v, 2) for k, v in means.items()} }"
            )


def length_probe_accuracy(records: list[dict]) -> float:
    """Mean 5-fold accuracy of a logistic regression on [words, characters] per sentence."""
    features = [[len(r["text"].split()), len(r["text"])] for r in records]
    labels = [r["emotion"] for r in records]
    probe = make_pipeline(StandardScaler(), LogisticRegression())
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    return float(cross_val_score(probe, features, labels, cv=folds).mean())


def test_length_alone_does_not_predict_emotion(dataset):
    name, path, _, records = dataset
    accuracy = length_probe_accuracy(records)
    assert accuracy <= MAX_LENGTH_PROBE_ACCURACY, (
        f"{path.name}: a length-only probe (words, characters) reaches {accuracy:.3f} accuracy "
        f"(> {MAX_LENGTH_PROBE_ACCURACY}); balance the per-emotion length distributions"
    )


def test_length_probe_detects_a_length_cue():
    """The probe itself can fail: sorting sentences by length into emotions makes it accurate."""
    records = sorted(load_records(EXTENDED), key=lambda r: (len(r["text"]), r["id"]))
    quarter = len(records) // len(EMOTIONS)
    relabelled = [{**r, "emotion": EMOTIONS[i // quarter]} for i, r in enumerate(records)]
    assert length_probe_accuracy(relabelled) > 0.6


def test_sentence_lengths_reasonable(dataset):
    name, path, _, records = dataset
    for rec in records:
        n = len(rec["text"].split())
        assert MIN_WORDS <= n <= MAX_WORDS, (
            f"{path.name} {rec['id']}: {n} words, expected {MIN_WORDS}-{MAX_WORDS}: {rec['text']!r}"
        )


def test_most_sentences_end_with_punctuation(dataset):
    name, path, _, records = dataset
    for emotion, recs in by_emotion(records).items():
        ended = sum(1 for r in recs if r["text"].rstrip()[-1:] in {".", "!", "?"})
        share = ended / len(recs)
        assert share >= MIN_FINAL_PUNCT, (
            f"{path.name}: only {share:.0%} of '{emotion}' sentences end with . ! or ?; need >= {MIN_FINAL_PUNCT:.0%}"
        )


# ------------------------------------------------------- baseline vs extended


def test_baseline_is_subset_of_extended():
    base = load_records(BASELINE)
    ext = load_records(EXTENDED)
    ext_by_id = {rec["id"]: rec for rec in ext}
    for rec in base:
        assert rec["id"] in ext_by_id, f"baseline record {rec['id']} missing from extended file"
        assert ext_by_id[rec["id"]] == rec, (
            f"baseline record {rec['id']} differs in extended file: {rec!r} vs {ext_by_id[rec['id']]!r}"
        )


def test_baseline_is_first_70_of_each_emotion_in_extended():
    base = by_emotion(load_records(BASELINE))
    ext = by_emotion(load_records(EXTENDED))
    for emotion in EMOTIONS:
        assert base[emotion] == ext[emotion][:BASELINE_PER_EMOTION], (
            f"baseline '{emotion}' records must equal the first {BASELINE_PER_EMOTION} "
            f"'{emotion}' records of the extended file"
        )
