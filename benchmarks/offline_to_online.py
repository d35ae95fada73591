"""DFP against QC-FQL, QC-BFN and FQL, offline -> online: the grid of benchmarks/grids/offline_to_online.toml
(DFP, DFP --lambda-topk 0 on square, QC-FQL, QC-BFN = baselines/qc_fql.py --actor best-of-n, FQL = --horizon 1; lift,
can and square; --preset cpu, the same budget for every method), run through benchmarks/sweep.py, with a CSV of
the success at the switch and at the end of every run, a markdown table and the curves.

    python benchmarks/offline_to_online.py --dry-run                        # the commands
    python benchmarks/offline_to_online.py --jobs 2                          # the whole grid (many CPU-hours)
    python benchmarks/offline_to_online.py --tasks square --methods dfp qc-fql --seeds 1 2
    python benchmarks/offline_to_online.py --cluster slurm --wait            # the same grid as one Slurm job array
    python benchmarks/offline_to_online.py --plot-only                       # table and curves again

Resumes: a run whose run dir holds results.json is kept and not run again, an interrupted run continues from its
checkpoint, and the rows of other tasks, methods and seeds already in the CSV stay; so the table grows run by run.
Separate calls may run at once (one per task, say): each merges its rows into the CSV under a lock.

Data: each task trains on a generated Robomimic set (make_datasets.py robomimic), chosen so that the offline
policy lands between 10% and 70% success and the online phase has room to show itself. DATA holds each task's
recipe (demos, action noise, hesitation, labels); --data TASK=DEMOS,NOISE,HESITATE[,LABELS] replaces one. A
missing set is generated before any run starts (one at a time) into environments.DATA_DIR; the table names the recipes.

Outputs (in --results-dir): offline_to_online.csv (one row per run: switch_success = the evaluation at the
switch to online, final_success = the final evaluation, over final_episodes episodes; steps; last_eval_episodes =
the periodic evaluations' episodes; wall time; curve = the run's eval/success_rate as step:success pairs, so that
the table and the plot need no run directory), offline_to_online.md (mean +- std over seeds, numpy's ddof = 0, of
the switch, the final evaluation, the final one pooled with the periodic one of the same weights at the last step
(a less noisy estimate) and the gain; per task, data, --extra-flags and method: runs on different data or with
other flags are never averaged together, and such a run adds rows beside the old ones instead of replacing them)
and offline_to_online.png (eval/success_rate against the step, one panel per task, data and flags: the mean over
seeds, a band of +- one std, and the switch as a dashed line).
"""

import csv
import fcntl
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import tyro

import sweep

ROOT, common, environments = sweep.ROOT, sweep.common, sweep.environments
GRID = os.path.join(ROOT, "benchmarks", "grids", "offline_to_online.toml")
# task -> generated data recipe. The default set (200 demos, noise 0.1, hesitation 0.3) took DFP's CPU preset to
# 0.92 at the switch on lift, above the band, so these sets are smaller or noisier. Checked against the 10-70%
# band (switch_success): lift (DFP and QC-FQL 0.34, seed 1), can (DFP 0.18, QC-FQL 0.33, seed 1) and square (DFP
# 0.40 and 0.48, seeds 1 and 2, with its preset's temperatures; QC-FQL 0.02, below it). Replace a recipe with --data
# where it misses.
DATA = {"lift": dict(num_demos=20, noise=0.3, hesitate=0.3, labels="executed"),
        "can": dict(num_demos=50, noise=0.2, hesitate=0.3, labels="executed"),
        "square": dict(num_demos=200, noise=0.1, hesitate=0.3, labels="intended")}
# one colour per method; the table and the legends list methods in this order
COLORS = {"dfp": "C0", "dfp-no-topk": "C2", "qc-fql": "C1", "qc-bfn": "C3", "fql": "C4"}
FIELDS = ["task", "method", "seed", "switch_success", "final_success", "final_episodes", "gain", "steps",
          "last_eval_episodes",
          "offline_steps", "online_steps", "wall_s", "data", "extra_flags", "returncode", "run_dir", "command", "curve"]


@dataclass
class Launch(sweep.Launch):
    """benchmarks/sweep.py's launch options (every one of them), with the ones this benchmark documents restated"""

    cluster: Literal["local", "slurm"] = "local"
    """local: a process pool on this machine; slurm: one submitit job array (see docs/sweeps.md)"""
    jobs: int = 1
    """runs at the same time (each also starts its evaluation env processes; 2 on a 2-core machine)"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    work_dir: str = "."
    """where the runs write runs/{run_name}/ and runs/sweeps/o2o/"""
    dry_run: bool = False
    """print the commands and exit"""
    wait: bool = False
    """slurm: wait until the array has ended, then write the table"""


@dataclass
class Args:
    grid: str = GRID
    """grid file: methods, tasks, seeds and the common flags"""
    tasks: tuple[str, ...] = ()
    """tasks to run (default: the grid's)"""
    methods: tuple[str, ...] = ()
    """methods to run (default: the grid's: dfp, dfp-no-topk, qc-fql, qc-bfn, fql)"""
    seeds: tuple[int, ...] = ()
    """seeds of every method (default: the grid's)"""
    data: tuple[str, ...] = ()
    """replace a task's data recipe: TASK=DEMOS,NOISE,HESITATE[,LABELS], e.g. square=100,0.1,0.3,intended"""
    dataset_path: Optional[str] = None
    """one dataset file for every run instead of the recipes (only with a single --tasks)"""
    extra_flags: str = ""
    """flags appended to every run (a quick look: "--offline-steps 2000 --online-steps 2000")"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """where offline_to_online.csv, .md and .png go"""
    plot_only: bool = False
    """rebuild the table and the curves from the CSV and the run dirs it names, without running anything"""
    launch: tyro.conf.OmitArgPrefixes[Launch] = field(default_factory=Launch)
    """how the runs are launched (benchmarks/sweep.py)"""


def recipes(args) -> dict:
    out = {k: dict(v) for k, v in DATA.items()}
    for item in args.data:
        task, _, spec = item.partition("=")
        parts = spec.split(",")
        common.require(task in DATA and len(parts) in (3, 4), f"--data {item!r}: expected TASK=DEMOS,NOISE,HESITATE"
                       f"[,LABELS] with TASK one of {', '.join(DATA)}")
        try:
            out[task] = dict(num_demos=int(parts[0]), noise=float(parts[1]), hesitate=float(parts[2]),
                             labels=parts[3] if len(parts) == 4 else "executed")
        except ValueError:
            raise common.UserError(f"--data {item!r}: DEMOS is an integer, NOISE and HESITATE are numbers")
        common.require(out[task]["labels"] in ("executed", "intended"), f"--data {item!r}: LABELS is executed or intended")
    return out


def recipe_text(r: dict) -> str:
    return f"{r['num_demos']} demos, noise {r['noise']:g}, hesitate {r['hesitate']:g}, {r['labels']} labels"


def data_path(task: str, r: dict) -> str:
    return environments.generated_robomimic_path(task, r["num_demos"], r["noise"], r["hesitate"], r["labels"])


def grid(args):
    """(cells, {task: data description}) of this call."""
    import tomllib

    if not os.path.isfile(args.grid):
        raise common.UserError(f"grid file {args.grid} does not exist")
    with open(args.grid, "rb") as f:
        spec = tomllib.load(f)
    tasks = list(args.tasks or spec.get("env_ids", []))
    common.require(args.dataset_path is None or len(tasks) == 1, "--dataset-path belongs to one task: pass one --tasks")
    common.require(all(t in DATA for t in tasks), f"--tasks: this benchmark has recipes for {', '.join(DATA)} only")
    rec = recipes(args)
    data = {t: os.path.abspath(args.dataset_path) if args.dataset_path else data_path(t, rec[t]) for t in tasks}
    described = {t: f"{args.dataset_path}" if args.dataset_path else recipe_text(rec[t]) for t in tasks}
    spec["env_ids"] = tasks
    if args.seeds:
        spec["seeds"] = list(args.seeds)
    spec["flags"] = sweep._flag_list(spec.get("flags", []), args.grid) + sweep._flag_list(args.extra_flags, "--extra-flags")
    spec["env_flags"] = {**spec.get("env_flags", {}), **{t: ["--dataset-path", p] for t, p in data.items()}}
    spec.setdefault("name", "o2o")
    cells = sweep.grid_cells(spec, f"grid file {args.grid}")
    cells = [c for c in cells if c.env_id in tasks]  # methods with their own env ids keep only this call's tasks
    cells = sweep.select(cells, methods=args.methods)
    return cells, data, described


def ensure_data(data: dict, rec: dict, given: bool):
    """Generate the missing sets now, one at a time (not in several runs at once)."""
    import make_datasets

    for task, path in data.items():
        if given:
            common.require(os.path.exists(path), f"--dataset-path {path} does not exist")
        elif not os.path.exists(path):
            print(f"[data] generating {task}: {recipe_text(rec[task])} -> {path}", flush=True)
            r = rec[task]
            make_datasets.generate_robomimic(task, path, num_demos=r["num_demos"], noise=r["noise"],
                                             hesitate=r["hesitate"], labels=r["labels"])


def row_of(cell, collected, described, extra_flags, work_dir, launch):
    r, finished = collected, collected["status"] == "finished"
    run_dir = os.path.join(work_dir, r["run_dir"]) if r["run_dir"] else ""
    run_args = {}
    if run_dir and os.path.exists(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as f:
            run_args = json.load(f)
    number = lambda key: float(r[key]) if finished and r[key] not in ("", None) else float("nan")
    cmd = sweep.command(cell, launch)
    return dict(task=cell.env_id, method=cell.method, seed=cell.seed, switch_success=number("switch_success"),
                final_success=number("final_success"), final_episodes=r["final_episodes"],
                gain=round(number("final_success") - number("switch_success"), 4), steps=r["steps"],
                last_eval_episodes=run_args.get("eval_episodes", ""),
                offline_steps=run_args.get("offline_steps", ""), online_steps=run_args.get("online_steps", ""),
                wall_s=round(number("wall_time_s"), 1), data=described[cell.env_id], extra_flags=extra_flags,
                returncode=0 if finished else r.get("returncode", ""), run_dir=r["run_dir"],
                command=" ".join([os.path.relpath(cmd[1], ROOT), *cmd[2:]]))


def merge(old, new) -> list:
    """The CSV's rows after a call: the old rows of other settings, methods and seeds as they were, then the new."""
    key = lambda r: (*setting(r), r["method"], int(r["seed"]))
    keys = {key(r) for r in new}
    return [r for r in old if key(r) not in keys] + list(new)


def write_csv(rows, path):
    with open(path + ".tmp", "w", newline="") as f:  # whole or not at all: a reader never sees half a table
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def merge_into_csv(rows, args):
    """Read the CSV, merge this call's rows into it and redraw, holding a lock on the results folder: two calls
    that end at once (one per task, say) would otherwise each write the rows they read, and one would drop the
    other's."""
    os.makedirs(args.results_dir, exist_ok=True)
    csv_path = os.path.join(args.results_dir, "offline_to_online.csv")
    lock = os.open(args.results_dir, os.O_RDONLY)  # a directory can carry a flock on Linux: no stray lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = []
        if os.path.exists(csv_path):
            with open(csv_path) as f:
                old = list(csv.DictReader(f))
        report(merge(old, rows), args)
    finally:
        os.close(lock)  # closing releases the lock


def summarize(rows) -> str:
    def stat(values):
        v = np.array([float(x) for x in values], dtype=float)
        v = v[np.isfinite(v)]
        return f"{v.mean():.3f} +- {v.std():.3f}" if len(v) else "-"

    lines = ["| task | data | extra flags | method | runs | switch (offline) | final (online) | final, pooled | gain "
             "| final episodes | steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in groups(rows):  # runs on different data or with different flags are never averaged together
        for method in methods_of(rows, group):
            sub = [r for r in rows if setting(r) == group and r["method"] == method]
            ok = [r for r in sub if str(r["returncode"]) == "0"]
            runs = f"{len(ok)}" + (f" ({len(sub) - len(ok)} not finished)" if len(ok) < len(sub) else "")
            episodes = ", ".join(sorted({str(r["final_episodes"]) for r in ok})) or "-"
            steps = ", ".join(sorted({str(r["steps"]) for r in ok})) or "-"
            task, data, flags = group
            pools = [pooled(r) for r in ok]
            success = [stat(r[key] for r in ok) for key in ("switch_success", "final_success")]
            success += [stat(pools) if all(np.isfinite(pools)) else "-", stat(r["gain"] for r in ok)]
            lines.append(f"| {task} | {data} | {flags or '-'} | {method} | {runs} | {' | '.join(success)} | {episodes} "
                         f"| {steps} |")
    lines.append("\nswitch = the evaluation at the switch to online (the last offline one); final = the final "
                 "evaluation; final, pooled = the final evaluation and the periodic one at the last step (the same "
                 "weights), their episodes added up (- where a run has no evaluation at its last step); gain = final "
                 "- switch; mean +- std over seeds (ddof = 0).")
    return "\n".join(lines)


def pooled(row) -> float:
    """Success over the final evaluation and the periodic one at the run's last step together: the same weights,
    so one estimate over more episodes. nan where the run has no evaluation at its last step."""
    steps, values = parse_curve(row.get("curve"))
    last = dict(zip(steps, values)).get(int(row["steps"]))
    if last is None or not str(row.get("last_eval_episodes", "")).isdigit():
        return float("nan")
    n_last, n_final = int(row["last_eval_episodes"]), int(row["final_episodes"])
    return (n_last * last + n_final * float(row["final_success"])) / (n_last + n_final)


def setting(row) -> tuple:
    """What a run was trained on and with, besides its method and seed: (task, data, extra flags)."""
    return row["task"], row["data"], row.get("extra_flags") or ""


def groups(rows) -> list:
    """The settings of the rows, task by task (lift, can, square), each task's in order of first appearance: one
    table block and one plot panel each."""
    order = {task: i for i, task in enumerate(DATA)}
    return sorted(dict.fromkeys(setting(r) for r in rows), key=lambda group: order.get(group[0], len(order)))


def methods_of(rows, group) -> list:
    """The methods run in one setting, in COLORS' order (others after them, in order of first appearance)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if setting(r) == group))
    return sorted(methods, key=lambda m: list(COLORS).index(m) if m in COLORS else len(COLORS) + methods.index(m))


def curve(run_dir):
    """(steps, success) of eval/success_rate in a run's TensorBoard events ([] if none, or no such run dir)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(run_dir):
        return [], []
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "eval/success_rate" not in acc.Tags()["scalars"]:
        return [], []
    events = {e.step: e.value for e in acc.Scalars("eval/success_rate")}  # one value per step (a resumed run's last)
    steps = sorted(events)
    return steps, [events[s] for s in steps]


def fill_from_run_dirs(rows, work_dir):
    """Each row's curve ("step:success ...", from its run's events) and last_eval_episodes (from its args.json),
    where they are still empty: the CSV keeps them, so the table and the plot need no run directory (runs of
    another machine, or deleted ones)."""
    for r in rows:
        if not r.get("run_dir"):
            continue
        run_dir = os.path.join(work_dir, r["run_dir"])
        if not r.get("curve"):
            steps, values = curve(run_dir)
            r["curve"] = " ".join(f"{s}:{v:.4g}" for s, v in zip(steps, values))
        if not r.get("last_eval_episodes") and os.path.exists(os.path.join(run_dir, "args.json")):
            with open(os.path.join(run_dir, "args.json")) as f:
                r["last_eval_episodes"] = json.load(f).get("eval_episodes", "")


def parse_curve(text):
    pairs = [p.split(":") for p in (text or "").split()]
    return [int(s) for s, _ in pairs], [float(v) for _, v in pairs]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = groups(rows)
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)  # three panels a row
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.5 * n_cols, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, panels):
        switches = set()
        for method in methods_of(rows, group):
            runs = [r for r in rows if setting(r) == group and r["method"] == method and r["run_dir"]]
            curves = [parse_curve(r.get("curve")) for r in runs]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            common_steps = sorted(set.intersection(*(set(s) for s, _ in curves)))  # the steps every seed evaluated
            if not common_steps:
                continue
            values = np.array([[dict(zip(s, v))[t] for t in common_steps] for s, v in curves])
            mean, std = values.mean(0), values.std(0)
            seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
            line, = ax.plot(common_steps, mean, marker=".", color=COLORS.get(method), label=f"{method} ({seeds})")
            ax.fill_between(common_steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            switches |= {int(r["offline_steps"]) for r in runs if str(r["offline_steps"]).isdigit()}
        for s in switches:
            ax.axvline(s, color="k", ls="--", lw=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step (offline, then online after the dashed line)")
        ax.set_ylabel("success rate")
        ax.set_title(": ".join(filter(None, group)), fontsize=8)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows, args):
    base = os.path.join(args.results_dir, "offline_to_online")
    fill_from_run_dirs(rows, os.path.abspath(args.launch.work_dir))
    write_csv(rows, base + ".csv")
    table = summarize(rows)
    print("\n" + table)
    with open(base + ".md", "w") as f:
        f.write(table + "\n")
    plot(rows, base + ".png")
    print(f"wrote {base}.csv, {base}.md and {base}.png")


if __name__ == "__main__":
    args = tyro.cli(Args, args=sweep.join_flag_values(sys.argv[1:], ("--extra-flags", "--sbatch-extra")))
    csv_path = os.path.join(args.results_dir, "offline_to_online.csv")
    if args.plot_only:
        if not os.path.exists(csv_path):
            raise common.UserError(f"{csv_path} does not exist; run the benchmark first")
        merge_into_csv([], args)  # nothing new: redraw from the CSV alone
        sys.exit(0)
    cells, data, described = grid(args)
    if not args.launch.dry_run:
        ensure_data(data, recipes(args), given=args.dataset_path is not None)
    collected = sweep.launch_grid(cells, args.launch)
    if collected is None:  # a dry run, or submitted to Slurm without --wait
        if not args.launch.dry_run:
            print("when the jobs have ended, run the same command again: it keeps the finished runs and draws the table")
        sys.exit(0)
    work_dir = os.path.abspath(args.launch.work_dir)
    rows = [row_of(c, r, described, args.extra_flags, work_dir, args.launch) for c, r in zip(cells, collected)]
    merge_into_csv(rows, args)
