"""Writes the built-in problem set (train.jsonl, eval.jsonl) in GSM8K format.

The problems are the project's own: grade-school arithmetic word problems from templates written
for rscaffold, with seeded numbers. Each answer ends in ``#### <final>`` like GSM8K. Re-running
this script reproduces the committed files exactly.

    python data/problems/make_problems.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonah",
    "Kemi",
    "Liam",
    "Maya",
    "Noor",
    "Omar",
    "Priya",
]


def t_buy_more(r: random.Random):
    n, a, b = r.choice(NAMES), r.randint(3, 20), r.randint(2, 15)
    q = f"{n} has {a} marbles and buys {b} more. How many marbles does {n} have now?"
    return q, f"{n} has {a} + {b} = {a + b} marbles.", a + b


def t_give_away(r: random.Random):
    n, a = r.choice(NAMES), r.randint(20, 60)
    b = r.randint(3, a - 5)
    q = f"{n} baked {a} cookies and gave {b} of them to friends. How many cookies are left?"
    return q, f"{a} - {b} = {a - b} cookies are left.", a - b


def t_packs(r: random.Random):
    n, p, k = r.choice(NAMES), r.randint(3, 9), r.randint(4, 12)
    q = f"{n} buys {p} packs of pencils. Each pack holds {k} pencils. How many pencils does {n} buy?"
    return q, f"{p} * {k} = {p * k} pencils.", p * k


def t_share(r: random.Random):
    k, each = r.randint(2, 8), r.randint(3, 12)
    total = k * each
    q = f"A teacher shares {total} stickers equally among {k} students. How many stickers does each student get?"
    return q, f"{total} / {k} = {each} stickers each.", each


def t_price(r: random.Random):
    n, c, price, paid = r.choice(NAMES), r.randint(2, 6), r.randint(2, 9), 0
    cost = c * price
    paid = cost + r.randint(1, 20)
    q = f"{n} buys {c} notebooks at ${price} each and pays with ${paid}. How much change does {n} get, in dollars?"
    return (
        q,
        f"The notebooks cost {c} * {price} = {cost} dollars. The change is {paid} - {cost} = {paid - cost} dollars.",
        paid - cost,
    )


def t_two_step(r: random.Random):
    _name, a, b, c = r.choice(NAMES), r.randint(10, 40), r.randint(5, 30), r.randint(2, 15)
    q = f"A shop had {a} apples. It received {b} more in the morning and sold {c} in the afternoon. How many apples does the shop have now?"
    return q, f"After the delivery it has {a} + {b} = {a + b}. After selling, {a + b} - {c} = {a + b - c}.", a + b - c


def t_weekly(r: random.Random):
    n, d, w = r.choice(NAMES), r.randint(2, 9), r.randint(2, 6)
    q = f"{n} reads {d} pages every day. How many pages does {n} read in {w} weeks?"
    return q, f"{w} weeks is {w} * 7 = {w * 7} days, so {d} * {w * 7} = {d * w * 7} pages.", d * w * 7


def t_age(r: random.Random):
    a, b = r.choice(NAMES), r.choice(NAMES)
    while b == a:
        b = r.choice(NAMES)
    x, d, y = r.randint(5, 15), r.randint(2, 10), r.randint(2, 10)
    q = f"{a} is {x} years old. {b} is {d} years older than {a}. How old will {b} be in {y} years?"
    return q, f"{b} is {x} + {d} = {x + d} now, and in {y} years will be {x + d} + {y} = {x + d + y}.", x + d + y


def t_rect(r: random.Random):
    w, h = r.randint(2, 15), r.randint(2, 15)
    q = f"A rectangular garden is {w} meters wide and {h} meters long. What is its perimeter in meters?"
    return q, f"The perimeter is 2 * ({w} + {h}) = {2 * (w + h)} meters.", 2 * (w + h)


def t_half(r: random.Random):
    n, a = r.choice(NAMES), 2 * r.randint(5, 30)
    b = r.randint(1, a // 2 - 1)
    q = f"{n} had {a} dollars, spent half of it on a book, then spent {b} dollars on lunch. How many dollars are left?"
    return q, f"Half of {a} is {a // 2}. Then {a // 2} - {b} = {a // 2 - b} dollars are left.", a // 2 - b


TEMPLATES = [t_buy_more, t_give_away, t_packs, t_share, t_price, t_two_step, t_weekly, t_age, t_rect, t_half]


def make(split: str, seed: int, per_template: int = 4) -> list[dict]:
    r = random.Random(seed)
    rows, seen = [], set()
    for _ in range(per_template):
        for t in TEMPLATES:
            q, sol, final = t(r)
            while q in seen:
                q, sol, final = t(r)
            seen.add(q)
            rows.append({"id": f"rs-{split}-{len(rows):03d}", "question": q, "answer": f"{sol}\n#### {final}"})
    return rows


def main() -> None:
    here = Path(__file__).parent
    train, evl = make("train", 1234), make("eval", 98765)
    train_qs = {r["question"] for r in train}
    evl = [r for r in evl if r["question"] not in train_qs]
    for name, rows in (("train", train), ("eval", evl)):
        with open(here / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} problems")


if __name__ == "__main__":
    main()
