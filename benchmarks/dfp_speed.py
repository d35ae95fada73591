"""Milliseconds per DFP update (offline: critic + L_BC; online: + the pi_old pool and L_topK), timing the
script's own compute_losses, backward and Adam step. Paper sizes by default (4x512, batch 256); the DFP
paper reports 13.6 ms per online step with its JAX code on an RTX 3090.

    python benchmarks/dfp_speed.py                                   # Robomimic-sized (Do 23, Da 7), paper nets
    python benchmarks/dfp_speed.py --hidden-dims 256 256 256         # the CPU preset
    python benchmarks/dfp_speed.py --cube                            # cube-double sizes, K 4, N' 16
"""

import copy
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dfp_offline_to_online as dfp  # noqa: E402


@dataclass
class Args:
    hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """actor and critic sizes"""
    batch_size: int = 256
    """sequences per batch"""
    cube: bool = False
    """cube-double sizes and hyperparameters (Do 37, Da 5, K 4, N' 16, one temperature) instead of Robomimic"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    steps: int = 20
    """timed updates per phase (after 3 warm-up updates)"""
    cuda: bool = False
    """time on the GPU"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    d = dfp.Args(hidden_dims=args.hidden_dims, batch_size=args.batch_size)
    obs_dim, action_dim = (37, 5) if args.cube else (23, 7)
    d.k, d.n_best, d.temperatures = (4, 16, (0.05,)) if args.cube else (2, 4, (0.005, 0.05))
    S, B = d.horizon * action_dim, d.batch_size
    actor = dfp.Actor(obs_dim, S, d.hidden_dims).to(device)
    critic = dfp.Critic(obs_dim, S, d.hidden_dims, d.num_qs).to(device)
    target_critic, actor_old = copy.deepcopy(critic), copy.deepcopy(actor)
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=d.learning_rate)
    gen = np.random.default_rng(0)
    batch = dict(observations=gen.normal(size=(B, obs_dim)), actions=gen.uniform(-1, 1, (B, S)),
                 next_observations=gen.normal(size=(B, obs_dim)), rewards=-np.ones(B), masks=np.ones(B), valid=np.ones(B))
    batch = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in batch.items()}

    def update(online):
        loss, _ = dfp.compute_losses(batch, actor, critic, target_critic, actor_old, d, online)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dfp.polyak_update(target_critic, critic, d.tau)
        if online:
            dfp.polyak_update(actor_old, actor, d.old_tau)

    def ms_per_update(online):
        for _ in range(3):
            update(online)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            update(online)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t) / args.steps

    print(f"{'cube-double' if args.cube else 'robomimic'} sizes, hidden {d.hidden_dims}, batch {B}, G {d.gen_per_obs}, "
          f"N {d.pool_size}, K {d.k}, N' {d.n_best}, device {device}, threads {torch.get_num_threads()}")
    print(f"offline update: {ms_per_update(False):.1f} ms   online update: {ms_per_update(True):.1f} ms")
