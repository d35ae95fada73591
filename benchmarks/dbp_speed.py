"""Training speed of dbp_bc.py: optimiser steps per second, and the share of a step spent in the drifting
loss itself (its forward and backward), at the script's default sizes.

    python benchmarks/dbp_speed.py                 # lift-sized (Do = 19, Da = 7), defaults of dbp_bc.py
    python benchmarks/dbp_speed.py --threads 1 --backbone unet
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dbp_bc import Args as DBPArgs  # noqa: E402
from dbp_bc import DriftPolicy, drift_loss  # noqa: E402


@dataclass
class Args:
    obs_dim: int = 19
    """observation dim (lift: 19, can / square: 23)"""
    action_dim: int = 7
    """action dim"""
    backbone: Literal["mlp", "unet"] = "mlp"
    """policy backbone"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    steps: int = 300
    """timed steps (after 30 warm-up steps)"""
    cuda: bool = False
    """time on the GPU (synchronising before reading clocks)"""


def timed(fn, n, device):
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    d = DBPArgs()
    B, G, H, Da, To = d.batch_size, d.gen_per_obs, d.horizon, args.action_dim, d.n_obs_steps
    policy = DriftPolicy(args.obs_dim, Da, To, H, d.n_action_steps, args.backbone, d.hidden_dims, d.unet_dims).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=d.learning_rate)
    obs, demo = torch.rand(B, To, args.obs_dim, device=device), torch.rand(B, 1, H * Da, device=device)

    def step():
        gen = policy.generate(obs.repeat_interleave(G, 0), torch.randn(B * G, H, Da, device=device)).view(B, G, H * Da)
        loss = drift_loss(gen, demo, d.temperatures)[0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), d.max_grad_norm)
        opt.step()

    gen_leaf = torch.randn(B, G, H * Da, device=device, requires_grad=True)

    def loss_only():
        drift_loss(gen_leaf, demo, d.temperatures)[0].mean().backward()

    t_step, t_loss = timed(step, args.steps, device), timed(loss_only, args.steps, device)
    print(f"{args.backbone} {d.hidden_dims if args.backbone == 'mlp' else d.unet_dims}, B={B}, G={G}, H={H}, "
          f"Da={Da}, Do={args.obs_dim}, device={device}, threads={torch.get_num_threads()}")
    print(f"steps/s: {1 / t_step:.1f}   ms/step: {1e3 * t_step:.2f}   drifting loss: {1e3 * t_loss:.2f} ms "
          f"= {100 * t_loss / t_step:.1f}% of a step")
