"""The `asymre` command line: thin wrappers that parse arguments and call storage or a flow.

Heavy imports (torch, prefect) happen inside the commands that need them, so `asymre sql` starts fast.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Offline iterated off-policy REINFORCE (AsymRE, TOPR) with versioned tables you can query.",
)


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"asymre {version('asymre')}")
    except PackageNotFoundError:  # run from a source tree that was never installed
        typer.echo("asymre (version unknown: not installed; `pip install -e .` installs it)")
    raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Options before the command (--version)."""


StoreOpt = Annotated[
    str | None, typer.Option("--store", help="store root (default: $ASYMRE_STORE or ./store)", show_default=False)
]


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _as_of(values: list[str], sql: str) -> dict[str, int]:
    from storage.catalog import tables_named
    from storage.schemas import SCHEMAS

    pinned: dict[str, int] = {}
    for value in values:
        name, _, ver = value.rpartition("=") if "=" in value else ("", "", value)
        if not ver.isdigit():
            fail(f"--as-of {value!r}: expected VERSION or TABLE=VERSION")
        names = [name] if name else tables_named(sql)
        for table in names:
            if table not in SCHEMAS:
                fail(f"--as-of {value!r}: no table {table!r}; tables: {', '.join(SCHEMAS)}")
            pinned[table] = int(ver)
    return pinned


@app.command()
def sql(
    query: Annotated[str | None, typer.Argument(help="SQL to run (DuckDB dialect)")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", exists=True, dir_okay=False, readable=True, help="read the query from a .sql file"
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json | parquet")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the result here")] = None,
    as_of: Annotated[
        list[str],
        typer.Option("--as-of", help="VERSION (every table the query names) or TABLE=VERSION; repeatable"),
    ] = [],  # noqa: B006 - typer needs a literal default
    max_rows: Annotated[int, typer.Option(help="rows shown in table format")] = 100,
    store: StoreOpt = None,
) -> None:
    """Query any table of the store with DuckDB."""
    import duckdb
    import polars as pl

    from storage.catalog import connect
    from storage.catalog import query as run_query
    from storage.schemas import SCHEMAS
    from storage.tables import existing_tables, resolve_store

    if (query is None) == (file is None):
        fail("give a query or --file FILE (one of them)")
    text = file.read_text() if file else query
    if fmt not in ("table", "csv", "json", "parquet"):
        fail(f"--format {fmt!r}: choose table, csv, json or parquet")
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    root = resolve_store(store)
    try:
        con = connect(root, _as_of(as_of, text))
        result = run_query(con, text)
    except duckdb.PermissionException as err:  # the catalog reads the store's tables and touches nothing else
        fail(f"{err}; `asymre sql` only reads the store: to save a result, give -o FILE (and --format)")
    except duckdb.InvalidInputException as err:  # a table that cannot be read says why, and the fix, in one line
        fail(str(err).removeprefix("Invalid Input Error: "))
    except (duckdb.Error, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        have = existing_tables(root)
        typer.echo(
            f"tables in {root}: {', '.join(have) if have else '(none yet: the store is empty)'}\n"
            f"all table names: {', '.join(SCHEMAS)}",
            err=True,
        )
        raise typer.Exit(1) from None
    if fmt == "table":
        if not existing_tables(root):  # a mistyped --store would otherwise answer zeros silently
            typer.echo(f"(store {root} is empty: no tables yet)", err=True)
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=60):
            rendered = str(result)
        _emit(rendered + "\n", output)
    elif fmt == "csv":
        _emit(result.write_csv(), output)
    elif fmt == "json":
        _emit(json.dumps(result.to_dicts(), default=str, indent=1) + "\n", output)
    else:
        result.write_parquet(output)


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@app.command()
def tables(store: StoreOpt = None) -> None:
    """Each table: latest version, number of versions, rows and partitions; exits 1 if one cannot be read."""
    from storage.schemas import SCHEMAS
    from storage.tables import DataFileMissing, TableDamaged, resolve_store, summary

    root = resolve_store(store)
    rows: list[tuple[str, dict | str]] = []  # (table, its summary or why it cannot be read)
    for name in SCHEMAS:
        try:
            info = summary(root, name)  # from the Delta log alone: see storage.tables.summary
        except (TableDamaged, DataFileMissing) as err:
            rows.append((name, str(err)))
            continue
        if info is not None:
            rows.append((name, info))
    if not rows:
        typer.echo(f"store {root} is empty: no tables yet (`asymre run` fills it)")
        return
    typer.echo(f"store {root}")
    typer.echo(f"{'table':<12} {'version':>7} {'versions':>8} {'rows':>10} {'partitions':>10}")
    for name, info in rows:
        if isinstance(info, str):
            typer.echo(f"{name:<12} damaged: {info}")
        else:
            typer.echo(
                f"{name:<12} {info['version']:>7} {info['versions']:>8} {info['rows']:>10} {info['partitions']:>10}"
            )
    damaged = [name for name, info in rows if isinstance(info, str)]
    if damaged:
        fail(f"{len(damaged)} table(s) cannot be read: {', '.join(damaged)} (the reason and the fix are above)")


@app.command()
def history(
    table: Annotated[str, typer.Argument(help="table name")],
    store: StoreOpt = None,
) -> None:
    """Versions of TABLE, newest first, with their commit metadata."""
    from storage.schemas import SCHEMAS
    from storage.tables import history as table_history
    from storage.tables import resolve_store

    if table not in SCHEMAS:
        fail(f"no table {table!r}; tables: {', '.join(SCHEMAS)}")
    root = resolve_store(store)
    commits = table_history(root, table)
    if not commits:
        typer.echo(f"table {table} has no versions yet in {root}")
        return
    typer.echo(
        f"{'version':>7}  {'committed (UTC)':<19}  {'operation':<9}  {'rows+':>6}  {'files+/-':>8}  partition / metadata"
    )
    for c in commits:
        when = datetime.fromtimestamp(c["timestamp"] / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        metrics = c.get("operationMetrics", {})
        files = f"{metrics.get('num_added_files', 0)}/{metrics.get('num_removed_files', 0)}"
        extra = {
            k.removeprefix("asymre."): v for k, v in c.items() if k.startswith("asymre.") and k != "asymre.commit_id"
        }
        meta = " ".join(f"{k}={v}" for k, v in extra.items())
        typer.echo(
            f"{c['version']:>7}  {when:<19}  {c.get('operation', ''):<9}  {metrics.get('num_added_rows', 0):>6}  "
            f"{files:>8}  {meta}"
        )


def _prefect_env(store: str, verbose: bool = False) -> None:
    """Point Prefect's home into the store and set the settings measured to work here, unless the user has."""
    import os

    from storage.object_store import local_root  # a store on S3: a folder of this machine's cache

    os.environ.setdefault("PREFECT_HOME", str(local_root(store) / ".prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # its SQLite file needs the folder
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:  # a failed task would log its traceback at ERROR: `run` prints one line instead
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")


def _load(config: Path | None, sets: list[str], store: str | None):
    from flows.config import ConfigError, load_config
    from storage.tables import resolve_store

    try:
        cfg = load_config(config, sets)
    except ConfigError as err:
        fail(str(err), code=2)
    root = resolve_store(store if store is not None else (cfg.store if "store" in cfg.model_fields_set else None))
    return cfg.model_copy(update={"store": root})


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML (overrides of the defaults)")] = None,
    rounds: Annotated[int | None, typer.Option(help="total rounds (default: the config's)")] = None,
    sets: Annotated[list[str], typer.Option("--set", help="section.field=value; repeatable")] = [],  # noqa: B006
    from_stage: Annotated[
        str | None,
        typer.Option(
            # the stage names of flows/pipeline.py STAGES, written out: importing it here would load torch for
            # every command (tests/test_cli_output.py keeps the two lists equal)
            help="recompute from this stage of --round on, reusing everything upstream: prompts, base, "
            "rollouts, rewards, advantages, curation, train or eval",
            show_default=False,
        ),
    ] = None,
    round_: Annotated[int | None, typer.Option("--round", help="the round of --from-stage")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's logs")] = False,
    store: StoreOpt = None,
) -> None:
    """Start or continue an experiment (with no arguments: the built-in default on the CPU).

    Everything that can be checked (config, store, rounds, --from-stage, model, data) is checked before the
    first stage; Ctrl-C or SIGTERM stops at once, and the same command resumes."""
    cfg = _load(config, sets, store)
    from flows.pipeline import STAGES

    if (from_stage is None) != (round_ is None):
        fail("--from-stage and --round go together", code=2)
    if from_stage is not None and from_stage not in STAGES:
        fail(f"--from-stage {from_stage!r}: choose one of {', '.join(STAGES)}", code=2)
    from flows.materialize import Plan
    from flows.preflight import PreflightError, check_run

    plan = Plan(from_stage, round_ or 0)
    try:
        check_run(cfg, cfg.rounds if rounds is None else rounds, plan)
    except PreflightError as err:
        fail(str(err), code=2)
    except Exception as err:  # a damaged store, found while reading what it holds
        if verbose:
            raise
        fail(_failure(err, cfg))
    _prefect_env(cfg.store, verbose)
    from flows import progress, stop
    from flows.iterate import experiment_flow
    from flows.report import write_report

    progress.use(progress.RichReporter())
    try:
        summaries = stop.run_stoppable(lambda: experiment_flow(cfg, rounds, plan), stop.resume_command())
    except Exception as err:  # a failed stage is recorded in stage_runs; show its message, not a traceback
        if verbose:
            raise
        fail(_failure(err, cfg))
    _print_rounds(summaries, cfg.store, cfg.name)
    png, md = write_report(cfg.store)
    typer.echo(f"report: {png}\n        {md}")


def _failure(err: Exception, cfg) -> str:
    """What went wrong in one message that names the fix; the exception's type only where it is not ours."""
    from flows import preflight
    from flows.launch import user_errors
    from storage.tables import DataFileMissing

    where = f"see `asymre status {cfg.name}`; rerun with -v for the traceback"
    full = preflight.disk_full(err)
    if full:
        return preflight.disk_full_message(cfg.store, cfg.name, full)
    if isinstance(err, DataFileMissing):
        return f"{err}: {preflight.rebuild_hint(err.table, err.partition)}"
    if isinstance(err, user_errors()):
        return f"{err}\n({where})"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}\n({where})"


def _print_rounds(summaries: list[dict], store: str, experiment: str) -> None:
    from flows.iterate import start_line

    start = start_line(store, experiment)
    if start is not None:
        typer.echo(start)
        typer.echo("round k: μ_k's samples, checkpoint k+1's test accuracy, its own seconds (s)")
    typer.echo(
        f"{'round':>5} {'train reward':>12} {'test greedy':>11} {'test T=1':>9} {'p':>6} {'p~':>6} {'steps':>5} {'s':>6}"
    )
    for s in summaries:
        cells = [s.get(c) for c in ("mean_reward", "test_greedy", "test_sampled", "p", "p_eff")]
        t = ["   –" if v is None else f"{v:.3f}" for v in cells]
        typer.echo(
            f"{s['round']:>5} {t[0]:>12} {t[1]:>11} {t[2]:>9} {t[3]:>6} {t[4]:>6} {s.get('steps', 0):>5} {s['seconds']:>6.1f}"
        )


@app.command()
def status(
    experiment: Annotated[str | None, typer.Argument(help="experiment (default: every experiment)")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="add a line per round with each stage's stage_key")] = False,
    store: StoreOpt = None,
) -> None:
    """Rounds × stages: rows written and wall time of each stage's last finished run (--keys: its stage_key)."""
    import polars as pl

    from flows.pipeline import PIPELINE, STAGES
    from flows.progress import duration
    from storage.lineage import runs
    from storage.tables import resolve_store

    def count(n: int) -> str:  # at most 4 characters
        return str(n) if n < 10_000 else f"{n // 1000}k" if n < 1_000_000 else f"{n / 1e6:.1f}M"

    root = resolve_store(store)
    done = runs(root, experiment).filter(pl.col("status").is_in(["done", "failed"]))
    if done.is_empty():
        typer.echo(f"no stage runs in {root}" + (f" for experiment {experiment}" if experiment else ""))
        return
    # Columns are the stages (what --from-stage names), each over the table its rows count (train: train_steps,
    # not its one checkpoint); one compact cell each, so that eight stages fit 100 columns.
    counted = {name: stage.writes[-1] for name, stage in PIPELINE.items()}
    width = {name: max(len(name), len(counted[name]), 9) for name in STAGES}
    typer.echo("round k × stage: rows written and wall time of its last finished run (eval k: checkpoint k's)")
    last = done.group_by("experiment", "round", "stage").agg(pl.all().sort_by("created_at").last())
    for (name,), rows in last.sort("experiment").group_by("experiment", maintain_order=True):
        typer.echo(f"\nexperiment {name}")
        typer.echo(("stage  " + "  ".join(f"{s:<{width[s]}}" for s in STAGES)).rstrip())
        typer.echo(("table  " + "  ".join(f"{counted[s]:<{width[s]}}" for s in STAGES)).rstrip())
        by_cell = {(r["round"], r["stage"]): r for r in rows.iter_rows(named=True)}
        failed = []
        for k in sorted(rows["round"].unique().to_list()):
            cells, key_cells = [], []
            for stage in STAGES:
                r = by_cell.get((k, stage))
                if r is None:
                    cell, key = "·", ""
                elif r["status"] == "done":
                    cell, key = f"{count(r['rows'])} {duration(r['wall_s'])}", r["stage_key"][:8]
                else:
                    cell, key = "FAILED", r["stage_key"][:8]
                    why = (r["message"] or "").strip().splitlines() or ["(no message)"]
                    failed.append(f"round {k} {stage} failed: {why[0]}")
                cells.append(f"{cell:<{width[stage]}}")
                key_cells.append(f"{key:<{width[stage]}}")
            typer.echo(f"{k:>5}  " + "  ".join(cells).rstrip())
            if keys:
                typer.echo(f"{'key':>5}  " + "  ".join(key_cells).rstrip())
        for line in failed:
            typer.echo(line[:100])


@app.command()
def report(
    experiments: Annotated[str | None, typer.Option(help="comma-separated experiments (default: all)")] = None,
    name: Annotated[str, typer.Option(help="file name of the report under <store>/reports/")] = "report",
    store: StoreOpt = None,
) -> None:
    """Plot test accuracy and mean reward by round, one line per experiment, and write a Markdown summary."""
    from flows.report import write_report
    from storage.tables import resolve_store

    chosen = [e.strip() for e in experiments.split(",")] if experiments else None
    png, md = write_report(resolve_store(store), chosen, name)
    typer.echo(f"report: {png}\n        {md}")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Argument(help="experiment YAML")] = None,
    cron: Annotated[str | None, typer.Option(help="cron expression, e.g. '0 */6 * * *'")] = None,
    interval: Annotated[float | None, typer.Option(help="seconds between rounds")] = None,
    sets: Annotated[list[str], typer.Option("--set", help="section.field=value; repeatable")] = [],  # noqa: B006
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Prefect's INFO logs")] = False,
    work_pool: Annotated[
        str | None,
        typer.Option(
            "--work-pool",
            help="register the deployment on this process work pool (created if missing) and exit: "
            "`prefect worker start --pool NAME` on each GPU machine runs it (--cron/--interval optional)",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Serve a Prefect deployment that runs the next round of the experiment on a schedule; one line per round.
    With --work-pool: register it on a work pool whose workers run it, and exit."""
    import os
    import urllib.request

    if work_pool is None and (cron is None) == (interval is None):
        fail("give exactly one of --cron EXPR or --interval SECONDS (or --work-pool NAME)")
    if cron is not None and interval is not None:
        fail("give at most one of --cron EXPR or --interval SECONDS")
    cfg = _load(config, sets, store)
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    url = os.environ["PREFECT_API_URL"].rstrip("/")
    try:
        urllib.request.urlopen(f"{url}/health", timeout=5)
    except OSError:
        fail(f"no Prefect server answers at {url}; start one with `prefect server start` (or set PREFECT_API_URL)")
    if work_pool is not None:
        _register_on_pool(config, sets, cfg, work_pool, cron, interval, url)
        return
    if not verbose:  # warnings and a failed round's traceback stay; the per-run INFO stream goes
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    _prefect_env(cfg.store, verbose)
    from flows.serve import SKIPS
    from flows.serve import serve as serve_deployment

    config_path = str(config.resolve()) if config else None
    deployment = f"asymre-next-round/{cfg.name}"
    when = f"on cron {cron!r}" if cron else f"every {interval:g} s"
    typer.echo(
        f"serving {deployment} on {url}: one round {when}; {SKIPS}.\n"
        f"a line per finished round below; run one now: prefect deployment run '{deployment}'; stop: Ctrl-C or SIGTERM"
    )
    stopped_by = serve_deployment(config_path, [*sets], cfg.store, cfg.name, cron, interval)
    typer.echo(f"stopped by {stopped_by or 'the runner'}: a round in progress is cancelled and the next run resumes it")


def _register_on_pool(config: Path | None, sets: list[str], cfg, pool: str, cron, interval, url: str) -> None:
    """`serve --work-pool`: register the deployment and say how to run it. Its parameters (config path, --set
    values, store) are stored on the server and read by every worker, so they must hold no credentials."""
    import os
    from urllib.parse import urlsplit

    if "://" in cfg.store and (urlsplit(cfg.store).username or urlsplit(cfg.store).password):
        fail(
            f"store {cfg.store.split('://')[0]}://…@…: credentials in the store URL would be stored in the "
            "deployment; give s3://bucket/prefix and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY on each worker",
            code=2,
        )
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.serve import QUEUES, PoolError, experiment_limit, register

    config_path = str(config.resolve()) if config else None
    try:
        created = register(config_path, [*sets], cfg.store, cfg.name, pool, cron, interval)
    except PoolError as err:
        fail(str(err), code=2)
    deployment = f"asymre-next-round/{cfg.name}"
    when = f"on cron {cron!r}" if cron else f"every {interval:g} s" if interval else "when triggered"
    shared = "" if "://" in cfg.store else " (a local path: every worker must see it there, e.g. a shared file system)"
    typer.echo(
        f"{'created process work pool ' + repr(pool) + ' and ' if created else ''}registered {deployment} on work "
        f"pool {pool!r} at {url}: one round {when}; {QUEUES}.\n"
        f"rounds of {cfg.name} never overlap (concurrency limit {experiment_limit(cfg.name)}, 1 slot) and each machine "
        f"runs one round at a time (asymre-worker-<host>, 1 slot).\n"
        f"workers read config {config_path or '(built-in default)'} and store {cfg.store}{shared}; "
        f"AWS credentials come from each worker's environment.\n"
        f"on each GPU machine: PREFECT_API_URL={url} prefect worker start --pool {pool}\n"
        f"run a round now: prefect deployment run '{deployment}'"
    )


@app.command("bandit")
def bandit_study(
    seed: Annotated[int, typer.Option(help="seed of the reward draw")] = 0,
    arms: Annotated[int, typer.Option(help="number of arms")] = 100,
    grid: Annotated[int, typer.Option(help="values of V on the grid V^μ − 1 … V^μ + 0.3")] = 41,
    rounds: Annotated[int, typer.Option(help="policy-iteration rounds")] = 40,
    steps: Annotated[int, typer.Option(help="gradient steps per round")] = 500,
    batch: Annotated[int, typer.Option(help="batch size of the sampled-gradient variant")] = 32,
    store: StoreOpt = None,
) -> None:
    """The AsymRE bandit study (paper §5.1): limit policies over V and policy iteration, with figures."""
    from storage.tables import resolve_store

    root = resolve_store(store)
    _prefect_env(root)
    from flows.bandit import bandit_flow

    s = bandit_flow(root, seed, arms, grid, rounds, steps, batch)
    typer.echo(f"bandit study {s['experiment']} (tables bandit_limits, bandit_iterations)")
    for key, value in s.items():
        if key not in ("experiment", "figures"):
            typer.echo(f"  {key:<30} {value:.4f}" if isinstance(value, float) else f"  {key:<30} {value}")
    typer.echo("figures:\n  " + "\n  ".join(s["figures"]))


data_app = typer.Typer(no_args_is_help=True, help="Generate data sets that `prompts.source` can read.")
app.add_typer(data_app, name="data")


@data_app.command("word-problems")
def word_problems_data(
    out: Annotated[Path, typer.Option("--out", help="file to write: .parquet, or .jsonl for JSON lines")],
    train: Annotated[int, typer.Option("--train", help="training problems")] = 2000,
    test: Annotated[int, typer.Option("--test", help="test problems (drawn first, none in train)")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="seed of the draw")] = 0,
) -> None:
    """GSM8K-form word problems (question, answer ending in '#### n') in one file with a `split` column."""
    from stages.wordproblems import word_problems

    if train < 1 or test < 1:
        fail(f"--train {train} --test {test}: give at least 1 problem for each split", 2)
    if out.suffix not in (".parquet", ".jsonl"):
        fail(f"--out {out}: give a path ending in .parquet or .jsonl", 2)
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file path in it, e.g. {out / 'word-problems.parquet'}", 2)
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not folder.is_dir():
        fail(f"--out {out}: {folder} is a file, not a folder; give a path in a folder", 2)
    try:
        frame = word_problems(train, test, seed)
    except ValueError as err:
        fail(str(err), 2)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".parquet":
            frame.write_parquet(out)
        else:
            frame.write_ndjson(out)
    except OSError as err:
        why = f"{err.strerror}: {err.filename}" if err.strerror else str(err).splitlines()[0]
        fail(f"--out {out}: cannot write there ({why}); give a path in a writable folder", 2)
    typer.echo(f"word problems: {train} train, {test} test rows (seed {seed}) -> {out}")


@app.command()
def check(store: StoreOpt = None) -> None:
    """Verify the whole store: tables and their data files, checkpoint hashes, sql/checks, lineage; exit 1 on any problem."""
    from flows.pipeline import PIPELINE
    from storage.doctor import check_store
    from storage.tables import holds_tables, resolve_store

    root = resolve_store(store)
    if not holds_tables(root):  # not existing_tables(): that opens them, and one may be damaged
        fail(f"store {root} holds no tables (a mistyped --store?)")
    report = check_store(root, {name: stage.writes[0] for name, stage in PIPELINE.items()})
    for problem in report.problems:
        typer.echo(str(problem))
    typer.echo(f"store {root}: {report.summary()}")
    if report.problems:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
