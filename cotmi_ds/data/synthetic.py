"""The embedded chain-of-thought dataset: arithmetic word problems, SVAMP-style.

Each example has an input (the problem), a label (the equation, e.g. ``( 12 + 7 )``, in SVAMP's
format) and a rationale (a teacher-style explanation of the steps). The operation is implied by the
wording and the numbers must be copied from the problem, so the label cannot be guessed: the most
common label covers well under 1% of the test set. Everything is a pure function of the seed.
"""
from __future__ import annotations

import random

NAMES = ["Tom", "Anna", "Ben", "Maria", "Leo", "Sara", "Omar", "Mia", "Ravi", "Lena", "Jack",
         "Nora", "Ivan", "Zoe", "Hugo", "Emma"]
OBJECTS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "coins",
           "cards", "balloons", "eggs", "stamps"]


def _one_step(rng: random.Random) -> tuple[str, str, str]:
    n, n2 = rng.sample(NAMES, 2)
    o = rng.choice(OBJECTS)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        x = rng.choice([
            f"{n} has {a} {o}. {n} buys {b} more {o}. How many {o} does {n} have now?",
            f"{n} picked {a} {o} in the morning and {b} {o} in the afternoon. "
            f"How many {o} did {n} pick in all?",
            f"There are {a} {o} in a box. {n} puts {b} more {o} in the box. "
            f"How many {o} are in the box now?",
        ])
        r = f"{n} starts with {a} {o} and gets {b} more, so we add: {a} + {b} = {a + b}."
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        x = rng.choice([
            f"{n} had {a} {o}. {n} gave {b} {o} to {n2}. How many {o} does {n} have left?",
            f"A shop had {a} {o}. It sold {b} of them. How many {o} are left?",
            f"{n} has {a} {o} and {n2} has {b} {o}. How many more {o} does {n} have than {n2}?",
        ])
        r = f"We take {b} away from {a}, so we subtract: {a} - {b} = {a - b}."
    elif op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        x = rng.choice([
            f"{n} has {a} bags with {b} {o} in each bag. How many {o} does {n} have?",
            f"Each of the {a} shelves holds {b} {o}. How many {o} are on the shelves?",
        ])
        r = f"There are {a} groups of {b} {o}, so we multiply: {a} * {b} = {a * b}."
    else:
        b, q = rng.randint(2, 12), rng.randint(2, 12)
        a = b * q
        x = rng.choice([
            f"{n} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
            f"{a} {o} are packed into bags of {b}. How many bags are filled?",
        ])
        r = f"{a} {o} are split into groups of {b}, so we divide: {a} / {b} = {q}."
    return x, f"( {a} {op} {b} )", r


def _two_step(rng: random.Random) -> tuple[str, str, str]:
    n, n2 = rng.sample(NAMES, 2)
    o = rng.choice(OBJECTS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        c = rng.randint(1, a + b - 1)
        x = (f"{n} has {a} {o}. {n} buys {b} more and then gives {c} to {n2}. "
             f"How many {o} does {n} have now?")
        r = f"First {a} + {b} = {a + b}. Then {n} gives away {c}: {a + b} - {c} = {a + b - c}."
        return x, f"( ( {a} + {b} ) - {c} )", r
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 50)
    x = (f"{n} buys {a} packs of {b} {o} and already had {c} {o}. "
         f"How many {o} does {n} have in total?")
    r = f"The packs hold {a} * {b} = {a * b}. Adding the {c} {n} had: {a * b} + {c} = {a * b + c}."
    return x, f"( ( {a} * {b} ) + {c} )", r


def make_example(rng: random.Random) -> dict[str, str]:
    x, y, r = _two_step(rng) if rng.random() < 0.25 else _one_step(rng)
    return {"input": x, "label": y, "rationale": r}


def synthetic_splits(train_size: int, eval_size: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """Disjoint train/valid/test splits. valid and test depend only on (eval_size, seed)."""
    rng = random.Random(f"cotmi-synthetic-{seed}")
    seen: set[str] = set()

    def draw(n: int) -> list[dict[str, str]]:
        out = []
        while len(out) < n:
            ex = make_example(rng)
            if ex["input"] not in seen:
                seen.add(ex["input"])
                out.append(ex)
        return out

    test = draw(eval_size)
    valid = draw(eval_size)
    return {"train": draw(train_size), "valid": valid, "test": test}
