"""Write the commands that reproduce the DFP paper's 12-task table (arXiv 2605.07727, Table 1): 1M offline +
1M online steps, 5 seeds per task, the paper's per-benchmark hyperparameters (the script's defaults), and
OGBench's 1.1.2 success timing ('post') as the paper ran. Meant for a GPU cluster: 60 runs of ~1-2 days each.

    python benchmarks/dfp_paper_commands.py > dfp_paper_table.sh     # one command per line
    python benchmarks/dfp_paper_commands.py --lambda-topk 0          # the "w/o L_topK" row

Data: Robomimic MH low_dim_v15.hdf5 files in ~/.robomimic/{task}/mh/ and the official OGBench files in
~/.ogbench/data (python make_datasets.py download --name cube-triple-play-v0, ...). Deviation: the paper's
cube-quadruple runs use the 100M-transition dataset as rotating 1M shards; this repository loads the standard
5M cube-quadruple-play-v0 file instead (no shard rotation), so expect lower quadruple numbers.
"""

from dataclasses import dataclass

import tyro


@dataclass
class Args:
    seeds: int = 5
    """seeds per task (the paper: 5)"""
    lambda_topk: float = 0.5
    """0 gives the paper's "DFP w/o L_topK" row"""
    cuda: bool = True
    """run on the GPU"""


TASKS = ["lift", "square", "can"] + [f"cube-{n}-play-singletask-task{t}-v0" for n in ("double", "triple", "quadruple")
                                     for t in (2, 3, 4)]

if __name__ == "__main__":
    args = tyro.cli(Args)
    for task in TASKS:
        extra = "" if task in ("lift", "square", "can") else " --success-timing post"
        for seed in range(1, args.seeds + 1):
            print(f"python dfp_offline_to_online.py --env-id {task} --seed {seed} --offline-steps 1000000 "
                  f"--online-steps 1000000 --lambda-topk {args.lambda_topk} --eval-every 100000 --eval-episodes 50 "
                  f"--final-eval-episodes 100{extra}{'' if args.cuda else ' --no-cuda'}")
