"""The quickstart's dataset: pull a person's name, age and city out of a sentence as one line of JSON.

    python -m jaxlora.quickstart.dataset            # rewrites jaxlora/quickstart/data/*.jsonl

A strict output format is what a small adapter learns quickly and what an instruction-tuned base model
gets wrong: asked for JSON, SmolLM2-135M-Instruct wraps it in prose or code fences, renames keys or
quotes the age. The answer is exactly ``json.dumps({"name": ..., "age": ..., "city": ...})``, so
exact-match accuracy is a meaningful measure.

Records are chat records (``{"messages": [user, assistant]}``). The generator is seeded and pure
Python (`random.Random`), so the shipped files are reproducible byte for byte (a test checks it).
Held-out records share no sentence with the training records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxlora.atomic import atomic_write

DATA_DIR = Path(__file__).parent / "data"
TRAIN_FILE = DATA_DIR / "train.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
SEED = 20261128
TRAIN_SIZE = 3000
HELDOUT_SIZE = 200

FIRST = ("Maria", "James", "Aiko", "Liam", "Fatima", "Noah", "Elena", "Omar", "Sofia", "Lucas", "Priya",
         "Mateo", "Chloe", "Ivan", "Amara", "Jonas", "Leila", "Diego", "Hannah", "Kenji", "Zara", "Felix",
         "Nadia", "Hugo", "Ingrid", "Tariq", "Mei", "Pablo", "Greta", "Samuel", "Yusuf", "Clara", "Ravi",
         "Olga", "Tomas", "Ada", "Bruno", "Lena", "Kwame", "Rosa")
LAST = ("Lopez", "Smith", "Tanaka", "Murphy", "Haddad", "Kowalski", "Rossi", "Nguyen", "Schmidt", "Silva",
        "Patel", "Garcia", "Dubois", "Petrov", "Okafor", "Berg", "Moreau", "Costa", "Weber", "Sato",
        "Khan", "Novak", "Jensen", "Fischer", "Romero", "Ahmed", "Larsen", "Ortiz", "Meyer", "Chen")
CITIES = ("Lisbon", "Osaka", "Dublin", "Cairo", "Warsaw", "Florence", "Hanoi", "Munich", "Recife", "Pune",
          "Seville", "Lyon", "Kazan", "Lagos", "Bergen", "Nantes", "Porto", "Graz", "Sapporo", "Karachi",
          "Brno", "Aarhus", "Hamburg", "Valencia", "Tunis", "Oslo", "Quito", "Leipzig", "Chengdu", "Denver",
          "Toronto", "Perth", "Nairobi", "Krakow", "Malmo", "Bologna", "Austin", "Kyoto", "Seattle", "Lima")
SENTENCES = (
    "{name}, {age}, lives in {city}.",
    "{name} is {age} years old and lives in {city}.",
    "Last spring {name} ({age}) moved to {city}.",
    "In {city} you will find {name}, who turned {age} this year.",
    "Our new colleague {name} is {age} and commutes from {city}.",
    "{name} was born {age} years ago and now calls {city} home.",
    "At {age}, {name} opened a small bakery in {city}.",
    "The {age}-year-old {name} has lived in {city} for a decade.",
    "Meet {name}: {age} years old, based in {city}.",
    "{city} resident {name}, aged {age}, won the local chess cup.",
    "Yesterday {name}, {age}, gave a talk in {city}.",
    "{name} ({city}, {age}) signed up for the marathon.",
)
INSTRUCTIONS = (
    "Extract the person's name, age and city as JSON.",
    "Return the name, age and city from this text as JSON.",
    "Give me a JSON object with the name, age and city.",
)


def answer(name: str, age: int, city: str) -> str:
    """The one correct response: keys in this order, age an integer, json.dumps' default separators."""
    return json.dumps({"name": name, "age": age, "city": city})


def make_records(count: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """`count` chat records whose sentences are not in `exclude` (which is updated)."""
    records = []
    while len(records) < count:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        age, city = rng.randint(18, 89), rng.choice(CITIES)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        if sentence in exclude:
            continue
        exclude.add(sentence)
        prompt = f"{rng.choice(INSTRUCTIONS)}\n\n{sentence}"
        records.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": answer(name, age, city)}]})
    return records


def generate(seed: int = SEED, train_size: int = TRAIN_SIZE, heldout_size: int = HELDOUT_SIZE):
    """(train records, held-out records); the held-out ones are drawn first, then excluded from training."""
    rng, seen = random.Random(seed), set()
    heldout = make_records(heldout_size, rng, seen)
    train = make_records(train_size, rng, seen)
    return train, heldout


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def write(directory: Path = DATA_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    train, heldout = generate()
    for name, records in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        atomic_write(directory / name, to_jsonl(records))


if __name__ == "__main__":
    write()
    print(f"wrote {TRAIN_FILE} ({TRAIN_SIZE} records) and {HELDOUT_FILE} ({HELDOUT_SIZE} records)")
