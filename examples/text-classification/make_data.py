"""Build the example text-classification data from WordNet 3.0 noun glosses (deterministic).

Each row is the definition (gloss) of a WordNet noun synset; its label is the synset's lexicographer
file: what kind of thing the definition describes (animal, food, person, place). Usage examples
(the quoted sentences after a gloss) are dropped, and so are very short or long definitions.

Needs the Debian/Ubuntu package ``wordnet-base`` (``/usr/share/wordnet/data.noun``); the CSV files it
writes are committed, so running the example does not need it. Run from the repository root:

    python examples/text-classification/make_data.py

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. (License: see LICENSE-WordNet
in this folder.)
"""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
HERE = Path(__file__).resolve().parent
CLASSES = {5: "animal", 13: "food", 15: "place", 18: "person"}  # lexicographer file numbers
SIZES = {"train": 100, "test": 50, "unlabelled": 150}  # rows per class
MIN_WORDS, MAX_WORDS = 6, 30


def glosses() -> dict[str, list[str]]:
    """Cleaned glosses per class, in file order."""
    out: dict[str, list[str]] = {name: [] for name in CLASSES.values()}
    seen = set()
    for line in DATA_NOUN.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:  # the license header
            continue
        fields = line.split(" ", 3)
        label = CLASSES.get(int(fields[1]))
        if label is None:
            continue
        gloss = line.split("|", 1)[1].strip()
        gloss = gloss.split('"', 1)[0]  # drop quoted usage examples
        gloss = re.sub(r"\s+", " ", gloss).strip(" ;:,")
        words = gloss.split()
        if not MIN_WORDS <= len(words) <= MAX_WORDS or gloss in seen:
            continue
        seen.add(gloss)
        out[label].append(gloss)
    return out


def main() -> int:
    if not DATA_NOUN.is_file():
        print(f"{DATA_NOUN} not found: install the wordnet-base package", file=sys.stderr)
        return 1
    rng = random.Random(0)
    by_class = glosses()
    splits: dict[str, list[tuple[str, str]]] = {name: [] for name in SIZES}
    for label in sorted(by_class):
        rows = rng.sample(by_class[label], sum(SIZES.values()))
        start = 0
        for split, n in SIZES.items():
            splits[split] += [(text, label) for text in rows[start : start + n]]
            start += n
    for split, rows in splits.items():
        rng.shuffle(rows)
        path = HERE / f"{split}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if split == "unlabelled":  # a transfer set: no labels at all
                writer.writerow(["text"])
                writer.writerows([text] for text, _ in rows)
            else:
                writer.writerow(["text", "label"])
                writer.writerows(rows)
        print(f"{path}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
