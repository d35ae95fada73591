"""Print the commands of the DFP paper's 12-task table (arXiv 2605.07727, Table 1), one per line, from its grid
file benchmarks/grids/dfp_paper.toml (1M offline + 1M online steps, 5 seeds, the paper's per-benchmark settings).
The grid runs through benchmarks/sweep.py, locally or as one Slurm job array (docs/sweeps.md):

    python benchmarks/sweep.py benchmarks/grids/dfp_paper.toml --cluster slurm --gpus-per-run 1 --time-min 2880
    python benchmarks/dfp_paper_commands.py > dfp_paper_table.sh                  # DFP's 60 commands, for a script
    python benchmarks/dfp_paper_commands.py --methods dfp-no-topk qc-fql --seeds 2

Each command carries the grid's --exp-name, so sweep.py --collect finds its run whichever way it was started.
"""

import os
import shlex
import sys
from dataclasses import dataclass

import tyro

import sweep

GRID = os.path.join(sweep.ROOT, "benchmarks", "grids", "dfp_paper.toml")


@dataclass
class Args:
    methods: tuple[str, ...] = ("dfp",)
    """methods of the grid: dfp, dfp-no-topk (the paper's "DFP w/o L_topK" row), qc-fql, qc-bfn, fql"""
    seeds: int = 5
    """seeds per task: 1 .. seeds (the paper: 5)"""
    cuda: bool = True
    """run on the GPU (--no-cuda appends --no-cuda)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    sweep.common.require(1 <= args.seeds <= 5, f"--seeds must be 1 .. 5 (the grid's seeds), not {args.seeds}")
    _, cells = sweep.load_grid(GRID)
    cells = sweep.select(cells, seeds=range(1, args.seeds + 1), methods=args.methods)
    tasks = list(dict.fromkeys(c.env_id for c in cells))
    for cell in sorted(cells, key=lambda c: (args.methods.index(c.method), tasks.index(c.env_id), c.seed)):  # task-major
        cmd = sweep.command(cell, sweep.Launch())
        print(shlex.join(["python", cell.script, *cmd[2:]] + ([] if args.cuda else ["--no-cuda"])))
    sys.stdout.flush()
