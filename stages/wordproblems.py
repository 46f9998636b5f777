"""A generated stand-in for GSM8K: one- and two-step word problems from templates, with names, objects and
numbers drawn from a seed, written as rows (`question`, `answer` ending in `#### n`) the prompts stage reads.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from string import Formatter

import polars as pl

SCHEMA = {
    "split": pl.String,
    "question": pl.String,
    "answer": pl.String,
    "template": pl.String,
    "steps": pl.Int32,
    "values": pl.String,  # JSON object: every number of the problem (drawn and derived) but the answer
}

# (name, pronoun); the pronoun fills {he} {He} {him} {his} {His} {himself}
NAMES = (
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Lucas", "he"),
    ("Sofia", "she"), ("Ethan", "he"), ("Zoe", "she"), ("Omar", "he"), ("Priya", "she"), ("Mateo", "he"),
    ("Hana", "she"), ("Jamal", "he"), ("Chloe", "she"), ("Diego", "he"), ("Aisha", "she"), ("Ben", "he"),
    ("Grace", "she"), ("Kenji", "he"), ("Lily", "she"), ("Sam", "he"), ("Nora", "she"), ("Ravi", "he"),
    ("Elena", "she"), ("Tom", "he"), ("Maya", "she"), ("Leo", "he"), ("Fatima", "she"), ("Jack", "he"),
    ("Ines", "she"), ("Hugo", "he"), ("Rosa", "she"), ("Felix", "he"), ("Amara", "she"), ("Owen", "he"),
    ("Yuki", "she"), ("Carlos", "he"), ("Julia", "she"), ("Max", "he"),
)  # fmt: skip
PRONOUNS = {
    "he": {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His", "himself": "himself"},
    "she": {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her", "himself": "herself"},
}
# noun pools as (singular, plural); a template names a pool by its fields ({item}/{items}, ...)
NOUNS = {
    "item": (
        ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"), ("crayon", "crayons"),
        ("trading card", "trading cards"), ("seashell", "seashells"), ("stamp", "stamps"), ("button", "buttons"),
        ("bead", "beads"), ("balloon", "balloons"), ("toy car", "toy cars"), ("eraser", "erasers"),
    ),
    "fruit": (
        ("apple", "apples"), ("orange", "oranges"), ("lemon", "lemons"), ("peach", "peaches"),
        ("pear", "pears"), ("plum", "plums"), ("mango", "mangoes"),
    ),
    "food": (
        ("cookie", "cookies"), ("muffin", "muffins"), ("cupcake", "cupcakes"), ("brownie", "brownies"),
        ("bagel", "bagels"), ("pretzel", "pretzels"),
    ),
    "box": (("box", "boxes"), ("bag", "bags")),
}  # fmt: skip
NOUN_FIELDS = {"item": "items", "fruit": "fruits", "food": "foods", "box": "boxes"}


def span(lo: int, hi: int) -> range:
    """lo..hi, both included."""
    return range(lo, hi + 1)


@dataclass(frozen=True)
class Template:
    """One problem shape. `draw` holds the independent numbers (each uniform over its values); `derive`
    takes them as keywords and returns the derived ones, the answer `n` among them. Every drawn number
    shows in the question, so distinct draws are distinct questions (what `capacity` counts)."""

    id: str
    steps: int
    question: str
    solution: tuple[str, ...]  # lines of the worked solution; `#### n` is added after them
    draw: dict[str, Sequence[int]]
    derive: Callable[..., dict[str, int]]

    @cached_property
    def fields(self) -> frozenset[str]:
        texts = (self.question, *self.solution)
        return frozenset(field for text in texts for _, field, _, _ in Formatter().parse(text) if field)

    @cached_property
    def pools(self) -> tuple[str, ...]:
        return tuple(p for p, plural in NOUN_FIELDS.items() if {p, plural} & self.fields)

    @cached_property
    def capacity(self) -> int:
        """How many distinct questions the template can yield."""
        n = math.prod(len(values) for values in self.draw.values())
        n *= len(NAMES) if "name" in self.fields else 1
        n *= len(NAMES) - 1 if "friend" in self.fields else 1
        return n * math.prod(len(NOUNS[p]) for p in self.pools)


T = Template
TEMPLATES: tuple[Template, ...] = (
    # ---------------------------------------------------------------- one step
    T("add-gift", 1,
      "{name} has {a} {items}. {friend} gives {him} {b} more. How many {items} does {name} have now?",
      ("{name} has {a} + {b} = {n} {items} now.",),
      {"a": span(2, 50), "b": span(2, 50)}, lambda a, b: {"n": a + b}),
    T("add-days", 1,
      "{name} read {a} pages of a book on Monday and {b} pages on Tuesday. How many pages did {he} read in the two days?",
      ("{name} read {a} + {b} = {n} pages in the two days.",),
      {"a": span(2, 50), "b": span(2, 50)}, lambda a, b: {"n": a + b}),
    T("add-together", 1,
      "{name} picked {a} {fruits} and {friend} picked {b} {fruits}. How many {fruits} did they pick together?",
      ("Together they picked {a} + {b} = {n} {fruits}.",),
      {"a": span(2, 50), "b": span(2, 50)}, lambda a, b: {"n": a + b}),
    T("add-spend", 1,
      "{name} spent ${a} on a shirt and ${b} on a pair of shoes. How much money did {he} spend in all?",
      ("{name} spent {a} + {b} = ${n} in all.",),
      {"a": span(2, 50), "b": span(2, 50)}, lambda a, b: {"n": a + b}),
    T("sub-give", 1,
      "{name} had {a} {items}. {He} gave {b} of them to {friend}. How many {items} does {name} have left?",
      ("{name} has {a} - {b} = {n} {items} left.",),
      {"b": span(2, 30), "n": span(2, 30)}, lambda b, n: {"a": b + n, "n": n}),
    T("sub-eat", 1,
      "There were {a} {foods} on a plate. {name} and {his} friends ate {b} of them. "
      "How many {foods} are left on the plate?",
      ("There are {a} - {b} = {n} {foods} left on the plate.",),
      {"b": span(2, 30), "n": span(2, 30)}, lambda b, n: {"a": b + n, "n": n}),
    T("sub-compare", 1,
      "{name} has {a} {items} and {friend} has {b} {items}. How many more {items} does {name} have than {friend}?",
      ("{name} has {a} - {b} = {n} more {items} than {friend}.",),
      {"b": span(2, 40), "n": span(2, 30)}, lambda b, n: {"a": b + n, "n": n}),
    T("sub-money", 1,
      "{name} had ${a}. {He} spent ${b} on a board game. How much money does {he} have left?",
      ("{name} has {a} - {b} = ${n} left.",),
      {"b": span(5, 40), "n": span(2, 30)}, lambda b, n: {"a": b + n, "n": n}),
    T("mul-boxes", 1,
      "{name} has {a} {boxes} of {items}. Each {box} holds {b} {items}. How many {items} does {name} have in all?",
      ("{name} has {a} * {b} = {n} {items} in all.",),
      {"a": span(2, 12), "b": span(2, 25)}, lambda a, b: {"n": a * b}),
    T("mul-rows", 1,
      "{name} sets up {a} rows of chairs for a school play, with {b} chairs in each row. "
      "How many chairs does {he} set up?",
      ("{name} sets up {a} * {b} = {n} chairs.",),
      {"a": span(2, 20), "b": span(2, 25)}, lambda a, b: {"n": a * b}),
    T("mul-save", 1,
      "{name} saves ${a} every week. How much money does {he} save in {b} weeks?",
      ("{name} saves {a} * {b} = ${n} in {b} weeks.",),
      {"a": span(2, 25), "b": span(2, 20)}, lambda a, b: {"n": a * b}),
    T("mul-buy", 1,
      "{name} buys {a} {fruits} that cost ${b} each. How much does {he} spend?",
      ("{name} spends {a} * {b} = ${n}.",),
      {"a": span(2, 15), "b": span(2, 12)}, lambda a, b: {"n": a * b}),
    T("div-share", 1,
      "{name} has {a} {items} and shares them equally among {b} friends. How many {items} does each friend get?",
      ("Each friend gets {a} / {b} = {n} {items}.",),
      {"b": span(2, 10), "n": span(2, 20)}, lambda b, n: {"a": b * n, "n": n}),
    T("div-pack", 1,
      "{name} baked {a} {foods} and packs them into {boxes} of {b}. How many {boxes} does {he} fill?",
      ("{name} fills {a} / {b} = {n} {boxes}.",),
      {"b": span(2, 12), "n": span(2, 20)}, lambda b, n: {"a": b * n, "n": n}),
    T("div-teams", 1,
      "{name} coaches {a} children and puts them into teams of {b}. How many teams does {he} make?",
      ("{name} makes {a} / {b} = {n} teams.",),
      {"b": span(2, 8), "n": span(2, 10)}, lambda b, n: {"a": b * n, "n": n}),
    T("rate-drive", 1,
      "{name} drives at {a} miles per hour for {b} hours. How many miles does {he} drive?",
      ("{name} drives {a} * {b} = {n} miles.",),
      {"a": span(10, 50), "b": span(2, 12)}, lambda a, b: {"n": a * b}),
    T("rate-machine", 1,
      "A machine fills {a} bottles every minute. How many bottles does it fill in {b} minutes?",
      ("It fills {a} * {b} = {n} bottles.",),
      {"a": span(2, 40), "b": span(2, 20)}, lambda a, b: {"n": a * b}),
    T("rate-type", 1,
      "{name} types {a} words per minute. How many minutes does it take {him} to type {t} words?",
      ("It takes {him} {t} / {a} = {n} minutes.",),
      {"a": span(10, 50), "n": span(2, 15)}, lambda a, n: {"t": a * n, "n": n}),
    T("money-change", 1,
      "{name} buys a book that costs ${a} and pays with a ${bill} bill. How much change does {he} get?",
      ("{name} gets {bill} - {a} = ${n} in change.",),
      {"bill": (20, 50, 100), "n": span(2, 18)}, lambda bill, n: {"a": bill - n, "n": n}),
    T("age-older", 1,
      "{name} is {a} years old. {His} mother is {b} years older. How old is {his} mother?",
      ("{His} mother is {a} + {b} = {n} years old.",),
      {"a": span(2, 15), "b": span(20, 40)}, lambda a, b: {"n": a + b}),
    T("age-future", 1,
      "{name} is {a} years old. How old will {he} be in {b} years?",
      ("In {b} years {name} will be {a} + {b} = {n} years old.",),
      {"a": span(2, 40), "b": span(2, 30)}, lambda a, b: {"n": a + b}),
    T("age-past", 1,
      "{name} is {a} years old now. How old was {he} {b} years ago?",
      ("{name} was {a} - {b} = {n} years old {b} years ago.",),
      {"b": span(2, 20), "n": span(2, 30)}, lambda b, n: {"a": b + n, "n": n}),
    # ---------------------------------------------------------------- two steps
    T("buy-give", 2,
      "{name} had {s} {items}. {He} bought {b} more and then gave {c} to {friend}. "
      "How many {items} does {name} have now?",
      ("After buying more, {name} had {s} + {b} = {t} {items}.",
       "After giving {c} to {friend}, {he} has {t} - {c} = {n} {items}."),
      {"a": span(2, 40), "b": span(2, 30), "c": span(2, 30)},
      lambda a, b, c: {"s": a + c, "t": a + b + c, "n": a + b}),
    T("boxes-plus", 2,
      "{name} buys {a} {boxes} of {items} with {b} {items} in each {box}. {He} already had {c} {items}. "
      "How many {items} does {he} have now?",
      ("The {boxes} hold {a} * {b} = {t} {items}.", "{name} now has {t} + {c} = {n} {items}."),
      {"a": span(2, 10), "b": span(2, 12), "c": span(2, 50)}, lambda a, b, c: {"t": a * b, "n": a * b + c}),
    T("buy-change", 2,
      "{name} buys {a} {fruits} at ${b} each and pays with a ${bill} bill. How much change does {he} get?",
      ("The {fruits} cost {a} * {b} = ${t}.", "{name} gets {bill} - {t} = ${n} in change."),
      {"a": span(2, 6), "b": span(2, 8), "bill": (50, 100)},
      lambda a, b, bill: {"t": a * b, "n": bill - a * b}),
    T("notebooks-backpack", 2,
      "{name} buys {a} notebooks at ${b} each and a backpack for ${c}. How much does {he} spend in all?",
      ("The notebooks cost {a} * {b} = ${t}.", "{name} spends {t} + {c} = ${n} in all."),
      {"a": span(2, 8), "b": span(2, 9), "c": span(10, 50)}, lambda a, b, c: {"t": a * b, "n": a * b + c}),
    T("age-sum", 2,
      "{name} is {a} years old. {friend} is {b} years older than {name}. What is the sum of their ages?",
      ("{friend} is {a} + {b} = {t} years old.", "The sum of their ages is {a} + {t} = {n}."),
      {"a": span(2, 30), "b": span(2, 20)}, lambda a, b: {"t": a + b, "n": 2 * a + b}),
    T("age-times-future", 2,
      "{name} is {a} years old. {His} father is {b} times as old as {he} is. "
      "How old will {his} father be in {c} years?",
      ("{His} father is {a} * {b} = {t} years old.", "In {c} years he will be {t} + {c} = {n} years old."),
      {"a": span(8, 15), "b": (3, 4), "c": span(2, 20)}, lambda a, b, c: {"t": a * b, "n": a * b + c}),
    T("drive-more", 2,
      "{name} drives at {a} miles per hour for {b} hours and then drives {c} more miles. "
      "How many miles does {he} drive in all?",
      ("{name} drives {a} * {b} = {t} miles in {b} hours.", "In all {he} drives {t} + {c} = {n} miles."),
      {"a": span(10, 50), "b": span(2, 8), "c": span(2, 50)}, lambda a, b, c: {"t": a * b, "n": a * b + c}),
    T("share-had", 2,
      "{name} shares {a} {items} equally among {b} friends. One of the friends already had {c} {items}. "
      "How many {items} does that friend have now?",
      ("Each friend gets {a} / {b} = {e} {items}.", "That friend now has {e} + {c} = {n} {items}."),
      {"b": span(2, 8), "e": span(2, 15), "c": span(2, 30)}, lambda b, e, c: {"a": b * e, "n": e + c}),
    T("unit-price", 2,
      "At a shop, {b} {boxes} of {items} cost ${t}. How much do {c} {boxes} of {items} cost?",
      ("One {box} costs {t} / {b} = ${u}.", "So {c} {boxes} cost {c} * {u} = ${n}."),
      {"b": span(2, 6), "u": span(2, 15), "c": span(7, 12)}, lambda b, u, c: {"t": b * u, "n": c * u}),
    T("keep-share", 2,
      "{name} has {a} {items}. {He} keeps {c} of them for {himself} and shares the rest equally among {b} "
      "friends. How many {items} does each friend get?",
      ("{name} shares {a} - {c} = {r} {items}.", "Each friend gets {r} / {b} = {n} {items}."),
      {"c": span(2, 20), "b": span(2, 8), "n": span(2, 15)},
      lambda c, b, n: {"a": c + b * n, "r": b * n, "n": n}),
    T("save-gift", 2,
      "{name} saves ${a} a week for {b} weeks. Then {he} gets ${c} for {his} birthday. "
      "How much money does {he} have now?",
      ("{name} saves {a} * {b} = ${t}.", "With the birthday money {he} has {t} + {c} = ${n}."),
      {"a": span(2, 20), "b": span(2, 10), "c": span(5, 50)}, lambda a, b, c: {"t": a * b, "n": a * b + c}),
    T("bus-stops", 2,
      "A bus has {a} passengers. At the first stop {b} passengers get off, and at the second stop {c} more "
      "get off. How many passengers are still on the bus?",
      ("After the first stop there are {a} - {b} = {t} passengers.",
       "After the second stop there are {t} - {c} = {n} passengers."),
      {"b": span(2, 20), "c": span(2, 20), "n": span(2, 20)},
      lambda b, c, n: {"a": b + c + n, "t": c + n, "n": n}),
    T("colors-times", 2,
      "{name} has {a} red {items} and {b} blue {items}. {friend} has {c} times as many {items} as {name}. "
      "How many {items} does {friend} have?",
      ("{name} has {a} + {b} = {t} {items}.", "{friend} has {c} * {t} = {n} {items}."),
      {"a": span(2, 25), "b": span(2, 25), "c": span(2, 5)}, lambda a, b, c: {"t": a + b, "n": c * (a + b)}),
    T("bracelets", 2,
      "{name} makes {a} bracelets a day and {friend} makes {b} bracelets a day. "
      "How many bracelets do they make together in {c} days?",
      ("Together they make {a} + {b} = {t} bracelets a day.", "In {c} days they make {t} * {c} = {n} bracelets."),
      {"a": span(2, 15), "b": span(2, 15), "c": span(2, 10)}, lambda a, b, c: {"t": a + b, "n": (a + b) * c}),
    T("fence", 2,
      "A rectangular garden is {a} meters long and {b} meters wide. "
      "How many meters of fence does {name} need to go all the way around it?",
      ("Half of the way around is {a} + {b} = {t} meters.", "All the way around is 2 * {t} = {n} meters."),
      {"a": span(2, 50), "b": span(2, 50)}, lambda a, b: {"t": a + b, "n": 2 * (a + b)}),
    T("split-bill", 2,
      "A group of {a} friends shares a meal. The food costs ${f} and the drinks cost ${d}. "
      "If they split the bill equally, how much does each friend pay?",
      ("The bill is {f} + {d} = ${t}.", "Each friend pays {t} / {a} = ${n}."),
      {"a": span(2, 6), "n": span(5, 25), "d": span(2, 8)},
      lambda a, n, d: {"t": a * n, "f": a * n - d, "n": n}),
    T("age-when", 2,
      "{name} is {a} years old and {friend} is {b} years old. How old will {friend} be when {name} is {c}?",
      ("{name} will be {c} in {c} - {a} = {k} years.", "Then {friend} will be {b} + {k} = {n} years old."),
      {"a": span(2, 20), "k": span(2, 20), "b": span(2, 40)}, lambda a, k, b: {"c": a + k, "n": b + k}),
    T("plates-eat", 2,
      "{name} bakes {a} {foods} and puts the same number on each of {b} plates. {friend} eats {c} {foods} "
      "from one plate. How many {foods} are left on that plate?",
      ("Each plate has {a} / {b} = {e} {foods}.", "That plate has {e} - {c} = {n} {foods} left."),
      {"b": span(2, 8), "c": span(2, 10), "n": span(2, 15)},
      lambda b, c, n: {"e": c + n, "a": b * (c + n), "n": n}),
    T("windows", 2,
      "A building has {a} floors. Each floor has {b} rooms, and each room has {c} windows. "
      "How many windows does the building have?",
      ("The building has {a} * {b} = {t} rooms.", "It has {t} * {c} = {n} windows."),
      {"a": span(2, 10), "b": span(2, 10), "c": span(2, 8)}, lambda a, b, c: {"t": a * b, "n": a * b * c}),
)  # fmt: skip


def word_problems(n_train: int, n_test: int, seed: int) -> pl.DataFrame:
    """n_train + n_test distinct problems (columns of SCHEMA), train rows first; deterministic in `seed`.

    The test set is drawn first and every later draw of a question already drawn is rejected, so the
    splits are disjoint and no question repeats within a split.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"word problems: train and test need at least 1 problem each (got {n_train} and {n_test})")
    wanted, room = n_train + n_test, sum(t.capacity for t in TEMPLATES)
    if wanted > room:
        raise ValueError(
            f"word problems: {wanted} distinct problems asked for, but the templates ({len(TEMPLATES)}) yield "
            f"at most {room}; ask for fewer train/test problems"
        )
    rng = random.Random(seed)
    seen: set[str] = set()
    test = _draw_distinct(rng, n_test, "test", seen)
    train = _draw_distinct(rng, n_train, "train", seen)
    return pl.DataFrame(train + test, schema=SCHEMA, orient="row")


def _draw_distinct(rng: random.Random, n: int, split: str, seen: set[str]) -> list[tuple]:
    rows: list[tuple] = []
    for _ in range(100 * n + 10_000):  # a bound in case near-capacity requests make rejection crawl
        if len(rows) == n:
            return rows
        template = rng.choice(TEMPLATES)
        question, answer, values = render(template, rng)
        if question not in seen:
            seen.add(question)
            rows.append((split, question, answer, template.id, template.steps, json.dumps(values)))
    if len(rows) == n:
        return rows
    raise ValueError(f"word problems: found only {len(seen)} distinct problems; ask for fewer train/test problems")


def render(template: Template, rng: random.Random) -> tuple[str, str, dict[str, int]]:
    """One draw of `template`: (question, worked answer ending in '#### n', its numbers but n)."""
    words = _draw_words(template, rng)
    drawn = {key: rng.choice(values) for key, values in template.draw.items()}
    numbers = {**drawn, **template.derive(**drawn)}
    fill = {**words, **numbers}
    question = template.question.format(**fill)
    answer = "\n".join(line.format(**fill) for line in template.solution) + f"\n#### {numbers['n']}"
    return question, answer, {k: v for k, v in numbers.items() if k != "n"}


def _draw_words(template: Template, rng: random.Random) -> dict[str, str]:
    words: dict[str, str] = {}
    if "name" in template.fields:
        name, pronoun = rng.choice(NAMES)
        words |= {"name": name, **PRONOUNS[pronoun]}
        if "friend" in template.fields:
            words["friend"] = rng.choice([other for other, _ in NAMES if other != name])
    for pool in template.pools:
        words[pool], words[NOUN_FIELDS[pool]] = rng.choice(NOUNS[pool])
    return words
