"""Write the prompt/completion data of the `lm-prompt-completion-kd` recipe (deterministic).

Each example asks to spell a number digit by digit::

    {"prompt": "spell 407:", "completion": " four zero seven"}

Numbers have 1 to 4 digits (each length equally often) and appear once across both files: 400
training examples (``spell-train.jsonl``; the recipe carves its validation rows from them) and 100
test examples (``spell-test.jsonl``). A small model learns the digit -> word map in a minute, and the
exact-match verifier checks whole answers. Run from anywhere:

    python examples/lm/make_spell_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HERE = Path(__file__).resolve().parent


def spell(n: int) -> str:
    """``407`` -> ``" four zero seven"`` (a leading space: the completion follows ``"spell 407:"``)."""
    return " " + " ".join(WORDS[int(d)] for d in str(n))


def examples(count: int, seed: int = 13) -> list[dict[str, str]]:
    """``count`` distinct numbers, their digit counts drawn uniformly from 1..4."""
    rng = random.Random(seed)
    seen: set[int] = set()
    out = []
    while len(out) < count:
        digits = rng.randint(1, 4)
        n = rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)
        if n in seen:
            continue
        seen.add(n)
        out.append({"prompt": f"spell {n}:", "completion": spell(n)})
    return out


def main() -> None:
    rows = examples(500)
    for name, part in (("spell-train.jsonl", rows[:400]), ("spell-test.jsonl", rows[400:])):
        with (HERE / name).open("w", encoding="utf-8") as fh:
            for row in part:
                fh.write(json.dumps(row) + "\n")
        print(f"wrote {len(part)} examples to {HERE / name}")


if __name__ == "__main__":
    main()
