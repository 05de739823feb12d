"""Synthetic emotion sentences from templates, any size up to the templates' capacity, for the `scale` row.

A sentence is `<subject> <predicate> <place> <time>.`: the subject, place and time come from lists shared by
every emotion, the predicate from the emotion's own list ("thanked the volunteers", "slammed the door", ...).
Each emotion has as many predicates as the others, and the predicate at position j has the same number of
words in every emotion's list, so one draw of positions serves every emotion: the i-th sentence of each emotion
has the same word count (lengths are balanced exactly, not just on average), and no emotion can be told apart by
length. The positions are drawn without replacement with a fixed seed, so a size and seed give one dataset,
without duplicates (distinct positions give distinct texts, which `synthetic_sentences` checks).

    python -m benchmarks.sentences 10000 data.jsonl [--seed 0]

writes the JSON Lines dataset (`id`, `emotion`, `text`) the pipeline reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SUBJECTS = (
    "I", "We", "She", "He", "They", "My sister", "Our neighbour", "The new manager", "My grandfather",
    "The whole team", "Her best friend", "His landlord", "The young nurse", "Our teacher", "My brother",
    "The old farmer", "Their daughter", "The taxi driver", "A tired student", "The head chef", "My cousin",
    "The night guard", "Our coach", "The shop owner",
)  # fmt: skip
PLACES = (
    "at the station", "in the kitchen", "at the office", "in the park", "at the hospital", "on the bus",
    "at school", "in the garden", "at the airport", "in the car park", "at the market", "in the library",
    "at the bank", "on the phone", "in the hallway", "at the gym", "at the post office", "in the cafe",
    "at the hotel", "on the train", "at the museum", "at the beach", "in the village", "at the stadium",
)  # fmt: skip
TIMES = (
    "this morning", "yesterday", "last night", "on Monday", "on Friday evening", "after lunch",
    "before the meeting", "at midnight", "during the break", "last weekend", "early today", "this afternoon",
    "on Sunday", "after the concert", "at dawn", "on the way home", "last summer", "in the evening",
    "on Tuesday", "after work", "before dinner", "at noon", "two days ago", "last winter",
)  # fmt: skip
# per emotion, predicates of 3, 4, 5 and 6 words, four of each, in that order (the same length at each position)
PREDICATES = {
    "gratitude": (
        "thanked the volunteers", "was deeply grateful", "appreciated the help", "thanked the nurses",
        "was grateful for everything", "thanked the driver warmly", "appreciated the kind gesture",
        "sent a thank-you card",
        "thanked the neighbours for dinner", "was so grateful for it", "appreciated the extra help offered",
        "felt thankful for the support",
        "thanked the doctor for her patience", "was truly grateful for the lift",
        "appreciated how kindly everyone helped out", "sent flowers to thank the ward",
    ),
    "anger": (
        "shouted at everyone", "was absolutely furious", "slammed the door", "cursed the landlord",
        "yelled at the driver", "was furious about it", "kicked the broken machine", "lost all patience completely",
        "was livid about the delay", "shouted at the useless clerk", "stormed out of the meeting",
        "was enraged by the insult",
        "was furious about the cancelled flight", "yelled at the manager about it",
        "slammed the phone down in rage", "was outraged by the rude reply",
    ),
    "apology": (
        "apologised to everyone", "was truly sorry", "apologised for it", "begged for forgiveness",
        "apologised for the mess", "said sorry to everyone", "was sorry about it", "apologised to the neighbours",
        "apologised for being so late", "was sorry for the noise", "said sorry for the mistake",
        "apologised for the broken vase",
        "apologised for forgetting the whole meeting", "was very sorry about the mistake",
        "said sorry for shouting at everyone", "begged the host's forgiveness for that",
    ),
    "neutral": (
        "checked the timetable", "read the newspaper", "parked the car", "opened the window",
        "walked to the shop", "checked the weather forecast", "read the meeting notes", "printed the monthly report",
        "took the bus to work", "filled in the application form", "moved the chairs into rows",
        "sorted the letters by date",
        "walked the dog around the block", "put the groceries in the fridge", "wrote down the new phone number",
        "took the train to the city",
    ),
}  # fmt: skip
EMOTIONS = tuple(PREDICATES)
SLOTS = (SUBJECTS, range(len(PREDICATES["neutral"])), PLACES, TIMES)


def capacity() -> int:
    """Distinct sentences per emotion."""
    return int(np.prod([len(slot) for slot in SLOTS]))


def synthetic_sentences(n: int, seed: int = 0, emotions: Sequence[str] = EMOTIONS) -> list[dict]:
    """`n` records (`id`, `emotion`, `text`), split as evenly as possible between `emotions` (the first ones get
    one more when `n` does not divide), grouped by emotion; no text repeats. Raises ValueError for an unknown
    emotion or more sentences than the templates hold."""
    emotions = tuple(emotions)
    if unknown := [e for e in emotions if e not in PREDICATES]:
        raise ValueError(f"no templates for emotions {unknown}; known: {list(PREDICATES)}")
    if not emotions or n < len(emotions):
        raise ValueError(f"need at least one sentence per emotion: n={n}, emotions={list(emotions)}")
    counts = [n // len(emotions) + (i < n % len(emotions)) for i in range(len(emotions))]
    if counts[0] > capacity():
        raise ValueError(f"{counts[0]} sentences per emotion asked; the templates hold {capacity()}")
    positions = np.random.default_rng(seed).choice(capacity(), size=counts[0], replace=False)
    digits = np.unravel_index(positions, [len(slot) for slot in SLOTS])
    records = []
    for emotion, count in zip(emotions, counts):
        predicates = PREDICATES[emotion]
        for i in range(count):
            subject, predicate, place, time = (int(d[i]) for d in digits)
            text = f"{SUBJECTS[subject]} {predicates[predicate]} {PLACES[place]} {TIMES[time]}."
            records.append({"id": f"{emotion}-{i + 1:06d}", "emotion": emotion, "text": text})
    if len({r["text"] for r in records}) != len(records):
        raise AssertionError("the templates produced a repeated sentence")  # cannot happen with distinct slots
    return records


def write_dataset(path: Path, n: int, seed: int = 0, emotions: Sequence[str] = EMOTIONS) -> Path:
    """`synthetic_sentences` as a JSON Lines file, written atomically."""
    from emo_assets.core.atomic import atomic_path

    records = synthetic_sentences(n, seed, emotions)
    with atomic_path(Path(path)) as temp:
        Path(temp).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sentences", description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, help="number of sentences")
    parser.add_argument("out", type=Path, help="JSON Lines file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_dataset(args.out, args.n, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
