"""A tiny instruction dataset for smoke runs of the trainer (a stand-in until the quickstart dataset):

    python experiments/train/make_color_data.py experiments/train/colors.jsonl

Each record asks for a fixed output format ("Color: <word>.") for a named colour; seeded.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cyan", "gold", "gray", "pink", "teal"]
    with open(out, "w") as f:
        for _ in range(256):
            word = words[rng.integers(len(words))]
            f.write(json.dumps({"instruction": f"Say the color {word} in the usual format.", "output": f"Color: {word}."}) + "\n")


if __name__ == "__main__":
    main()
