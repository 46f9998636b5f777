"""The report of a store: test accuracy and mean reward by round (one line per experiment) as a PNG,
and a short Markdown summary, both under <store>/reports/. The summary says where an experiment's rounds
were computed with different configs (`--from-stage … --set …` rewrites an experiment in place)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from storage import lineage
from storage.catalog import connect
from storage.object_store import local_root, publish
from storage.sql import query
from storage.tables import resolve_store

_CURVES = """
with rewards_by_round as (
    select experiment, round, avg(reward) as mean_reward, avg((outcome = 'correct')::int) as train_accuracy
    from rewards group by all
),
final as (
    select
        e.experiment, e.round, e.greedy_accuracy, e.sampled_accuracy,
        r.mean_reward, r.train_accuracy
    from eval_summary as e
    left join rewards_by_round as r using (experiment, round)
)
select * from final order by experiment, round
"""


def curves(store: str, experiments: list[str] | None = None) -> pl.DataFrame:
    """Per experiment and checkpoint k: test accuracy of μ_k and the reward of its own samples (round k)."""
    frame = query(connect(store), _CURVES)
    return frame.filter(pl.col("experiment").is_in(experiments)) if experiments else frame


def write_report(store: str, experiments: list[str] | None = None, name: str = "report") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = local_root(resolve_store(store)) / "reports"  # a store on S3: written here, then uploaded
    root.mkdir(parents=True, exist_ok=True)
    data = curves(store, experiments)
    changes = {e: config_changes(store, e) for e in data["experiment"].unique().to_list()}
    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (experiment,), rows in data.group_by("experiment", maintain_order=True):
        mixed = f", config changes at round {changes[experiment][0]['round']}" if changes[experiment] else ""
        label = f"{experiment} (greedy{mixed})"
        line = acc_ax.plot(rows["round"], rows["greedy_accuracy"], marker="o", label=label)[0]
        if rows["sampled_accuracy"].drop_nulls().len():
            acc_ax.plot(rows["round"], rows["sampled_accuracy"], ls="--", color=line.get_color(), alpha=0.7)
        measured = rows.filter(pl.col("mean_reward").is_not_null())
        reward_ax.plot(measured["round"], measured["mean_reward"], marker="o", color=line.get_color(), label=experiment)
    acc_ax.set(
        xlabel="checkpoint k (after k rounds)", ylabel="test accuracy", title="Test accuracy (solid greedy, dashed T=1)"
    )
    reward_ax.set(xlabel="round k", ylabel="mean reward of μ_k's samples", title="Mean train reward (behaviour policy)")
    for ax in (acc_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = root / f"{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    md = root / f"{name}.md"
    md.write_text(_markdown(data, png.name, changes))
    publish(resolve_store(store), [png, md], "reports")
    return png, md


def config_changes(store: str, experiment: str) -> list[dict[str, Any]]:
    """The config fields whose value in some stored round differs from round 0's, from stage_runs: for each
    stage and round the last 'done' run, the one whose rows the tables hold (a 'skipped' run records the
    config it was asked for, not the one its stored rows were computed with), against the same stage's run
    in its first round. One entry per (field, value in round 0, other value): the rounds that hold the
    other value and where it first appears, {field, before, after, rounds, round, stage}, by first round."""
    done = lineage.runs(store, experiment).filter(pl.col("status") == "done")
    if done.is_empty():
        return []
    last = done.group_by("round", "stage").agg(pl.all().sort_by("created_at").last()).sort("created_at")
    first: dict[str, dict] = {}
    for row in last.sort("round", "created_at").iter_rows(named=True):
        first.setdefault(row["stage"], _flat(json.loads(row["config"])))
    found: dict[tuple, dict[str, Any]] = {}
    for row in last.iter_rows(named=True):  # in the order they ran: the first one seen introduced a change
        # the evaluation of checkpoint k closes round k − 1 (checkpoint 0's opens round 0)
        k = max(row["round"] - 1, 0) if row["stage"] == "eval" else row["round"]
        config, base = _flat(json.loads(row["config"])), first[row["stage"]]
        for field in sorted(config.keys() | base.keys()):
            if config.get(field) != base.get(field):
                change = found.setdefault(
                    (field, _value(base.get(field)), _value(config.get(field))),
                    {"round": k, "stage": row["stage"], "rounds": set()},
                )
                change["rounds"].add(k)
                if k < change["round"]:
                    change["round"], change["stage"] = k, row["stage"]
    changes = [
        {"field": field, "before": before, "after": after, **where, "rounds": sorted(where["rounds"])}
        for (field, before, after), where in found.items()
    ]
    return sorted(changes, key=lambda c: (c["round"], c["field"]))


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"advantage": {"delta_v": -0.1}} → {"advantage.delta_v": -0.1}."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _value(v: Any) -> str:
    return "(unset)" if v is None else v if isinstance(v, str) else json.dumps(v)


def _spans(rounds: list[int]) -> str:
    """[3, 4, 5, 8] → "rounds 3–5, 8"."""
    spans: list[list[int]] = []
    for k in rounds:
        if spans and k == spans[-1][1] + 1:
            spans[-1][1] = k
        else:
            spans.append([k, k])
    text = ", ".join(f"{a}–{b}" if b > a else f"{a}" for a, b in spans)
    return f"round {text}" if len(rounds) == 1 else f"rounds {text}"


def _change_lines(changes: list[dict[str, Any]]) -> list[str]:
    if not changes:
        return []
    lines = [
        "**Not one config throughout.** These rounds were computed with a config other than round 0's "
        "(stage_runs: the run of each stage whose rows the tables hold), so the curve mixes them; a change "
        "in round k shows from checkpoint k+1 on:",
        "",
    ]
    for c in changes:
        since = f"--from-stage {c['stage']} --round {c['round']}"
        lines.append(
            f"- {_spans(c['rounds'])}: `{c['field']}` {c['before']} → {c['after']} "
            f"(from stage {c['stage']} of round {c['round']} on, as `{since}` recomputes)"
        )
    return [*lines, ""]


def _markdown(data: pl.DataFrame, png: str, changes: dict[str, list[dict[str, Any]]] | None = None) -> str:
    lines = ["# asymre report", "", f"![test accuracy and reward by round]({png})", ""]
    for (experiment,), rows in data.group_by("experiment", maintain_order=True):
        first, last = rows.row(0, named=True), rows.row(-1, named=True)
        lines += [
            f"## {experiment}",
            "",
            f"Greedy test accuracy {_pct(first['greedy_accuracy'])} at checkpoint 0 → "
            f"{_pct(last['greedy_accuracy'])} at checkpoint {last['round']}.",
            "",
            *_change_lines((changes or {}).get(experiment, [])),
            "| k | greedy acc | sampled acc | mean reward of μ_k |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['round']} | {_pct(r['greedy_accuracy'])} | {_pct(r['sampled_accuracy'])} | {_num(r['mean_reward'])} |"
            for r in rows.iter_rows(named=True)
        ]
        lines.append("")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"
