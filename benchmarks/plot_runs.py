"""Learning curves from TensorBoard runs: eval/success_rate against step, one line per run, to a PNG.

    python benchmarks/plot_runs.py --runs runs/lift__dfp_lambda0.5__1__* runs/lift__dfp_lambda0__1__* \
        --labels "DFP" "DFP w/o L_topK" --switch 10000 --out benchmarks/results/dfp_lift.png

Also writes the points to a CSV next to the PNG, so the figure regenerates from committed data
(`--from-csv`).
"""

import csv
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """run directories (TensorBoard event files inside)"""
    labels: Optional[list[str]] = None
    """one legend label per run (default: the run directory names)"""
    tag: str = "eval/success_rate"
    """scalar to plot"""
    xlabel: str = "step"
    """x-axis label (DBPO logs its evaluations by iteration)"""
    switch: Optional[int] = None
    """draw a vertical line here (DFP: the offline-to-online switch, = --offline-steps)"""
    title: str = ""
    """figure title"""
    out: str = "benchmarks/results/curves.png"
    """output PNG; the CSV goes to the same path with .csv"""
    from_csv: bool = False
    """re-plot from the CSV next to --out instead of reading runs"""


def read_scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        raise SystemExit(f"error: {run_dir} has no scalar {tag!r}; it has {sorted(acc.Tags()['scalars'])}")
    return [(e.step, e.value) for e in acc.Scalars(tag)]


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = tyro.cli(Args)
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    if args.from_csv:
        curves: dict[str, list[tuple[int, float]]] = {}
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                curves.setdefault(row["label"], []).append((int(row["step"]), float(row["value"])))
    else:
        labels = args.labels or [os.path.basename(r.rstrip("/")) for r in args.runs]
        if len(labels) != len(args.runs):
            raise SystemExit(f"error: {len(args.runs)} runs but {len(labels)} labels")
        curves = {label: read_scalars(run, args.tag) for label, run in zip(labels, args.runs)}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "step", "value"])
            for label, points in curves.items():
                w.writerows([label, s, v] for s, v in points)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=label)
    if args.switch is not None:
        ax.axvline(args.switch, color="gray", linestyle="--", linewidth=1)
        ax.text(args.switch, 0.02, " online", color="gray")
    ax.set(xlabel=args.xlabel, ylabel=args.tag.split("/")[-1].replace("_", " "), ylim=(-0.02, 1.02), title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} and {csv_path}")
