"""The prompts stage: the arithmetic generator, data files in GSM8K / MATH form, round draws, templating."""

from __future__ import annotations

import json
import re

import datasets
import polars as pl
import pytest

from stages.config import PromptsConfig
from stages.prompts import (
    PromptDataError,
    boxed_gold,
    builtin_prompts,
    gsm8k_gold,
    read_prompts,
    render_prompts,
    sample_round_prompts,
)
from storage.schemas import SCHEMAS

SMALL = PromptsConfig(n_train=400, n_test=50, per_round=32)


def expected_schema(table: str) -> pl.Schema:
    return pl.from_arrow(SCHEMAS[table].empty_table()).drop("stage_key").schema


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# ---------------------------------------------------------------- builtin


def test_builtin_schema_and_sizes():
    frame = builtin_prompts(SMALL, seed=0)
    assert frame.schema == expected_schema("prompts")
    assert frame.filter(pl.col("split") == "train").height == 400
    assert frame.filter(pl.col("split") == "test").height == 50
    assert frame["prompt_id"].n_unique() == frame.height
    assert set(frame["dataset"]) == {"builtin-arith"}


def test_builtin_deterministic_per_seed():
    assert builtin_prompts(SMALL, seed=3).equals(builtin_prompts(SMALL, seed=3))
    assert not builtin_prompts(SMALL, seed=3).equals(builtin_prompts(SMALL, seed=4))


def test_builtin_test_is_distinct_and_disjoint_from_train():
    frame = builtin_prompts(PromptsConfig(n_train=3000, n_test=300), seed=1)
    test = frame.filter(pl.col("split") == "test")["prompt"]
    train = frame.filter(pl.col("split") == "train")["prompt"]
    assert test.n_unique() == test.len()
    assert not set(test) & set(train)


def test_builtin_answers_and_operand_ranges():
    frame = builtin_prompts(PromptsConfig(n_train=2000, n_test=100, max_operand=50, max_operand_mul=7), seed=2)
    ops = set()
    for question, answer, meta in frame.select("prompt", "answer", "meta").iter_rows():
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=\?", question).groups()
        a, b = int(a), int(b)
        assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert json.loads(meta) == {"op": op, "a": a, "b": b}
        assert 0 <= a <= 50 and 0 <= b <= (7 if op == "*" else 50)
        ops.add(op)
    assert ops == {"+", "-", "*"}


def test_builtin_ops_subset_and_template():
    frame = builtin_prompts(PromptsConfig(n_train=50, n_test=10, ops=["+"]), seed=0)
    assert all("+" in q for q in frame["prompt"])
    text = render_prompts(frame.head(1), None, "Q: {question} A:", use_chat_template=True)["text"][0]
    assert re.fullmatch(r"Q: \d+\+\d+=\? A:", text)


# ---------------------------------------------------------------- data files

GSM8K = {
    "train": [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "A car costs 1,200 and a bike 300. Total?", "answer": "1200+300=1500\n#### 1,500"},
        {"question": "Ann is 5. Bob is 2 years younger. Bob?", "answer": "5-2=3 #### 3"},
    ],
    "test": [
        {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"},
        {"question": "What is 10 minus 12?", "answer": "#### -2"},
        {"question": "What is 1 plus 1?", "answer": "#### 2"},
    ],
}

MATH = [
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Find $x$.", "solution": "First \\boxed{3}, no wait: $x = \\boxed{\\{1, \\sqrt{2}\\}}$", "level": "x"},
    {"problem": "Compute $2^{10}$.", "solution": "$2^{10} = \\boxed{1024}$", "level": "Level 2"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_gsm8k_jsonl_with_split_placeholder(tmp_path):
    for split, rows in GSM8K.items():
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    frame = read_prompts(PromptsConfig(source=str(tmp_path / "{split}.jsonl"), n_test=2), seed=0).frame
    assert frame.schema == expected_schema("prompts")
    train = frame.filter(pl.col("split") == "train")
    assert train["answer"].to_list() == ["7", "1500", "3"]
    assert train["prompt_id"].to_list() == ["train-0", "train-1", "train-2"]
    assert frame.filter(pl.col("split") == "test")["answer"].to_list() == ["42", "-2"]  # n_test caps
    assert json.loads(train["meta"][1])["answer"].endswith("#### 1,500")


def test_math_parquet_with_split_column_and_nested_braces(tmp_path):
    rows = [{**r, "split": s} for s in ("train", "test") for r in MATH]
    pl.DataFrame(rows).write_parquet(tmp_path / "math.parquet")
    frame = read_prompts(PromptsConfig(source=str(tmp_path / "math.parquet")), seed=0).frame
    assert frame.filter(pl.col("split") == "test")["answer"].to_list() == [
        "\\frac{1}{2}",
        "\\{1, \\sqrt{2}\\}",
        "1024",
    ]
    assert set(frame["dataset"]) == {"math"}
    assert frame["prompt"][2] == "Compute $2^{10}$."


def test_folder_of_split_files_and_field_override(tmp_path):
    for split, rows in GSM8K.items():
        write_jsonl(tmp_path / f"{split}.jsonl", [{"q": r["question"], "gold": r["answer"]} for r in rows])
    config = PromptsConfig(source=str(tmp_path), format="gsm8k", question_field="q", answer_field="gold")
    frame = read_prompts(config, seed=0).frame
    assert frame.height == 6 and frame["answer"][0] == "7"


def test_gold_extractors():
    assert gsm8k_gold("blah\n#### 1,234") == "1234"
    assert gsm8k_gold("no marker 12") is None
    assert boxed_gold("a \\boxed{1} b \\boxed{x^{2}+1}") == "x^{2}+1"
    assert boxed_gold("\\boxed{unclosed {") is None
    assert boxed_gold("\\fbox{7}") == "7"
    assert boxed_gold("nothing") is None


def _bad_gsm8k(tmp_path):
    train = [*GSM8K["train"], {"question": "No gold here", "answer": "it is 5"}, {"question": "  ", "answer": "#### 1"}]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", [*GSM8K["test"], {"question": "Missing answer"}])
    return str(tmp_path / "{split}.jsonl")


def test_bad_row_names_row_and_field(tmp_path):
    with pytest.raises(PromptDataError, match=r"row 3: field 'answer'.*skip_bad_rows"):
        read_prompts(PromptsConfig(source=_bad_gsm8k(tmp_path)), seed=0)


def test_skip_bad_rows_counts(tmp_path):
    read = read_prompts(PromptsConfig(source=_bad_gsm8k(tmp_path), skip_bad_rows=True), seed=0)
    assert read.skipped == 3  # unextractable gold, empty question, missing answer
    assert read.frame.filter(pl.col("split") == "train").height == 3
    assert read.frame.filter(pl.col("split") == "test").height == 3


def test_unrecognised_columns_and_missing_source(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"input": "x", "output": "y"}])
    write_jsonl(tmp_path / "test.jsonl", [{"input": "x", "output": "y"}])
    with pytest.raises(PromptDataError, match="question_field"):
        read_prompts(PromptsConfig(source=str(tmp_path / "{split}.jsonl")), seed=0)
    with pytest.raises(PromptDataError, match="does not exist"):
        read_prompts(PromptsConfig(source=str(tmp_path / "nope.jsonl")), seed=0)
    with pytest.raises(PromptDataError, match="could not load 'nobody-here/no-such-data'"):
        read_prompts(PromptsConfig(source="nobody-here/no-such-data"), seed=0)  # tests run offline


# ---------------------------------------------------------------- rounds and templates


def test_round_draw_deterministic_without_replacement():
    prompts = builtin_prompts(SMALL, seed=0)
    first = sample_round_prompts(prompts, SMALL.per_round, round=1, seed=0)
    assert first.height == 32 and first["prompt_id"].n_unique() == 32
    assert set(first["split"]) == {"train"}
    assert first.equals(sample_round_prompts(prompts, SMALL.per_round, round=1, seed=0))
    assert not first.equals(sample_round_prompts(prompts, SMALL.per_round, round=2, seed=0))
    assert not first.equals(sample_round_prompts(prompts, SMALL.per_round, round=1, seed=1))
    # storage may hand the rows back in any order
    assert first.equals(sample_round_prompts(prompts.reverse(), SMALL.per_round, round=1, seed=0))


def test_chat_template_used_when_present():
    class ChatTokenizer:
        chat_template = "{{ messages[0]['content'] }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}<assistant>"

    frame = pl.DataFrame({"prompt": ["1+1=?"]})
    assert render_prompts(frame, ChatTokenizer(), "Q: {question} A:", True)["text"][0] == "<user>1+1=?<assistant>"
    plain = render_prompts(frame, ChatTokenizer(), "{question}\n", use_chat_template=False)
    assert plain["text"][0] == "1+1=?\n"
