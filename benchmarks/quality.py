"""Success at an equal training budget: DBP (dbp_bc.py) against Diffusion Policy (baselines/diffusion_bc.py with
100 DDPM steps, and with 10 DDIM steps) and the MSE regressor (dbp_bc.py --loss mse), on lift and can, 3 seeds.

    python benchmarks/quality.py --dry-run                  # print the 24 commands
    python benchmarks/quality.py                             # run them one after another (hours on 2 CPU cores)
    python benchmarks/quality.py --tasks lift --seeds 1 --total-steps 2000 --eval-episodes 10   # a quick look
    python benchmarks/quality.py --plot-only                 # table and plot again from results/quality.csv

The benchmark resumes: a run whose row is already in quality.csv with the same settings (steps, batch, network,
learning rate, episodes, dataset) and exit code 0 is kept and not run again, so the table can be filled over several
sittings, seed by seed (--fresh starts over).

Equal budget: every run gets the same dataset (the default file of each task, or --dataset-path), the same
optimiser steps, batch (observations per step), backbone, learning rate and schedule, EMA, chunking (the
scripts' defaults: To = 1, H = Ta = 4) and evaluation schedule. DBP's batch also runs its G = 4 generated chunks
per observation through the network; diffusion runs one noised chunk per observation. The sampler only acts at
inference, so the two diffusion methods train the same way.
Metrics (the scripts' own final evaluation, `--eval-episodes` episodes each, from the same seeds for every method
and seed: common.EVAL_SEED_OFFSET + 50000 on, never seen by the periodic evaluations):
    final_success   the final EMA weights
    best_success    the checkpoint with the best periodic evaluation (every --eval-every steps), re-evaluated
    best_periodic   that best periodic success itself (optimistic: selected on the same episodes)
    wall_s          wall-clock of the whole run: training and every evaluation
    train_sps       optimiser steps per second before the first evaluation (TensorBoard charts/SPS)
Rows go to benchmarks/results/quality.csv as runs finish; the summary (mean +- std over seeds, numpy's ddof = 0)
to quality_summary.md and quality.png. Each run's output is kept in {work_dir}/runs/quality_logs/.
Runs use --threads torch threads (OMP_NUM_THREADS): with a second thread on a busy 2-core machine torch slows down.
"""

import csv
import glob
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    threads: int = 1
    """torch threads per run (OMP_NUM_THREADS)"""
    jobs: int = 1
    """runs at the same time (keep 1 on a 2-core machine: each run also has --num-eval-envs env processes)"""
    work_dir: str = "."
    """where the runs write runs/{run_name}/ (checkpoints, TensorBoard) and runs/quality_logs/"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """where quality.csv, quality_summary.md and quality.png go"""
    dry_run: bool = False
    """print the commands and exit"""
    plot_only: bool = False
    """rebuild the summary and the plot from results_dir/quality.csv, without running anything"""
    fresh: bool = False
    """ignore the rows already in quality.csv (default: keep the finished runs with the same settings, run the rest)"""


def settings(args, task):
    """The settings a finished run in quality.csv must share to be reused, as the CSV stores them."""
    dataset = os.path.abspath(args.dataset_path) if args.dataset_path else f"default ({task})"
    net = " ".join(map(str, args.hidden_dims if args.backbone == "mlp" else args.unet_dims))
    return dict(episodes=args.eval_episodes, total_steps=args.total_steps, batch_size=args.batch_size,
                backbone=args.backbone, net=net, learning_rate=args.learning_rate, dataset=dataset)


def command(args, task, method, seed):
    script, extra = METHODS[method]
    cmd = [sys.executable, os.path.join(ROOT, script), "--env-id", task, "--seed", str(seed),
           "--exp-name", f"quality_{method}", "--total-steps", str(args.total_steps),
           "--batch-size", str(args.batch_size), "--backbone", args.backbone,
           "--hidden-dims", *map(str, args.hidden_dims), "--unet-dims", *map(str, args.unet_dims),
           "--learning-rate", str(args.learning_rate), "--eval-every", str(args.eval_every),
           "--eval-episodes", str(args.eval_episodes), "--final-eval-episodes", str(args.eval_episodes),
           "--num-eval-envs", str(args.num_eval_envs), *extra]
    return cmd + (["--dataset-path", os.path.abspath(args.dataset_path)] if args.dataset_path else [])


def train_sps(run_dir, first_eval_step):
    """charts/SPS logged before the first evaluation: training throughput without evaluation time (nan if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/SPS" not in acc.Tags()["scalars"]:
        return float("nan")
    before = [e.value for e in acc.Scalars("charts/SPS") if e.step < first_eval_step]
    return before[-1] if before else float("nan")


def run_one(args, task, method, seed):
    cmd = command(args, task, method, seed)
    log_dir = os.path.join(args.work_dir, "runs", "quality_logs")
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.time()
    proc = subprocess.run(cmd, cwd=args.work_dir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    with open(os.path.join(log_dir, f"{task}__{method}__{seed}.log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    final = re.search(r"^final checkpoint: success ([\d.]+) over (\d+) episodes", proc.stdout, re.M)
    best = re.search(r"^best checkpoint: success ([\d.]+)", proc.stdout, re.M)
    periodic = [float(s) for s in re.findall(r"^step \d+: success ([\d.]+) over", proc.stdout, re.M)]
    # The run directory: runs/{task}__quality_{method}__{seed}__{unix time}, started after this launch.
    dirs = [d for d in glob.glob(os.path.join(args.work_dir, "runs", f"{task}__quality_{method}__{seed}__*"))
            if int(d.rsplit("__", 1)[1]) >= int(start)]
    run_dir = max(dirs, key=os.path.getmtime) if dirs else ""
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
    return dict(task=task, method=method, seed=seed, final_success=float(final[1]) if final else float("nan"),
                best_success=float(best[1]) if best else float("nan"),
                best_periodic=max(periodic, default=float("nan")), **settings(args, task), wall_s=round(wall, 1),
                train_sps=round(train_sps(run_dir, min(args.eval_every, args.total_steps)), 1) if run_dir else np.nan,
                returncode=proc.returncode, run_dir=os.path.relpath(run_dir, args.work_dir) if run_dir else "",
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
    args = tyro.cli(Args)
    csv_path = os.path.join(args.results_dir, "quality.csv")
    if args.plot_only:
        if not os.path.exists(csv_path):
            sys.exit(f"error: {csv_path} does not exist; run the benchmark first")
        with open(csv_path) as f:
            report(list(csv.DictReader(f)), args.results_dir)
        sys.exit(0)
    assert args.dataset_path is None or len(args.tasks) == 1, "--dataset-path belongs to one task: pass one --tasks"
    # Seed-major order: an interrupted benchmark has every task and method at its first seeds.
    jobs = [(task, method, seed) for seed in args.seeds for task in args.tasks for method in args.methods]
    if args.dry_run:
        print(f"# in {os.path.abspath(args.work_dir)}, {args.jobs} run(s) at a time:")
        for job in jobs:
            print(f"OMP_NUM_THREADS={args.threads} MKL_NUM_THREADS={args.threads} {shlex.join(command(args, *job))}")
        sys.exit(0)
    if args.dataset_path is None:  # create missing default datasets now, not in several runs at once
        sys.path.insert(0, ROOT)
        import common

        for task in args.tasks:
            common.load_dataset(task)
    os.makedirs(args.results_dir, exist_ok=True)
    rows, others = [], []  # finished runs of this benchmark kept from an earlier sitting; rows of other runs
    if os.path.exists(csv_path) and not args.fresh:
        with open(csv_path) as f:
            for r in csv.DictReader(f):
                if (r["task"], r["method"], int(r["seed"])) not in jobs:
                    others.append(r)  # another call's run: written back and summarised as it is
                elif r.get("returncode") == "0" and all(r.get(k) == str(v) for k, v in settings(args, r["task"]).items()):
                    rows.append(r)  # finished with these settings: kept, not run again (else it is run again)
        done = {(r["task"], r["method"], int(r["seed"])) for r in rows}
        jobs = [job for job in jobs if job not in done]
        print(f"resuming: {len(rows)} finished run(s) kept from {csv_path}, {len(jobs)} to run (--fresh: run all)")
    with ThreadPoolExecutor(args.jobs) as pool:
        for i, row in enumerate(pool.map(lambda job: run_one(args, *job), jobs)):
            rows.append(row)
            write_csv(others + rows, csv_path)  # after every run: an interrupted benchmark keeps what it finished
            print(f"[{i + 1}/{len(jobs)}] {row['task']} {row['method']} seed {row['seed']}: "
                  f"final {row['final_success']}, best {row['best_success']} ({row['wall_s']:.0f} s)", flush=True)
    report(others + rows, args.results_dir)  # the whole CSV, as --plot-only
