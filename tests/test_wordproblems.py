"""The word-problem generator (`stages/wordproblems.py`) and `asymre data word-problems`: determinism, disjoint
splits, answers recomputed from each question's numbers by a twin table of formulas, worked solutions whose
equations hold, grammar (plurals, pronouns), capacity errors, and a written file read by the prompts stage."""

from __future__ import annotations

import itertools
import json
import re

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from stages import wordproblems
from stages.config import PromptsConfig
from stages.prompts import gsm8k_gold, read_prompts
from stages.wordproblems import NAMES, NOUN_FIELDS, NOUNS, PRONOUNS, TEMPLATES, Template, span, word_problems

CLI = CliRunner()

# The naive twin: each template's answer from the numbers its question shows, written independently.
TWIN = {
    "add-gift": ("a b", lambda a, b: a + b),
    "add-days": ("a b", lambda a, b: a + b),
    "add-together": ("a b", lambda a, b: a + b),
    "add-spend": ("a b", lambda a, b: a + b),
    "sub-give": ("a b", lambda a, b: a - b),
    "sub-eat": ("a b", lambda a, b: a - b),
    "sub-compare": ("a b", lambda a, b: a - b),
    "sub-money": ("a b", lambda a, b: a - b),
    "mul-boxes": ("a b", lambda a, b: a * b),
    "mul-rows": ("a b", lambda a, b: a * b),
    "mul-save": ("a b", lambda a, b: a * b),
    "mul-buy": ("a b", lambda a, b: a * b),
    "div-share": ("a b", lambda a, b: a // b),
    "div-pack": ("a b", lambda a, b: a // b),
    "div-teams": ("a b", lambda a, b: a // b),
    "rate-drive": ("a b", lambda a, b: a * b),
    "rate-machine": ("a b", lambda a, b: a * b),
    "rate-type": ("a t", lambda a, t: t // a),
    "money-change": ("a bill", lambda a, bill: bill - a),
    "age-older": ("a b", lambda a, b: a + b),
    "age-future": ("a b", lambda a, b: a + b),
    "age-past": ("a b", lambda a, b: a - b),
    "buy-give": ("s b c", lambda s, b, c: s + b - c),
    "boxes-plus": ("a b c", lambda a, b, c: a * b + c),
    "buy-change": ("a b bill", lambda a, b, bill: bill - a * b),
    "notebooks-backpack": ("a b c", lambda a, b, c: a * b + c),
    "age-sum": ("a b", lambda a, b: a + (a + b)),
    "age-times-future": ("a b c", lambda a, b, c: a * b + c),
    "drive-more": ("a b c", lambda a, b, c: a * b + c),
    "share-had": ("a b c", lambda a, b, c: a // b + c),
    "unit-price": ("b t c", lambda b, t, c: t // b * c),
    "keep-share": ("a c b", lambda a, c, b: (a - c) // b),
    "save-gift": ("a b c", lambda a, b, c: a * b + c),
    "bus-stops": ("a b c", lambda a, b, c: a - b - c),
    "colors-times": ("a b c", lambda a, b, c: (a + b) * c),
    "bracelets": ("a b c", lambda a, b, c: (a + b) * c),
    "fence": ("a b", lambda a, b: 2 * a + 2 * b),
    "split-bill": ("a f d", lambda a, f, d: (f + d) // a),
    "age-when": ("a b c", lambda a, b, c: b + (c - a)),
    "plates-eat": ("a b c", lambda a, b, c: a // b - c),
    "windows": ("a b c", lambda a, b, c: a * b * c),
}
EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x / y}


@pytest.fixture(scope="module")
def problems() -> pl.DataFrame:
    return word_problems(2000, 500, seed=0)


def final(answer: str) -> int:
    return int(answer.rsplit("#### ", 1)[1])


def test_same_seed_same_rows_other_seed_other_rows():
    first = word_problems(300, 50, seed=7)
    assert first.equals(word_problems(300, 50, seed=7))
    other = word_problems(300, 50, seed=8)
    assert len(set(first["question"]) & set(other["question"])) < 10  # a few short ones may coincide


def test_splits_are_disjoint_and_no_question_repeats(problems):
    assert problems.schema == pl.Schema(wordproblems.SCHEMA)
    assert problems["split"].to_list() == ["train"] * 2000 + ["test"] * 500
    assert problems["question"].n_unique() == 2500
    train = set(problems.filter(pl.col("split") == "train")["question"])
    assert not train & set(problems.filter(pl.col("split") == "test")["question"])


def test_every_answer_equals_the_twin_formula_on_the_questions_numbers(problems):
    assert set(TWIN) == {t.id for t in TEMPLATES}  # a new template needs its twin here
    for row in problems.iter_rows(named=True):
        names, formula = TWIN[row["template"]]
        values = json.loads(row["values"])
        inputs = [values[name] for name in names.split()]
        shown = [int(x) for x in re.findall(r"\d+", row["question"])]
        assert all(x in shown for x in inputs), row
        assert final(row["answer"]) == formula(*inputs), row
        assert 0 <= final(row["answer"]) <= 1000


def test_worked_solutions_hold_one_equation_per_step(problems):
    for row in problems.iter_rows(named=True):
        equations = EQUATION.findall(row["answer"])
        assert len(equations) == row["steps"], row
        for x, op, y, result in equations:
            assert OPS[op](int(x), int(y)) == int(result), row
        assert int(equations[-1][3]) == final(row["answer"])
        assert row["answer"].endswith(f"\n#### {final(row['answer'])}")


def test_templates_and_steps_are_all_used(problems):
    train = problems.filter(pl.col("split") == "train")
    assert train["template"].n_unique() >= 30
    assert set(train["steps"]) == {1, 2}
    assert len(TEMPLATES) >= 30 and len({t.id for t in TEMPLATES}) == len(TEMPLATES)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.id)
def test_numbers_stay_in_range_at_every_corner_of_the_draw(template: Template):
    """Derived numbers are sums and products of drawn ones (linear in each), so the corners bound them."""
    for corner in itertools.product(*({min(v), max(v)} for v in template.draw.values())):
        drawn = dict(zip(template.draw, corner))
        numbers = {**drawn, **template.derive(**drawn)}
        assert min(numbers.values()) >= 2, (template.id, numbers)  # every count is plural
        assert max(numbers.values()) <= 1000, (template.id, numbers)
        assert template.steps in (1, 2)


def test_templates_use_known_words_and_pronouns_only_with_a_name():
    words = {"name", "friend", *PRONOUNS["he"], *NOUN_FIELDS, *NOUN_FIELDS.values()}
    for t in TEMPLATES:
        numbers = set(t.draw) | set(t.derive(**{k: min(v) for k, v in t.draw.items()}))
        assert t.fields <= words | numbers, (t.id, t.fields - words - numbers)
        assert "name" in t.fields or not t.fields & {"friend", *PRONOUNS["he"]}, t.id
        assert t.question.endswith("?") and "{n}" not in t.question, t.id


def test_pronouns_agree_with_the_first_name_and_plurals_are_plural(problems):
    gender = dict(NAMES)
    other = {"he": {"she", "her", "herself"}, "she": {"he", "him", "his", "himself"}}
    plurals = {plural for pool in NOUNS.values() for _, plural in pool}
    singular = {s for pool in NOUNS.values() for s, _ in pool}
    for question in problems["question"]:
        words = re.findall(r"[A-Za-z]+", question)
        first = next((w for w in words if w in gender), None)
        if first is not None:
            assert not {w.lower() for w in words} & other[gender[first]], question
        for noun in re.findall(r"\b\d+ (?:red |blue )?([a-z]+(?: [a-z]+)?)", question):
            assert noun not in singular and noun.split()[0] not in singular, question
        assert "{" not in question and question[0].isupper()
    assert any(p in q for q in problems["question"] for p in plurals)


def test_asking_for_more_than_the_templates_yield_fails(monkeypatch):
    tiny = Template("tiny", 1, "What is {a} + {b}?", ("{a} + {b} = {n}",), {"a": span(2, 3), "b": span(2, 3)},
                    lambda a, b: {"n": a + b})  # fmt: skip
    monkeypatch.setattr(wordproblems, "TEMPLATES", (tiny,))
    with pytest.raises(ValueError, match=r"5 distinct problems asked for, but the templates \(1\) yield at most 4"):
        word_problems(3, 2, seed=0)
    assert sorted(word_problems(2, 2, seed=0)["question"]) == sorted(
        f"What is {a} + {b}?" for a in (2, 3) for b in (2, 3)
    )
    with pytest.raises(ValueError, match="at least 1 problem each"):
        word_problems(0, 2, seed=0)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_cli_writes_a_file_the_prompts_stage_reads_as_gsm8k(tmp_path, suffix):
    out = tmp_path / "data" / f"words{suffix}"
    result = CLI.invoke(
        app, ["data", "word-problems", "--out", str(out), "--train", "40", "--test", "10", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"word problems: 40 train, 10 test rows (seed 3) -> {out}\n"
    written = pl.read_parquet(out) if suffix == ".parquet" else pl.read_ndjson(out)
    assert written.equals(word_problems(40, 10, seed=3))
    frame = read_prompts(PromptsConfig(source=str(out), n_test=10), seed=0).frame
    for split in ("train", "test"):
        read = frame.filter(pl.col("split") == split)
        rows = written.filter(pl.col("split") == split)
        assert read["prompt"].to_list() == rows["question"].to_list()
        assert read["answer"].to_list() == [str(final(a)) for a in rows["answer"]]
        assert read["answer"].to_list() == [gsm8k_gold(a) for a in rows["answer"]]
    assert json.loads(frame["meta"][0])["template"] == written["template"][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train", "0"], "--train 0 --test 500: give at least 1 problem for each split"),
        (["--test", "-3"], "give at least 1 problem for each split"),
        (["--out", "{tmp}/words.csv"], "give a path ending in .parquet or .jsonl"),
        (["--out", "{tmp}/a-file/words.parquet"], "a-file is a file, not a folder"),
        (["--out", "{tmp}/folder.parquet"], "is a folder; give a file path in it"),
    ],
)
def test_cli_bad_arguments_give_one_line(tmp_path, args, message):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.parquet").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "words.parquet")]
    result = CLI.invoke(app, ["data", "word-problems", *out, *args])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder.parquet"]  # nothing written
