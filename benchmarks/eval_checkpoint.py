"""Evaluate a saved checkpoint in simulation: success over N episodes on the evaluation seeds that the training
scripts use for their final evaluation (from environments.EVAL_SEED_OFFSET), so that a number here and a run's
final_success are measured on the same initial states.

    python benchmarks/eval_checkpoint.py runs/<run>/dfp.pt --episodes 100                 # as DFP acts: best of N'
    python benchmarks/eval_checkpoint.py runs/<run>/dfp.pt --episodes 100 --actor-only    # one actor sample, no critic
    python benchmarks/eval_checkpoint.py runs/<run>/qc_fql.pt --episodes 50 --actor-only  # the BC flow alone
    python benchmarks/eval_checkpoint.py runs/<run>/qc_fql.pt --action-steps 1            # replan every step

--actor-only is a diagnostic for the scripts that choose among samples with a critic or distil one policy from
another: DFP (one actor sample instead of the best of N' under the critic) and baselines/qc_fql.py (one sample of
the BC flow instead of the one-step policy or the best of N flow samples). It prints one JSON line.
"""

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import environments  # noqa: E402

# policy module -> the load_policy keyword that acts with the actor alone
ACTOR_ONLY = {"dfp_offline_to_online": {"best_of_n": False}, "baselines.qc_fql": {"flow_only": True}}


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """a checkpoint written by one of the training scripts (dbp.pt, dfp.pt, qc_fql.pt, ...)"""
    episodes: int = 100
    """evaluation episodes"""
    actor_only: bool = False
    """DFP and qc_fql.py only: act with one actor (or BC flow) sample, without the critic's choice or the distillation"""
    seed: int = environments.EVAL_SEED_OFFSET
    """first episode seed (default: the training scripts' final evaluation)"""
    num_envs: int = 2
    """parallel evaluation envs (subprocesses)"""
    action_steps: Optional[int] = None
    """execute the first k actions of each chunk, then ask again (default: the policy's n_action_steps); a smaller k
    tells whether a chunked policy fails for its open-loop execution or for what it learned"""
    max_episode_steps: Optional[int] = None
    """time limit (default: the one the run was evaluated with)"""
    threads: int = 1
    """torch CPU threads"""
    trust_checkpoint: bool = False
    """load files that are not weights-only (written by old versions): only from a source you trust"""


def main(argv=None):
    args = tyro.cli(Args, args=argv)
    common.require(os.path.isfile(args.checkpoint), f"checkpoint {args.checkpoint} does not exist: pass the path of a "
                                                    f"dfp.pt / qc_fql.pt / dbp.pt / ... file")
    common.require_positive(args, "episodes", "num_envs", "threads")
    import torch

    torch.set_num_threads(args.threads)
    ckpt = common.load_checkpoint(args.checkpoint, "cpu", args.trust_checkpoint)
    module = ckpt["policy_module"]
    common.require(not args.actor_only or module in ACTOR_ONLY,
                   f"--actor-only: {module} checkpoints have no such mode (only {', '.join(ACTOR_ONLY)}); drop the flag")
    policy = common.load_policy(args.checkpoint, trust=args.trust_checkpoint, **(ACTOR_ONLY[module] if args.actor_only else {}))
    steps = args.action_steps or policy.n_action_steps
    common.require(1 <= steps <= policy.n_action_steps, f"--action-steps {args.action_steps}: this policy's chunks "
                   f"hold {policy.n_action_steps} executable actions; pass 1 to {policy.n_action_steps}")
    run_args = ckpt.get("args", {})
    env_kwargs = {"max_episode_steps": args.max_episode_steps or run_args.get("max_episode_steps")}
    if ckpt["env_id"] not in environments.ROBOMIMIC_TASKS and run_args.get("success_timing"):
        env_kwargs["success_timing"] = run_args["success_timing"]
    result = environments.evaluate(policy.act, ckpt["env_id"], args.episodes, policy.n_obs_steps, steps,
                             seed=args.seed, num_envs=args.num_envs, **env_kwargs)
    print(json.dumps({"checkpoint": args.checkpoint, "env_id": ckpt["env_id"], "actor_only": args.actor_only,
                      "action_steps": steps,
                      **{k: round(float(v), 4) for k, v in result.items()}}))
    return result


if __name__ == "__main__":
    main()
