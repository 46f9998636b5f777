"""The report of a store: test accuracy and mean reward by round (one line per experiment) as a PNG,
and a short Markdown summary, both under <store>/reports/."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from storage.catalog import connect
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

    root = Path(resolve_store(store)) / "reports"
    root.mkdir(parents=True, exist_ok=True)
    data = curves(store, experiments)
    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (experiment,), rows in data.group_by("experiment", maintain_order=True):
        line = acc_ax.plot(rows["round"], rows["greedy_accuracy"], marker="o", label=f"{experiment} (greedy)")[0]
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
    md.write_text(_markdown(data, png.name))
    return png, md


def _markdown(data: pl.DataFrame, png: str) -> str:
    lines = ["# asymre report", "", f"![test accuracy and reward by round]({png})", ""]
    for (experiment,), rows in data.group_by("experiment", maintain_order=True):
        first, last = rows.row(0, named=True), rows.row(-1, named=True)
        lines += [
            f"## {experiment}",
            "",
            f"Greedy test accuracy {_pct(first['greedy_accuracy'])} at checkpoint 0 → "
            f"{_pct(last['greedy_accuracy'])} at checkpoint {last['round']}.",
            "",
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
