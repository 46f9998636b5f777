"""Rewards: read the answer a completion commits to and compare it with the gold answer.

Two verifiers: `numeric` (exact fractions, linear-time scanning) and `math_verify` (in a process pool).
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

import numpy as np
import polars as pl

from stages.config import RewardConfig
from storage.schemas import KEYS, polars_schema

VERIFIER_VERSION = "1"
OUTCOMES = ("correct", "incorrect", "unparsable", "timeout")
SCHEMA = polars_schema("rewards")

log = logging.getLogger(__name__)

Verdict = tuple[str, str | None]  # (outcome, extracted_answer)


class BadGold(ValueError):
    """A gold answer the verifier cannot read: the data, not the completion, is wrong."""


# Longer digit strings are not answers anyone checks, and Fraction() of them costs quadratic time.
MAX_NUMBER_CHARS = 200
# extracted_answer is for people reading the table; a 1 MB box would bloat every row after it.
MAX_EXTRACTED_CHARS = 200


# ---------------------------------------------------------------- numeric


# Models write minus as U+2212 or as dashes; all of them mean "-" in front of a number.
_DASHES = str.maketrans(dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe63\uff0d", "-"))

_NUM = r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|(?<![\d.])\.\d+"
_FRAC = rf"\\[dt]?frac\s*\{{\s*-?(?:{_NUM})\s*\}}\s*\{{\s*-?(?:{_NUM})\s*\}}|\\[dt]?frac\d\d"
# A '-' is a sign only where it cannot be subtraction: not after a word, a digit or a closing bracket.
_TOKEN = rf"(?:(?<![\w)\]}}])-\s*)?(?:\\?\$\s*)?(?:{_FRAC}|(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?)"
_TOKEN_RE = re.compile(_TOKEN)
# GSM8K's final-answer marker; markdown headings ("#### Step 2") also start with ####, so a number must follow.
_HASHES_RE = re.compile(rf"####[ \t]*({_TOKEN})")
# \\ is a TeX line break and \{ \} are literal braces: neither opens or closes a group.
_BOX_SCAN_RE = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|[{}]")

_STRICT_RE = re.compile(
    rf"(?P<sign>-?)\s*(?:"
    rf"\\[dt]?frac\s*\{{\s*(?P<fn>-?(?:{_NUM}))\s*\}}\s*\{{\s*(?P<fd>-?(?:{_NUM}))\s*\}}"
    rf"|\\[dt]?frac(?P<sn>\d)(?P<sd>\d)"
    rf"|(?P<n>{_NUM})(?:\s*/\s*(?P<d>{_NUM}))?"
    rf")(?:\s+[A-Za-z].*)?",  # a unit or words after a space: "5 cm", "12 apples"; "5x" stays unparsable
    re.DOTALL,
)
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mbox)\s*\{([^{}]*)\}")
# Spacing, currency, percent and degree marks carry no value: "50%" is compared as 50 (GSM8K writes golds
# for percentages as the bare number), "\$1,234.00" as 1234.
_NOISE_RE = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\\?\$|\\?%|\^\s*\{?\\circ\}?|\\circ|~")


def _last_box(text: str) -> str | None:
    """Content of the \\boxed{...} that opens last among the closed ones (one pass, braces nest)."""
    start = text.find("\\boxed")
    if start < 0:
        return None
    open_boxes: list[tuple[int, int]] = []  # (content start, depth outside the box)
    depth, best = 0, None
    for m in _BOX_SCAN_RE.finditer(text, start):
        token = m.group()
        if token == "{":
            depth += 1
        elif token == "}":
            if depth == 0:
                continue  # a stray closer: TeX would stop here; skipping it keeps later boxes readable
            depth -= 1
            if open_boxes and open_boxes[-1][1] == depth:
                content_start, _ = open_boxes.pop()
                if best is None or content_start > best[0]:
                    best = (content_start, m.start())
        elif token.startswith("\\boxed"):
            open_boxes.append((m.end(), depth))
            depth += 1
    return None if best is None else text[best[0] : best[1]]


def _to_fraction(answer: str) -> Fraction | None:
    """The exact value of an answer written as one number, or None."""
    s = _TEXT_RE.sub(r" \1 ", answer.translate(_DASHES))
    s = _NOISE_RE.sub("", s.replace("{,}", ","))
    if s.count("=") == 1:  # "x = 5"
        s = s.split("=")[1]
    s = s.strip().rstrip(".").strip()
    if s.startswith("{") and s.endswith("}") and "{" not in s[1:-1]:
        s = s[1:-1].strip()
    # \left(\frac{1}{2}\right) is the value in parentheses (\left and \right are gone by now); (1)(2) is not.
    if s.startswith("(") and s.endswith(")") and "(" not in s[1:-1] and ")" not in s[1:-1]:
        s = s[1:-1].strip()
    m = _STRICT_RE.fullmatch(s)
    if m is None:
        return None
    if m["fn"] is not None:
        num, den = m["fn"], m["fd"]
    elif m["sn"] is not None:
        num, den = m["sn"], m["sd"]
    else:
        num, den = m["n"], m["d"] or "1"
    if len(num) + len(den) > MAX_NUMBER_CHARS:
        return None
    den_value = Fraction(den.replace(",", ""))
    if den_value == 0:
        return None
    value = Fraction(num.replace(",", "")) / den_value
    return -value if m["sign"] else value


def read_answer(completion: str) -> tuple[str | None, Fraction | None]:
    """(the answer text the completion commits to, its value): the last box, else '#### x', else the last number."""
    box = _last_box(completion)
    if box is not None:
        return box.strip(), _to_fraction(box)
    text = completion.translate(_DASHES)
    hashes = deque(_HASHES_RE.finditer(text), maxlen=1)  # the last match, in one linear pass
    if hashes:
        return hashes[0].group(1), _to_fraction(hashes[0].group(1))
    numbers = deque(_TOKEN_RE.finditer(text), maxlen=1)
    if not numbers:
        return None, None
    return numbers[0].group(), _to_fraction(numbers[0].group())


def gold_value(gold: str) -> Fraction:
    """The value of a gold answer for the numeric verifier; a gold that is not one number is a data error."""
    value = _to_fraction(gold)
    if value is None:
        raise BadGold(
            f"gold answer {gold[:80]!r} is not a number; the numeric verifier needs numeric golds "
            "(use reward.verifier=math_verify for LaTeX answers)"
        )
    return value


def _numeric(completion: str, gold: Fraction) -> Verdict:
    text, value = read_answer(completion)
    extracted = None if text is None else text[:MAX_EXTRACTED_CHARS]
    if value is None:
        return "unparsable", extracted
    return ("correct" if value == gold else "incorrect"), extracted


# ---------------------------------------------------------------- math_verify (runs in worker processes)


_gold_cache: dict[str, list] = {}


def _seconds_left(deadline: float) -> int:
    """Whole seconds for math_verify's signal.alarm; alarm(0) would switch the limit off, so at least 1."""
    from math_verify.errors import TimeoutException

    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutException("item time limit reached")
    return max(1, round(left))


def _parse_gold(gold: str, deadline: float) -> list:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    if gold not in _gold_cache:
        # Golds are stored without delimiters ("\\frac{1}{2}"); a box makes math_verify read them as LaTeX.
        text = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"
        try:
            parsed = parse(text, parsing_timeout=_seconds_left(deadline), raise_on_error=True)
        except TimeoutException:
            raise
        except Exception as err:
            raise BadGold(f"math_verify cannot read the gold answer {gold[:80]!r}: {err}") from None
        if not parsed:
            raise BadGold(f"math_verify finds no answer in the gold answer {gold[:80]!r}")
        _gold_cache[gold] = parsed
    return _gold_cache[gold]


def _math_verify_one(completion: str, gold: str, timeout_s: float) -> Verdict:
    """One item inside a worker: math_verify's own alarms, set to the time left, stop slow Python-level work."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    deadline = time.monotonic() + timeout_s
    # math_verify reads every box of a completion as one set (\boxed{3} ... \boxed{5} is {3, 5}, never 5):
    # as the numeric verifier does, the box a completion ends on is its answer.
    box = _last_box(completion)
    text = completion if box is None else f"\\boxed{{{box}}}"
    try:
        golds = _parse_gold(gold, deadline)  # a gold it cannot read raises: that is the data's fault
        preds = parse(text, parsing_timeout=_seconds_left(deadline), raise_on_error=True)
    except TimeoutException:
        return "timeout", None
    except BadGold:
        raise
    except Exception:
        return "unparsable", None
    if not preds:
        return "unparsable", None
    # parse() gives [sympy value, the LaTeX it read]; printing the sympy value can itself hang (a huge power).
    extracted = next((p[:MAX_EXTRACTED_CHARS] for p in preds if isinstance(p, str)), None)
    timed_out = False
    # One verify() per pair, so that a timeout shows as one (raise_on_error) without skipping the other pairs.
    for g in golds:
        for p in preds:
            try:
                if verify(g, p, timeout_seconds=_seconds_left(deadline), raise_on_error=True):
                    return "correct", extracted
            except TimeoutException:
                timed_out = True
            except Exception:
                continue
    return ("timeout" if timed_out else "incorrect"), extracted


def _init_worker(barrier) -> None:
    from math_verify import parse, verify

    # The first parse builds the LaTeX grammar (~0.2 s); done here, no item pays for it.
    verify(parse("$1$"), parse("$1$"))

    # Deadlines start when an item is handed over, so no item may go out before every worker is up.
    barrier.wait(POOL_START_TIMEOUT_S)


def _ready() -> bool:
    return True


# ---------------------------------------------------------------- the pool


# math_verify's alarms count whole seconds; the pool allows one more before it decides a worker is stuck in
# code that ignores signals (C extensions), which only killing the process stops.
POOL_GRACE_S = 1.0
POOL_START_TIMEOUT_S = 120.0


def _context() -> multiprocessing.context.BaseContext:
    # fork would copy the caller's threads (Prefect, polars) into the workers. A forkserver that has imported
    # math_verify and this module once makes every later worker, replacements for killed ones too, a cheap fork.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["math_verify"] + ([__name__] if __name__ != "__main__" else []))
        return context
    return multiprocessing.get_context("spawn")


def _start_pool(size: int) -> ProcessPoolExecutor:
    context = _context()
    barrier = context.Barrier(size)
    pool = ProcessPoolExecutor(size, mp_context=context, initializer=_init_worker, initargs=(barrier,))
    # The pool starts processes as tasks arrive: one task per worker starts them all.
    ready = [pool.submit(_ready) for _ in range(size)]
    done, _ = wait(ready, timeout=POOL_START_TIMEOUT_S + 5)
    problem = None if len(done) == size else f"not ready after {POOL_START_TIMEOUT_S:.0f}s"
    for future in done:
        if problem is None and future.exception() is not None:
            problem = repr(future.exception())
    if problem is not None:
        _stop_pool(pool, kill=True)
        raise RuntimeError(
            f"the verifier's worker processes failed to start ({problem}); they import the main module, so a "
            "script that verifies with math_verify must keep its top level under `if __name__ == '__main__':`"
        )
    return pool


def _stop_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    if kill:
        if hasattr(pool, "kill_workers"):  # Python 3.14+
            pool.kill_workers()
        else:  # no public way before 3.14
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def map_with_timeout(
    fn: Callable[..., Verdict], items: Sequence[tuple], timeout_s: float, workers: int
) -> list[Verdict]:
    """fn(*item, timeout_s) for each item in worker processes, in order; an item still running after
    timeout_s + POOL_GRACE_S is ("timeout", None).

    A stuck worker cannot be interrupted, only killed: the pool is killed, the other items that were
    running go back to the queue, and a fresh pool carries on. A worker that dies (out of memory, a crash)
    breaks the pool the same way; its items are retried alone, and one that breaks it again is a timeout.
    """
    results: list[Verdict | None] = [None] * len(items)
    queue = deque(range(len(items)))
    crashed: set[int] = set()
    while queue:
        size = min(workers, len(queue))
        pool = _start_pool(size)
        kill = True
        try:
            kill = _drain(pool, size, fn, items, timeout_s, queue, results, crashed)
        finally:
            _stop_pool(pool, kill)
    return results  # type: ignore[return-value]


def _drain(pool, size, fn, items, timeout_s, queue, results, crashed) -> bool:
    """Run queued items until the queue is empty (returns False) or the pool must be killed (True)."""
    running: dict = {}  # future -> (item index, deadline)
    while queue or running:
        while _may_submit(queue, running, crashed, size):
            i = queue.popleft()
            running[pool.submit(fn, *items[i], timeout_s)] = (i, time.monotonic() + timeout_s + POOL_GRACE_S)
        next_deadline = min(d for _, d in running.values())
        done, _ = wait(running, timeout=max(0.0, next_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
        broken = False
        for future in done:
            i, _ = running.pop(future)
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                broken = True
                _requeue_crashed(i, queue, results, crashed)
        if broken:
            for i, _ in running.values():
                _requeue_crashed(i, queue, results, crashed)
            return True
        now = time.monotonic()
        overdue = [i for i, d in running.values() if d <= now]
        if overdue:
            for i in overdue:
                log.warning("verifier: item %d still running after %.1fs; killing the worker pool", i, timeout_s)
                results[i] = ("timeout", None)
            queue.extendleft(i for i, d in running.values() if d > now)
            return True
    return False


def _may_submit(queue: deque, running: dict, crashed: set[int], size: int) -> bool:
    if not queue or len(running) >= size:
        return False
    # An item that broke the pool once runs alone, so that a second break convicts only that item.
    return not running or (queue[0] not in crashed and not any(i in crashed for i, _ in running.values()))


def _requeue_crashed(i: int, queue: deque, results: list, crashed: set[int]) -> None:
    if i in crashed:
        log.warning("verifier: item %d broke the worker pool twice; scoring it as a timeout", i)
        results[i] = ("timeout", None)
    else:
        crashed.add(i)
        queue.appendleft(i)


# ---------------------------------------------------------------- public API


def verify_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    verifier: str = "numeric",
    timeout_s: float = 5.0,
    workers: int = 2,
) -> list[Verdict]:
    """(outcome, extracted_answer) per completion, in order; outcome is one of OUTCOMES.

    numeric runs in this process (linear time, so timeout_s and workers do not apply); math_verify runs
    in `workers` processes with timeout_s per item.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers")
    if verifier == "numeric":
        values: dict[str, Fraction] = {}
        verdicts = []
        for completion, gold in zip(completions, golds):
            gold = gold or ""
            if gold not in values:
                values[gold] = gold_value(gold)
            verdicts.append(_numeric(completion or "", values[gold]))
        return verdicts
    if verifier == "math_verify":
        empty = next((g for g in golds if not (g or "").strip()), None)
        if empty is not None:
            raise ValueError("an empty gold answer cannot be verified; fix the prompts' answer column")
        items = [(c or "", g) for c, g in zip(completions, golds)]
        return map_with_timeout(_math_verify_one, items, timeout_s, workers)
    raise ValueError(f"unknown verifier {verifier!r}; use 'numeric' or 'math_verify'")


def check(completion: str, gold: str, verifier: str = "numeric", timeout_s: float = 5.0) -> Verdict:
    """(outcome, extracted_answer) of one completion; for many, verify_batch shares one worker pool."""
    return verify_batch([completion], [gold], verifier, timeout_s, workers=1)[0]


def score(rollouts: pl.DataFrame, prompts: pl.DataFrame, config: RewardConfig, seed: int = 0) -> pl.DataFrame:
    """One rewards row per rollout, in the rollouts' order (the `rewards` schema less stage_key).

    config.shuffle (a control) permutes reward and outcome across all rows with `seed`: the round keeps its
    reward rate but the reward no longer says anything about the completion it sits next to, so whatever
    the policy still learns is not from the signal. extracted_answer stays, to show what was really said.
    """
    _require(rollouts, [*KEYS, "completion"], "rollouts")
    _require(prompts, ["prompt_id", "answer"], "prompts")
    gold_of = _golds(prompts)
    prompt_ids = rollouts["prompt_id"].to_list()
    missing = sorted({p for p in prompt_ids if gold_of.get(p) is None})
    if missing:
        raise ValueError(
            f"no gold answer for prompt_id {', '.join(map(str, missing[:5]))}"
            f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}: rollouts and prompts disagree"
        )
    golds = [gold_of[p] for p in prompt_ids]
    if config.verifier == "numeric":
        for p in dict.fromkeys(prompt_ids):
            try:
                gold_value(gold_of[p])
            except BadGold as err:
                raise BadGold(f"prompt_id {p}: {err}") from None
    verdicts = verify_batch(rollouts["completion"].to_list(), golds, config.verifier, config.timeout_s, config.workers)
    outcomes = np.array([o for o, _ in verdicts], dtype=object)
    rewards = np.where(outcomes == "correct", config.correct, config.incorrect).astype(np.float64)
    if config.shuffle:
        order = np.random.default_rng(seed).permutation(len(verdicts))
        rewards, outcomes = rewards[order], outcomes[order]
    keys = rollouts.select(pl.col(k).cast(SCHEMA[k]) for k in KEYS)
    return keys.with_columns(
        pl.Series("extracted_answer", [e for _, e in verdicts], dtype=pl.String),
        pl.Series("reward", rewards, dtype=pl.Float64),
        pl.Series("outcome", outcomes.tolist(), dtype=pl.String),
        pl.lit(config.verifier, pl.String).alias("verifier"),
        pl.lit(VERIFIER_VERSION, pl.String).alias("verifier_version"),
    )


def _require(frame: pl.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the {name} frame lacks columns {missing}")


def _golds(prompts: pl.DataFrame) -> dict[str, str | None]:
    pairs = prompts.select("prompt_id", "answer").unique()
    clash = pairs.filter(pl.col("prompt_id").is_duplicated())["prompt_id"].unique().sort().to_list()
    if clash:
        raise ValueError(f"prompt_id {', '.join(clash[:5])} has several different gold answers in prompts")
    return dict(zip(pairs["prompt_id"].to_list(), pairs["answer"].to_list()))
