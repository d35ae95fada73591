"""Milliseconds per update of the flow baselines (baselines/qc_fql.py), timing the script's own compute_losses,
backward and Adam step: QC-FQL, FQL (--horizon 1), QC-BFN (best-of-32) and BFN (best-of-4, --horizon 1). Paper sizes
by default (4 x 512, batch 256, 10 flow steps), Robomimic dims (Do 23, Da 7).

An offline and an online update are the same computation in these methods (the same losses on a batch of H-step
sequences; only the batch's source differs), so one number serves both; the table's two columns say so. The online
step also acts: the cost of one acting call (one chunk) is timed separately.

    python benchmarks/qc_fql_speed.py --threads 1 --steps 3            # all four, paper sizes
    python benchmarks/qc_fql_speed.py --hidden-dims 256 256 256         # the CPU preset's networks
"""

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":

    @dataclass
    class Args:
        hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
        """flow, one-step policy and critic sizes"""
        batch_size: int = 256
        """sequences per batch"""
        threads: int = 0
        """torch threads (0: torch's default)"""
        steps: int = 5
        """timed updates per method (after 2 warm-up updates)"""
        methods: tuple[str, ...] = ("qc-fql", "fql", "qc-bfn", "bfn")
        """which members to time"""
        num_samples: Optional[int] = None
        """N of best-of-n (None: the script's default, 32 for H 5 and 4 for H 1)"""
        cuda: bool = False
        """time on the GPU"""

    args = tyro.cli(Args)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from baselines import qc_fql  # noqa: E402

MEMBERS = {"qc-fql": ("distill-ddpg", 5), "fql": ("distill-ddpg", 1), "qc-bfn": ("best-of-n", 5), "bfn": ("best-of-n", 1)}


def time_member(name, hidden_dims, batch_size, steps, num_samples=None, device="cpu", obs_dim=23, action_dim=7):
    """(ms per update, ms per acting call of one chunk) for one member at the given sizes."""
    actor, H = MEMBERS[name]
    a = qc_fql.Args(actor=actor, horizon=H, hidden_dims=hidden_dims, batch_size=batch_size, num_samples=num_samples)
    a.num_samples = a.num_samples or (32 if H > 1 else 4)
    S, B = H * action_dim, batch_size
    flow = qc_fql.FlowField(obs_dim, S, hidden_dims).to(device)
    onestep = qc_fql.OneStepActor(obs_dim, S, hidden_dims).to(device) if actor == "distill-ddpg" else None
    critic = qc_fql.Critic(obs_dim, S, hidden_dims, a.num_qs).to(device)
    target_critic = copy.deepcopy(critic)
    params = [*flow.parameters(), *critic.parameters(), *(onestep.parameters() if onestep else [])]
    opt = torch.optim.Adam(params, lr=a.learning_rate)
    gen = np.random.default_rng(0)
    batch = dict(observations=gen.normal(size=(B, obs_dim)), actions=gen.uniform(-1, 1, (B, S)),
                 next_observations=gen.normal(size=(B, obs_dim)), rewards=-np.ones(B), masks=np.ones(B),
                 valid=np.ones(B), valid_steps=np.ones((B, H)))
    batch = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in batch.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def update():
        loss, _ = qc_fql.compute_losses(batch, flow, onestep, critic, target_critic, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        qc_fql.polyak_update(target_critic, critic, a.tau)

    @torch.no_grad()
    def act():
        obs = batch["observations"][:1]
        if onestep is not None:
            return qc_fql.onestep_actions(onestep, obs, torch.randn(1, S, device=device))
        return qc_fql.best_of_n(flow, critic, obs, a.num_samples, a.flow_steps)

    def ms(fn, n):
        for _ in range(2):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return 1e3 * (time.perf_counter() - t) / n

    return ms(update, steps), ms(act, max(steps, 10))


if __name__ == "__main__":
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    print(f"robomimic sizes (Do 23, Da 7), hidden {args.hidden_dims}, batch {args.batch_size}, 10 flow steps, "
          f"device {device}, threads {torch.get_num_threads()}, {args.steps} timed updates each")
    print(f"| method | H | actor | ms / offline update | ms / online update | ms / acting call |")
    print(f"|---|---|---|---|---|---|")
    for name in args.methods:
        update_ms, act_ms = time_member(name, args.hidden_dims, args.batch_size, args.steps, args.num_samples, device)
        actor, H = MEMBERS[name]
        print(f"| {name} | {H} | {actor} | {update_ms:.1f} | {update_ms:.1f} (same computation) | {act_ms:.2f} |", flush=True)
