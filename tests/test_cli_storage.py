"""Smoke tests of `asymre sql`, `asymre tables` and `asymre history` run as subprocesses on a small store, and
of `<store>/views.sql` in a fresh DuckDB connection and in the `duckdb` shell."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest
from frames import advantages_frame, rewards_frame, rollouts_frame
from polars.testing import assert_frame_equal

from storage import tables
from storage.catalog import connect, write_views_sql
from storage.sql import query

REPO = Path(__file__).resolve().parents[1]
_ENTRY = shutil.which("asymre", path=str(Path(sys.executable).parent)) or shutil.which("asymre")
ASYMRE = [_ENTRY] if _ENTRY else [sys.executable, "-m", "flows.cli"]

# advantages: v0 a/0 (6 rows), v1 a/1 (4), v2 b/0 (8), v3 a/0 replaced by 12 rows; rewards: v0 a/0 only
ADVANTAGE_ROWS_BY_VERSION = [6, 10, 18, 24]


def asymre(*args: str, store: str | None = None, env_store: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; the store comes from --store and/or $ASYMRE_STORE (never the repo's ./store)."""
    env = {k: v for k, v in os.environ.items() if k != "ASYMRE_STORE"}
    env["COLUMNS"] = "200"  # so typer's usage errors are not wrapped mid-message
    if env_store is not None:
        env["ASYMRE_STORE"] = env_store
    assert store is not None or env_store is not None
    cmd = [*ASYMRE, *args, *(["--store", store] if store is not None else [])]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cli") / "store")
    for frame in (
        advantages_frame("a", 0, n_prompts=2, G=3),
        advantages_frame("a", 1, n_prompts=2, G=2),
        advantages_frame("b", 0, n_prompts=2, G=4),
        advantages_frame("a", 0, n_prompts=4, G=3, seed=9, stage_key="key-again"),
    ):
        partition = {"experiment": frame["experiment"][0], "round": frame["round"][0]}
        tables.write_partition(root, "advantages", frame, partition=partition)
    tables.write_partition(root, "rewards", rewards_frame("a", 0, 4, 3), partition={"experiment": "a", "round": 0})
    tables.write_partition(root, "rollouts", rollouts_frame("a", 0, 4, 3), partition={"experiment": "a", "round": 0})
    write_views_sql(root)  # as a flow does after each stage
    return root


def table_body(text: str) -> list[list[str]]:
    """The cells of a polars pretty table, row by row (the lines between ╞═══ and └───)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("╞"))
    body = []
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            return body
        body.append([cell.strip() for cell in line.strip("│").split("┆")])
    raise AssertionError(f"no table end in {text!r}")


def assert_clean_success(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_sql_prints_a_pretty_table_and_store_option_wins_over_env(store, tmp_path):
    sql = "select experiment, round, count(*) as n from advantages group by all order by all"
    result = asymre("sql", sql, store=store, env_store=str(tmp_path / "elsewhere"))
    assert_clean_success(result)
    assert "shape: (3, 3)" in result.stdout
    assert "│ experiment ┆ round ┆ n" in result.stdout
    assert table_body(result.stdout) == [["a", "0", "12"], ["a", "1", "4"], ["b", "0", "8"]]


def test_sql_csv_from_a_view_file_with_the_store_from_env(store):
    result = asymre("sql", "--file", "sql/views/round_summary.sql", "--format", "csv", env_store=store)
    assert_clean_success(result)
    expected = query(connect(store), (REPO / "sql/views/round_summary.sql").read_text())
    got = pl.read_csv(io.StringIO(result.stdout), schema=expected.schema)
    assert got.height == 1 and got["rollouts"].to_list() == [12]
    assert_frame_equal(got, expected, check_exact=False)
    assert next(csv.reader(io.StringIO(result.stdout))) == expected.columns


def test_sql_parquet_output(store, tmp_path):
    out = tmp_path / "adv.parquet"
    sql = "select * from advantages where experiment = 'a' order by round, prompt_id, sample_idx"
    result = asymre("sql", sql, "--format", "parquet", "--output", str(out), store=store)
    assert_clean_success(result)
    assert result.stdout == ""
    expected = tables.read(store, "advantages", experiment="a").sort("round", "prompt_id", "sample_idx")
    assert_frame_equal(pl.read_parquet(out), expected)


def test_as_of_bare_version_and_table_version(store):
    # a bare version pins the tables the query names; rewards has no version 2, so pinning it would fail
    result = asymre("sql", "--as-of", "2", "--format", "csv", "select count(*) as n from advantages", store=store)
    assert_clean_success(result)
    assert result.stdout.split() == ["n", str(ADVANTAGE_ROWS_BY_VERSION[2])]
    both = "select (select count(*) from advantages) as advantages, (select count(*) from rewards) as rewards"
    result = asymre("sql", "--as-of", "advantages=0", "--format", "json", both, store=store)
    assert_clean_success(result)
    assert json.loads(result.stdout) == [{"advantages": ADVANTAGE_ROWS_BY_VERSION[0], "rewards": 12}]


def test_tables_lists_versions_rows_and_partitions(store):
    result = asymre("tables", store=store)
    assert_clean_success(result)
    lines = result.stdout.splitlines()
    assert lines[0] == f"store {store}"
    assert lines[1].split() == ["table", "version", "versions", "rows", "partitions"]
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in lines[2:]}
    assert rows == {"rollouts": [0, 1, 12, 1], "rewards": [0, 1, 12, 1], "advantages": [3, 4, 24, 3]}


def test_history_lists_versions_with_their_partition(store):
    result = asymre("history", "advantages", store=store)
    assert_clean_success(result)
    lines = result.stdout.splitlines()[1:]
    assert [int(line.split()[0]) for line in lines] == [3, 2, 1, 0]
    partitions = [line.split("partition=")[1] for line in lines]
    assert [json.loads(p) for p in partitions] == [
        {"experiment": "a", "round": 0},
        {"experiment": "b", "round": 0},
        {"experiment": "a", "round": 1},
        {"experiment": "a", "round": 0},
    ]
    added_rows = [int(line.split()[4]) for line in lines]  # version, date, time, operation, rows+
    assert added_rows == [12, 8, 4, 6]
    assert all(line.split()[3] == "WRITE" for line in lines)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("selec count(*) from advantages", "Parser Error: syntax error"),
        ("select * from advantagez", "Catalog Error: Table with name advantagez does not exist"),
    ],
)
def test_sql_errors_print_duckdb_message_and_tables_without_traceback(store, sql, message):
    result = asymre("sql", sql, store=store)
    assert result.returncode == 1
    assert message in result.stderr
    assert f"tables in {store}: rollouts, rewards, advantages" in result.stderr
    assert "all table names: prompts, rollouts" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_sql_missing_file_is_a_usage_error_without_traceback(store):
    result = asymre("sql", "--file", "sql/views/no_such_view.sql", store=store)
    assert result.returncode == 2
    assert "no_such_view.sql" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_store_works_and_says_so(tmp_path):
    empty = str(tmp_path / "new-store")
    result = asymre("tables", store=empty)
    assert_clean_success(result)
    assert f"store {empty} is empty" in result.stdout
    result = asymre("sql", "--format", "table", "select count(*) as n from rollouts", env_store=empty)
    assert_clean_success(result)
    assert table_body(result.stdout) == [["0"]]
    assert f"store {empty} is empty" in result.stderr
    assert not Path(empty).exists()  # reading does not create a store


# --- <store>/views.sql outside asymre ----------------------------------------------------------------------

VIEW_QUERIES = {
    "per_partition": "select experiment, round, count(*) as n, sum(abs(advantage)) as total from advantages "
    "group by all order by all",
    "summary": "select experiment, round, rollouts, mean_reward, mean_completion_tokens from round_summary",
    "difficulty": "select prompt_id, samples, success_rate from prompt_difficulty order by prompt_id",
}


def fresh_connection(store: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute((Path(store) / "views.sql").read_text())
    return con


def test_views_sql_in_a_fresh_connection_matches_asymre_sql(store):
    combined = "select " + ", ".join(
        f"(select list(q) from ({sql}) as q) as {name}" for name, sql in VIEW_QUERIES.items()
    )
    result = asymre("sql", "--format", "json", combined, store=store)
    assert_clean_success(result)
    via_cli = json.loads(result.stdout)[0]
    con = fresh_connection(store)
    for name, sql in VIEW_QUERIES.items():
        rows = con.sql(sql).fetchall()
        assert len(rows) == len(via_cli[name]) > 0, name
        for row, cli_row in zip(rows, via_cli[name]):
            assert list(row) == pytest.approx(list(cli_row.values())), name
    assert [r[2] for r in con.sql(VIEW_QUERIES["per_partition"]).fetchall()] == [12, 4, 8]


def test_views_sql_in_the_duckdb_shell(store):
    shell = shutil.which("duckdb")
    if shell is None:
        pytest.skip("no `duckdb` shell binary on PATH (pip install duckdb-cli)")
    views = str(Path(store) / "views.sql")
    result = subprocess.run(
        [shell, "-csv", "-init", views, "-c", VIEW_QUERIES["per_partition"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and ("Parser Error" in result.stderr or "version" in result.stderr.lower()):
        pytest.skip(f"this duckdb shell cannot read views.sql: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["experiment", "round", "n", "total"]
    expected = fresh_connection(store).sql(VIEW_QUERIES["per_partition"]).fetchall()
    got = [(e, int(r), int(n), float(t)) for e, r, n, t in rows[1:]]
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert [g[3] for g in got] == pytest.approx([e[3] for e in expected], abs=1e-9)
