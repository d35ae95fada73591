"""Success at an equal training budget: DBP (dbp_bc.py) against Diffusion Policy (baselines/diffusion_bc.py with
100 DDPM steps, and with 10 DDIM steps) and the MSE regressor (dbp_bc.py --loss mse), on lift and can, 3 seeds.

    python benchmarks/quality.py --dry-run                  # print the 24 commands
    python benchmarks/quality.py                             # run them one after another (hours on 2 CPU cores)
    python benchmarks/quality.py --tasks lift --seeds 1 --total-steps 2000 --eval-episodes 10   # a quick look
    python benchmarks/quality.py --plot-only                 # table and plot again from results/quality.csv
    python benchmarks/quality.py --cluster slurm --gpus-per-run 1 --wait    # the same grid as one Slurm job array

The runs are launched by benchmarks/sweep.py (its options: --jobs, --threads, --work-dir, --dry-run, --cluster and
the Slurm ones; see docs/sweeps.md). The benchmark resumes: a run whose run dir holds results.json at the same
settings (steps, batch, network, learning rate, episodes, dataset: they are hashed into its exp name) is kept and
not run again, and an interrupted run continues from its checkpoint, so the table can be filled over several
sittings, seed by seed (--fresh starts every run over and drops the other rows of quality.csv).

Equal budget: every run gets the same dataset (the default file of each task, or --dataset-path), the same
optimiser steps, batch (observations per step), backbone, learning rate and schedule, EMA, chunking (the
scripts' defaults: To = 1, H = Ta = 4) and evaluation schedule. DBP's batch also runs its G = 4 generated chunks
per observation through the network; diffusion runs one noised chunk per observation. The sampler only acts at
inference, so the two diffusion methods train the same way.
Metrics (the scripts' own final evaluation, `--eval-episodes` episodes each, from the same seeds for every method
and seed: environments.EVAL_SEED_OFFSET + 50000 on, never seen by the periodic evaluations):
    final_success   the final EMA weights
    best_success    the checkpoint with the best periodic evaluation (every --eval-every steps), re-evaluated
    best_periodic   that best periodic success itself (optimistic: selected on the same episodes)
    wall_s          wall-clock of the whole run, training and every evaluation (results.json's wall_time_s)
    train_sps       optimiser steps per second before the first evaluation (TensorBoard charts/SPS)
Rows go to benchmarks/results/quality.csv when the runs have ended (rows of other tasks, methods and seeds already
there are kept); the summary (mean +- std over seeds, numpy's ddof = 0) to quality_summary.md and quality.png.
Each run's output is kept in {work_dir}/runs/sweeps/quality/logs/.
Runs use --threads torch threads (OMP_NUM_THREADS): with a second thread on a busy 2-core machine torch slows down.
"""

import csv
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import tyro

import sweep  # benchmarks/sweep.py: launches the runs, locally or on Slurm

ROOT = sweep.ROOT
common, environments = sweep.common, sweep.environments
# method -> (script, its extra flags)
METHODS = {
    "dbp": ("dbp_bc.py", []),
    "diffusion-ddpm100": ("baselines/diffusion_bc.py", ["--sampler", "ddpm", "--inference-steps", "100"]),
    "diffusion-ddim10": ("baselines/diffusion_bc.py", ["--sampler", "ddim", "--inference-steps", "10"]),
    "mse": ("dbp_bc.py", ["--loss", "mse"]),
}
FIELDS = ["task", "method", "seed", "final_success", "best_success", "best_periodic", "episodes", "total_steps",
          "batch_size", "backbone", "net", "learning_rate", "dataset", "wall_s", "train_sps", "returncode", "run_dir",
          "command"]


@dataclass
class Launch(sweep.Launch):
    """benchmarks/sweep.py's launch options (every one of them), with the ones this benchmark documents restated"""

    cluster: Literal["local", "slurm"] = "local"
    """local: a process pool on this machine; slurm: one submitit job array (see docs/sweeps.md)"""
    jobs: int = 1
    """runs at the same time (keep 1 on a 2-core machine: each run also has --num-eval-envs env processes)"""
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    work_dir: str = "."
    """where the runs write runs/{run_name}/ (checkpoints, TensorBoard) and runs/sweeps/quality/"""
    dry_run: bool = False
    """print the commands and exit"""


@dataclass
class Args:
    tasks: tuple[str, ...] = ("lift", "can")
    """tasks (env ids of the training scripts)"""
    methods: tuple[Literal["dbp", "diffusion-ddpm100", "diffusion-ddim10", "mse"], ...] = tuple(METHODS)
    """methods to run"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """training seeds"""
    total_steps: int = 20_000
    """optimiser steps of every run (the scripts' default)"""
    batch_size: int = 256
    """observations per batch of every run"""
    backbone: Literal["mlp", "unet"] = "mlp"
    """backbone of every run"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """MLP hidden sizes of every run"""
    unet_dims: tuple[int, ...] = (64, 128, 256)
    """U-Net channels of every run (with --backbone unet)"""
    learning_rate: float = 3e-4
    """AdamW learning rate of every run"""
    eval_every: int = 5_000
    """periodic evaluation (and best-checkpoint selection) interval"""
    eval_episodes: int = 50
    """episodes of every periodic and final evaluation"""
    num_eval_envs: int = 2
    """parallel evaluation envs per run"""
    dataset_path: Optional[str] = None
    """dataset file passed to every run (only with a single task); default: each task's default dataset"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """where quality.csv, quality_summary.md and quality.png go"""
    plot_only: bool = False
    """rebuild the summary and the plot from results_dir/quality.csv, without running anything"""
    fresh: bool = False
    """run every run again and drop the other rows of quality.csv (default: keep the finished runs, run the rest)"""
    launch: tyro.conf.OmitArgPrefixes[Launch] = field(default_factory=Launch)
    """how the runs are launched (benchmarks/sweep.py)"""


def settings(args, task):
    """The settings a finished run in quality.csv must share to be reused, as the CSV stores them."""
    dataset = os.path.abspath(args.dataset_path) if args.dataset_path else f"default ({task})"
    net = " ".join(map(str, args.hidden_dims if args.backbone == "mlp" else args.unet_dims))
    return dict(episodes=args.eval_episodes, total_steps=args.total_steps, batch_size=args.batch_size,
                backbone=args.backbone, net=net, learning_rate=args.learning_rate, dataset=dataset)


def cells(args):
    """The grid (task x method x seed, seed-major: an interrupted benchmark has every task and method at its first
    seeds) as benchmarks/sweep.py cells; the exp names hash the flags, so a run is reused only at these settings."""
    budget = ["--total-steps", str(args.total_steps), "--batch-size", str(args.batch_size), "--backbone", args.backbone,
              "--hidden-dims", *map(str, args.hidden_dims), "--unet-dims", *map(str, args.unet_dims),
              "--learning-rate", str(args.learning_rate), "--eval-every", str(args.eval_every),
              "--eval-episodes", str(args.eval_episodes), "--final-eval-episodes", str(args.eval_episodes),
              "--num-eval-envs", str(args.num_eval_envs)]
    data = ["--dataset-path", os.path.abspath(args.dataset_path)] if args.dataset_path else []
    methods = {m: {"script": METHODS[m][0], "flags": budget + METHODS[m][1] + data} for m in args.methods}
    return sweep.make_cells("quality", methods, args.tasks, args.seeds)


def tensorboard_figures(run_dir, first_eval_step):
    """(best periodic success, charts/SPS logged before the first evaluation: training throughput without evaluation
    time); nan where the run logged none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    periodic = [e.value for e in acc.Scalars("eval/success_rate")] if "eval/success_rate" in tags else []
    before = [e.value for e in acc.Scalars("charts/SPS") if e.step < first_eval_step] if "charts/SPS" in tags else []
    return max(periodic, default=float("nan")), before[-1] if before else float("nan")


def row_of(args, cell, collected):
    """quality.csv's row of one cell, from what sweep.py collected (results.json) and the run's TensorBoard events."""
    r, nan = collected, float("nan")
    finished = r["status"] == "finished"
    run_dir = os.path.join(args.launch.work_dir, r["run_dir"]) if r["run_dir"] else ""
    best_periodic, sps = tensorboard_figures(run_dir, min(args.eval_every, args.total_steps)) if run_dir else (nan, nan)
    number = lambda key: float(r[key]) if finished and r[key] not in ("", None) else nan
    cmd = sweep.command(cell, args.launch)
    return dict(task=cell.env_id, method=cell.method, seed=cell.seed, final_success=number("final_success"),
                best_success=number("best_success"), best_periodic=best_periodic, **settings(args, cell.env_id),
                wall_s=round(number("wall_time_s"), 1), train_sps=round(sps, 1),
                returncode=0 if finished else r.get("returncode", ""), run_dir=r["run_dir"],
                command=shlex.join([os.path.relpath(cmd[1], ROOT), *cmd[2:]]))  # the script relative to the repo


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows):
    """Markdown table: mean +- std over seeds per task and method (failed runs are counted, not averaged)."""
    lines = ["| task | method | runs | final success | best success | best periodic | wall s | train steps/s |",
             "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in [m for m in METHODS if any(r["task"] == task and r["method"] == m for r in rows)]:
            sub = [r for r in rows if r["task"] == task and r["method"] == method]
            ok = [r for r in sub if np.isfinite(float(r["final_success"]))]

            def stat(key, fmt="{:.3f}"):
                v = np.array([float(r[key]) for r in ok])
                return (fmt + " +- " + fmt).format(v.mean(), v.std()) if len(v) and np.isfinite(v).all() else "-"

            runs = f"{len(ok)}" + (f" ({len(sub) - len(ok)} failed)" if len(ok) < len(sub) else "")
            lines.append(f"| {task} | {method} | {runs} | {stat('final_success')} | {stat('best_success')} | "
                         f"{stat('best_periodic')} | {stat('wall_s', '{:.0f}')} | {stat('train_sps', '{:.0f}')} |")
    r = rows[0]
    lines.append(f"\n{r['total_steps']} steps, batch {r['batch_size']}, {r['backbone']} {r['net']}, "
                 f"lr {r['learning_rate']}; success over {r['episodes']} final-evaluation episodes per run; "
                 f"mean +- std over seeds (ddof = 0).")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = [m for m in METHODS if any(r["task"] == task and r["method"] == m for r in rows)]  # one order
        for j, (key, label) in enumerate((("final_success", "final"), ("best_success", "best"))):
            x = np.arange(len(methods)) + (j - 0.5) * 0.4
            values = [np.array([float(r[key]) for r in rows if r["task"] == task and r["method"] == m]) for m in methods]
            values = [v[np.isfinite(v)] for v in values]  # failed runs are left out
            means = [v.mean() if len(v) else 0.0 for v in values]
            ax.bar(x, means, 0.4, yerr=[v.std() if len(v) else 0.0 for v in values], capsize=3, label=label, alpha=0.8)
            for xi, v in zip(x, values):  # one dot per seed
                ax.plot(np.full(len(v), xi), v, "k.", ms=4)
        ax.set_xticks(np.arange(len(methods)), methods, rotation=15)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("success rate")
        ax.set_title(f"{task}: {rows[0]['total_steps']} steps, {rows[0]['episodes']} episodes")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows, results_dir):
    table = summarize(rows)
    print("\n" + table)
    with open(os.path.join(results_dir, "quality_summary.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(results_dir, "quality.png"))
    print(f"wrote {results_dir}/quality_summary.md and quality.png")


if __name__ == "__main__":
    args = tyro.cli(Args, args=sweep.join_flag_values(sys.argv[1:], ("--sbatch-extra",)))
    csv_path = os.path.join(args.results_dir, "quality.csv")
    if args.plot_only:
        if not os.path.exists(csv_path):
            raise common.UserError(f"{csv_path} does not exist; run the benchmark first")
        with open(csv_path) as f:
            report(list(csv.DictReader(f)), args.results_dir)
        sys.exit(0)
    common.require(args.dataset_path is None or len(args.tasks) == 1,
                   "--dataset-path belongs to one task: pass one --tasks")
    grid = cells(args)
    args.launch.rerun = args.launch.rerun or args.fresh
    if args.launch.dry_run:
        sweep.launch_grid(grid, args.launch)
        sys.exit(0)
    if args.dataset_path is None:  # create missing default datasets now, not in several runs at once
        for task in args.tasks:
            environments.load_dataset(task)
    os.makedirs(args.results_dir, exist_ok=True)
    others = []  # rows of the runs that are not this call's: written back and summarised as they are
    if os.path.exists(csv_path) and not args.fresh:
        keys = {(c.env_id, c.method, c.seed) for c in grid}
        with open(csv_path) as f:
            others = [r for r in csv.DictReader(f) if (r["task"], r["method"], int(r["seed"])) not in keys]
        done = sum(sweep.find_run(os.path.abspath(args.launch.work_dir), c)[0] == "finished" for c in grid)
        print(f"resuming: {done} finished run(s) kept (their run dirs hold results.json), {len(grid) - done} to run "
              f"(--fresh: run all)", flush=True)
    collected = sweep.launch_grid(grid, args.launch)
    if collected is None:  # submitted to Slurm without --wait
        print("when the jobs have ended, run the same command again: it keeps the finished runs and writes the table")
        sys.exit(0)
    rows = [row_of(args, c, r) for c, r in zip(grid, collected)]
    write_csv(others + rows, csv_path)
    for r in rows:
        if r["returncode"] != 0:
            print(f"not finished ({r['returncode']}): {r['command']}", flush=True)
    report(others + rows, args.results_dir)  # the whole CSV, as --plot-only
