"""The prompts stage: the built-in arithmetic generator, data sets read with `datasets` (gold answers
extracted once, here), the per-round draw of training prompts, and templating for the policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from stages.config import PromptsConfig
from storage.schemas import polars_schema

log = logging.getLogger(__name__)

BUILTIN_DATASET = "builtin-arith"

PROMPTS_SCHEMA = polars_schema("prompts")  # `dataset` is filled in once the source is known

# Default (question, answer) columns of each data format; `auto` picks the first whose columns exist.
FORMAT_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution"), "plain": ("question", "answer")}


class PromptDataError(ValueError):
    """A row of a data source cannot become a prompt; the message names the split, row and field."""


class PromptsRead(NamedTuple):
    frame: pl.DataFrame
    skipped: int  # rows left out under skip_bad_rows


# ---------------------------------------------------------------- built-in arithmetic task


def _arith_problem(rng: random.Random, config: PromptsConfig) -> tuple[str, int, int]:
    op = rng.choice(config.ops)
    a = rng.randint(0, config.max_operand)
    b = rng.randint(0, config.max_operand_mul if op == "*" else config.max_operand)
    return op, a, b


def _arith_answer(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _question_id(question: str) -> str:
    return "arith-" + hashlib.sha1(question.encode()).hexdigest()[:10]


def builtin_prompts(config: PromptsConfig, seed: int) -> pl.DataFrame:
    """n_test distinct test problems, then n_train training problems none of which is a test question.

    The training pool is drawn from the task distribution (ops uniform), so a question can repeat in it
    (`*` has only (max_operand+1)·(max_operand_mul+1) distinct questions); repeats get ids `<id>.2`, `<id>.3`, ….
    """
    ops_space = {
        "+": (config.max_operand + 1) ** 2,
        "-": (config.max_operand + 1) ** 2,
        "*": (config.max_operand + 1) * (config.max_operand_mul + 1),
    }
    if config.n_test >= sum(ops_space[op] for op in set(config.ops)):
        raise ValueError(
            f"prompts.n_test={config.n_test} leaves no question for training with these operand ranges; "
            "lower prompts.n_test or raise prompts.max_operand"
        )
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    test_questions: set[str] = set()
    while len(test_questions) < config.n_test:
        op, a, b = _arith_problem(rng, config)
        question = f"{a}{op}{b}=?"
        if question not in test_questions:
            test_questions.add(question)
            rows.append(_arith_row("test", _question_id(question), question, op, a, b, seed))
    seen: dict[str, int] = {}
    while len(rows) < config.n_test + config.n_train:
        op, a, b = _arith_problem(rng, config)
        question = f"{a}{op}{b}=?"
        if question in test_questions:
            continue
        seen[question] = seen.get(question, 0) + 1
        suffix = "" if seen[question] == 1 else f".{seen[question]}"
        rows.append(_arith_row("train", _question_id(question) + suffix, question, op, a, b, seed))
    frame = pl.DataFrame(rows, schema=PROMPTS_SCHEMA)
    return frame.with_columns(dataset=pl.lit(config.dataset_name or BUILTIN_DATASET))


def _arith_row(split: str, prompt_id: str, question: str, op: str, a: int, b: int, seed: int) -> dict[str, Any]:
    return {
        "dataset": None,
        "split": split,
        "prompt_id": prompt_id,
        "prompt": question,
        "answer": str(_arith_answer(op, a, b)),
        "source": f"builtin-arith:seed={seed}",
        "meta": json.dumps({"op": op, "a": a, "b": b}),
    }


# ---------------------------------------------------------------- data sets


def gsm8k_gold(answer: str) -> str | None:
    """The number after the last '####' of a GSM8K answer, commas removed."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def boxed_gold(solution: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) of a MATH solution, nested braces kept."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", solution)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[i], 0)
        if depth == 0:
            return solution[start:i].strip() or None
    return None  # unbalanced braces


def plain_gold(answer: str) -> str | None:
    return answer.strip() or None


GOLD_EXTRACTORS = {"gsm8k": gsm8k_gold, "math": boxed_gold, "plain": plain_gold}


def read_prompts(config: PromptsConfig, seed: int) -> PromptsRead:
    """Built-in problems, or the train and test splits of a data set with their gold answers.

    A data source is a hub id (`owner/name`, or `owner/name:subset`), a local folder of train/test
    files, a local .parquet/.jsonl/.json file with a `split` column, or a path holding `{split}`.
    """
    if config.source == "builtin":
        return PromptsRead(builtin_prompts(config, seed), 0)
    splits = _load_splits(config)
    fmt, q_field, a_field = _resolve_fields(config, splits)
    dataset = config.dataset_name or _dataset_name(config.source)
    frames, skipped = [], 0
    for split_name, split in ((config.train_split, "train"), (config.test_split, "test")):
        data = splits[split_name]
        if split == "test":
            data = data.head(config.n_test)
        frame, bad = _rows_to_prompts(data, split, split_name, fmt, q_field, a_field, config)
        frames.append(frame.with_columns(dataset=pl.lit(dataset)))
        skipped += bad
    if skipped:
        log.warning("prompts: left out %d bad rows of %s (skip_bad_rows)", skipped, config.source)
    return PromptsRead(pl.concat(frames), skipped)


def _load_splits(config: PromptsConfig) -> dict[str, pl.DataFrame]:
    import datasets

    datasets.disable_progress_bars()  # the stage has its own line; its errors are ours to word (below)
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)

    source = config.source
    wanted = (config.train_split, config.test_split)
    path = Path(source).expanduser()
    try:
        if "{split}" in source:
            files = {s: source.replace("{split}", s) for s in wanted}
            for s, f in files.items():
                if not Path(f).exists():
                    raise PromptDataError(f"prompts.source: no file {f} for split {s!r}")
            loaded = datasets.load_dataset(_file_builder(source), data_files=files)
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif path.is_file():
            loaded = datasets.load_dataset(_file_builder(source), data_files=str(path))  # one split: "train"
            return _split_column(loaded["train"].to_polars(), config)
        elif path.suffix in (".parquet", ".jsonl", ".json") or source.startswith((".", "/", "~")):
            raise PromptDataError(f"prompts.source: {source} does not exist; give an existing file or folder")
        else:
            name, _, subset = source.partition(":")
            loaded = datasets.load_dataset(name, subset or None)
    except PromptDataError:
        raise
    except StopIteration:  # what the json builder raises on an empty file
        raise PromptDataError(f"prompts.source {source}: the file is empty") from None
    except Exception as err:  # datasets wraps what its builders raise (DatasetGenerationError): name the root
        root = _root_cause(err)
        raise PromptDataError(
            f"prompts.source: could not load {source!r} ({type(root).__name__}: {_first_line(root)}); "
            "give a readable local Parquet/JSONL path, or a hub id that is reachable (or cached) from here"
        ) from None
    missing = [s for s in wanted if s not in loaded or not len(loaded[s])]
    if missing:
        have = sorted(s for s in loaded if len(loaded[s]))
        raise PromptDataError(
            f"prompts.source {source!r} has splits {have} with rows, not {missing}; "
            "set prompts.train_split / prompts.test_split"
        )
    return {s: loaded[s].to_polars() for s in wanted}


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _file_builder(path: str) -> str:
    suffix = Path(path.replace("{split}", "x")).suffix
    if suffix not in (".parquet", ".jsonl", ".json"):
        raise PromptDataError(f"prompts.source {path}: expected a .parquet, .jsonl or .json file")
    return "parquet" if suffix == ".parquet" else "json"


def _split_column(frame: pl.DataFrame, config: PromptsConfig) -> dict[str, pl.DataFrame]:
    if "split" not in frame.columns:
        raise PromptDataError(
            f"prompts.source {config.source} is one file without a 'split' column; add one, give a folder with "
            "train/test files, or a path with '{split}' in it (e.g. data/{split}.jsonl)"
        )
    splits = {s: frame.filter(pl.col("split") == s).drop("split") for s in (config.train_split, config.test_split)}
    empty = [s for s, rows in splits.items() if rows.is_empty()]
    if empty:
        have = sorted(set(frame["split"].drop_nulls().cast(pl.String).to_list()))
        raise PromptDataError(
            f"prompts.source {config.source}: its 'split' column holds {have}, no rows of {empty}; "
            "set prompts.train_split / prompts.test_split, or add those rows"
        )
    return splits


def _resolve_fields(config: PromptsConfig, splits: dict[str, pl.DataFrame]) -> tuple[str, str, str]:
    columns = splits[config.train_split].columns
    fmt = config.format
    if fmt == "auto":
        detected = [f for f in ("gsm8k", "math") if set(FORMAT_FIELDS[f]) <= set(columns)]
        if detected:
            fmt = detected[0]
        elif config.question_field and config.answer_field:
            fmt = "plain"
        else:
            raise PromptDataError(
                f"prompts.format=auto: columns {columns} match neither GSM8K (question, answer) nor "
                "MATH (problem, solution); set prompts.format and prompts.question_field / prompts.answer_field"
            )
    q_field = config.question_field or FORMAT_FIELDS[fmt][0]
    a_field = config.answer_field or FORMAT_FIELDS[fmt][1]
    for name, split in splits.items():
        for role, field in (("question_field", q_field), ("answer_field", a_field)):
            if field not in split.columns:
                raise PromptDataError(
                    f"prompts.{role}: no column {field!r} in split {name!r} of {config.source} "
                    f"(columns: {split.columns}); set prompts.{role}"
                )
            dtype = split.schema[field]
            if not (dtype == pl.String or dtype.is_numeric() or dtype == pl.Null):
                raise PromptDataError(
                    f"{config.source} split {name!r}: column {field!r} holds {dtype} values, not text (a row holds a "
                    "list, an object or a mix of types); make every value of it a string"
                )
    return fmt, q_field, a_field


def _rows_to_prompts(
    data: pl.DataFrame, split: str, split_name: str, fmt: str, q_field: str, a_field: str, config: PromptsConfig
) -> tuple[pl.DataFrame, int]:
    extract = GOLD_EXTRACTORS[fmt]
    rows, bad = [], 0
    for i, row in enumerate(data.iter_rows(named=True)):
        problem = _row_problem(row, q_field, a_field, extract, fmt)
        if problem is not None:
            if not config.skip_bad_rows:
                raise PromptDataError(
                    f"{config.source} split {split_name!r} row {i}: {problem}; "
                    "fix the row, or set prompts.skip_bad_rows=true to leave such rows out"
                )
            log.info("prompts: skipping %s row %d: %s", split_name, i, problem)
            bad += 1
            continue
        meta = {k: v for k, v in row.items() if k != q_field}
        rows.append(
            {
                "dataset": None,
                "split": split,
                "prompt_id": f"{split}-{i}",
                "prompt": str(row[q_field]).strip(),
                "answer": extract(str(row[a_field])),
                "source": config.source,
                "meta": json.dumps(meta, default=str, ensure_ascii=False),
            }
        )
    return pl.DataFrame(rows, schema=PROMPTS_SCHEMA), bad


def _row_problem(row: dict[str, Any], q_field: str, a_field: str, extract, fmt: str) -> str | None:
    question, answer = row.get(q_field), row.get(a_field)
    if question is None:
        return f"field {q_field!r} is missing"
    for field, value in ((q_field, question), (a_field, answer)):
        if value is not None and not isinstance(value, str | int | float):
            return f"field {field!r} holds a {type(value).__name__}, not text"
    if not str(question).strip():
        return f"field {q_field!r} is empty"
    if answer is None:
        return f"field {a_field!r} is missing"
    if extract(str(answer)) is None:
        what = {"gsm8k": "no '#### <answer>'", "math": "no \\boxed{...}", "plain": "empty answer"}[fmt]
        return f"field {a_field!r}: {what} in {str(answer)[-60:]!r}"
    return None


def _dataset_name(source: str) -> str:
    if "{split}" in source or Path(source).exists():
        path = Path(source.replace("{split}", ""))
        stem = path.name.split(".")[0].strip("_-") or path.parent.name
    else:  # hub id, owner/name[:subset]
        stem = source.replace("/", "-").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem) or "data"


# ---------------------------------------------------------------- per round, templating


def sample_round_prompts(prompts: pl.DataFrame, per_round: int, round: int, seed: int) -> pl.DataFrame:
    """per_round train prompts for `round`, without replacement, deterministic in (seed, round).

    Rows are put in prompt_id order first, so the draw does not depend on how storage ordered them.
    """
    train = prompts.filter(pl.col("split") == "train").sort("prompt_id")
    if train.height == 0:
        raise ValueError("the prompts table has no train rows; check prompts.source and prompts.train_split")
    if per_round > train.height:
        log.warning("prompts.per_round=%d > %d train prompts; taking all of them", per_round, train.height)
    rng = np.random.default_rng([seed, round])
    picked = np.sort(rng.choice(train.height, size=min(per_round, train.height), replace=False))
    return train[picked]


def render_prompts(
    frame: pl.DataFrame,
    tokenizer,
    template: str,
    use_chat_template: bool,
    system_prompt: str | None = None,
    user_message: str = "{question}",
) -> pl.DataFrame:
    """`frame` with a column `text`: where the tokenizer has a chat template (and use_chat_template is set), a
    user turn of `user_message` ({question} replaced) after a system turn of `system_prompt` when given (else
    the template's own default, if it has one), opened for the assistant's answer; else `template` with
    {question} replaced."""
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    if chat:
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        texts = [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": user_message.replace("{question}", q)}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in frame["prompt"]
        ]
    else:
        texts = [template.replace("{question}", q) for q in frame["prompt"]]
    return frame.with_columns(text=pl.Series(texts, dtype=pl.String))
