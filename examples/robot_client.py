"""The robot's side of `robot_deploy.py --robot server`, with openpi's own client (PyPI `openpi-client`: numpy,
msgpack, websockets; no torch). Any robot stack that already talks to openpi policies connects the same way.

    export DRIFT_POLICY_TOKEN=$(openssl rand -hex 16)                           # both terminals
    python robot_deploy.py --checkpoint runs/.../dbp.pt --robot server          # terminal 1: the policy server
    python examples/robot_client.py --env-id lift                               # terminal 2: a simulated robot, 20 Hz
    python examples/robot_client.py --hz 1000 --steps 5000                      # random observations: round trips

Each `policy.infer(obs)` is one round trip that returns a chunk, "actions" [T, Da]; openpi's ActionChunkBroker
executes its first n_action_steps (from the server's metadata), then asks again. The robot sends its state as
the flat vector the policy was trained on (lift: eef position, eef quaternion, gripper joints, object state;
docs/robot_deploy.md) under "observation/state", and "reset": True with an episode's first observation.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from openpi_client.action_chunk_broker import ActionChunkBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy


@dataclass
class Args:
    host: str = "127.0.0.1"
    """the policy server's address"""
    port: int = 8000
    """the policy server's port"""
    env_id: Optional[str] = None
    """drive this environments.make_env env (none: random observations, one round trip per tick, for timing)"""
    hz: float = 20.0
    """control rate"""
    steps: int = 600
    """control ticks to run"""
    warmup: int = 20
    """first round trips left out of the statistics"""
    seed: int = 1
    """seed of the env and of the random observations"""


def wait(next_tick):
    """Sleep until 0.3 ms before the tick, then busy-wait (a sleeper wakes late)."""
    if (delay := next_tick - time.perf_counter() - 3e-4) > 0:
        time.sleep(delay)
    while time.perf_counter() < next_tick:
        pass


def round_trips(policy, obs_dim, hz, steps, seed=1):
    """One infer per tick on random observations at hz. Returns the round trips and the server's inference times (s)."""
    rng, period, rtt, infer = np.random.default_rng(seed), 1.0 / hz, [], []
    next_tick = time.perf_counter()
    for _ in range(steps):
        wait(next_tick)
        obs = rng.standard_normal(obs_dim).astype(np.float32)
        t0 = time.perf_counter()
        reply = policy.infer({"observation/state": obs})
        rtt.append(time.perf_counter() - t0)
        infer.append(reply["server_timing"]["infer_ms"] / 1e3)
        next_tick = max(next_tick + period, time.perf_counter() - period)  # more than a period behind: skip ticks
    return np.array(rtt), np.array(infer)


def run_episodes(policy, env, n_action_steps, hz, steps, seed=1):
    """A fixed-rate loop on env through ActionChunkBroker. Returns the successes and per-tick latencies (s)."""
    broker, period = ActionChunkBroker(policy, action_horizon=n_action_steps), 1.0 / hz
    (obs, _), first, success, successes, latency = env.reset(seed=seed), True, False, [], []
    next_tick = time.perf_counter()
    for _ in range(steps):
        wait(next_tick)
        t0 = time.perf_counter()
        action = broker.infer({"observation/state": obs, "reset": first})["actions"]
        latency.append(time.perf_counter() - t0)
        obs, _, terminated, truncated, info = env.step(action)
        success, first = success or bool(info["success"]), False
        if terminated or truncated:
            successes.append(success)
            (obs, _), first, success = env.reset(), True, False
            broker.reset()
            next_tick = time.perf_counter()  # episode resets are not part of the timed loop
        next_tick = max(next_tick + period, time.perf_counter() - period)
    return successes, np.array(latency)


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    policy = WebsocketClientPolicy(args.host, args.port, api_key=os.environ.get("DRIFT_POLICY_TOKEN"))
    meta = policy.get_server_metadata()
    print(f"policy at ws://{args.host}:{args.port}: {meta}")
    if args.env_id:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import environments

        env = environments.make_env(args.env_id, args.seed)
        successes, latency = run_episodes(policy, env, meta["n_action_steps"], args.hz, args.steps, args.seed)
        p = np.percentile(latency[args.warmup:], [50, 99, 100]) * 1e3
        print(f"success in {sum(successes)} of {len(successes)} finished episodes; observation -> action p50 "
              f"{p[0]:.3f}, p99 {p[1]:.3f}, max {p[2]:.3f} ms ({args.steps} ticks at {args.hz:g} Hz)")
    else:
        rtt, infer = round_trips(policy, meta["obs_dim"], args.hz, args.steps, args.seed)
        p, q = (np.percentile(x[args.warmup:], [50, 99, 100]) * 1e3 for x in (rtt, infer))
        print(f"round trip p50 {p[0]:.3f}  p99 {p[1]:.3f}  max {p[2]:.3f} ms; server inference p50 {q[0]:.3f}  "
              f"p99 {q[1]:.3f} ms, over {len(rtt) - args.warmup} requests at {args.hz:g} Hz")
