"""The robot's side of `robot_deploy.py --robot server`: a minimal client that needs only numpy, pyzmq and msgpack.

    python robot_deploy.py --checkpoint runs/.../dbp.pt --robot server      # terminal 1: the policy server
    python examples/robot_client.py --env-id lift                           # terminal 2: a simulated robot, 20 Hz
    python examples/robot_client.py --hz 1000 --steps 5000                  # random observations: round-trip timing

Protocol (ZeroMQ REQ/REP, msgpack; arrays are {"dtype": "float32", "shape": [n], "data": little-endian bytes}):
    {"obs": array [Do], "reset": bool}  ->  {"action": array [Da], "inferred": bool, "watchdog": bool} | {"error": str}
    {"info": true}                      ->  {"obs_dim", "action_dim", "n_obs_steps", "horizon", "n_action_steps"}
The server keeps the observation history and the action queue: send every control tick's observation, with
reset=True at the start of each episode. A REQ socket that timed out cannot send again (REQ/REP is lock-step),
so the client rebuilds it ("lazy pirate") and the robot holds its last action meanwhile: its own watchdog.
"""

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import msgpack
import numpy as np
import zmq


class PolicyClient:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout_ms: float = 100.0):
        self.endpoint, self.timeout_ms, self.ctx = endpoint, timeout_ms, zmq.Context()
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def request(self, msg):
        """Send a dict (or raw bytes); the reply dict, or None after timeout_ms (the socket is then rebuilt)."""
        self.sock.send(msg if isinstance(msg, bytes) else msgpack.packb(msg))
        if self.sock.poll(self.timeout_ms):
            return msgpack.unpackb(self.sock.recv())
        self.sock.close()
        self._connect()
        return None

    def info(self) -> dict:
        return self.request({"info": True})

    def act(self, obs, reset: bool = False):
        """obs [Do] -> the reply, reply["action"] as a numpy array; None on timeout; ValueError on an error reply."""
        obs = np.ascontiguousarray(obs, "<f4")
        array = {"dtype": "float32", "shape": list(obs.shape), "data": obs.tobytes()}
        reply = self.request({"obs": array, "reset": reset})
        if reply is not None and "error" in reply:
            raise ValueError(f"policy server: {reply['error']}")
        if reply is not None:
            a = reply["action"]
            reply["action"] = np.frombuffer(a["data"], "<f4").reshape(a["shape"])
        return reply

    def close(self):
        self.sock.close()
        self.ctx.term()


@dataclass
class Args:
    endpoint: str = "tcp://127.0.0.1:5555"
    """the policy server"""
    env_id: Optional[str] = None
    """drive this common.make_env env (none: random observations, for timing)"""
    hz: float = 20.0
    """control rate"""
    steps: int = 600
    """control ticks to run"""
    timeout_ms: float = 100.0
    """reply timeout: the robot holds its last action when it passes"""
    warmup: int = 20
    """first ticks left out of the statistics"""
    seed: int = 1
    """seed of the env and of the random observations"""


def run(client: PolicyClient, hz: float, steps: int, env=None, obs_dim: int = 0, seed: int = 1):
    """A fixed-rate loop (sleep, then busy-wait the last 0.3 ms). Returns per-tick arrays (rtt: round trip in s;
    missed: the reply came after the tick's slot; timeout; watchdog: the server sent its safe action; inferred: the
    server computed a new chunk) and the episodes' successes."""
    rng, period = np.random.default_rng(seed), 1.0 / hz
    obs, reset, successes, success = (env.reset(seed=seed)[0] if env else None), True, [], False
    action, ticks = None, {k: [] for k in ("rtt", "missed", "timeout", "watchdog", "inferred")}
    next_tick = time.perf_counter()
    for _ in range(steps):
        wait = next_tick - time.perf_counter() - 3e-4
        if wait > 0:
            time.sleep(wait)
        while time.perf_counter() < next_tick:
            pass
        t0 = time.perf_counter()
        reply = client.act(obs if env else rng.standard_normal(obs_dim, dtype=np.float32), reset)
        t1 = time.perf_counter()
        for k, v in (("rtt", t1 - t0), ("missed", t1 > next_tick + period), ("timeout", reply is None),
                     ("watchdog", bool(reply and reply["watchdog"])), ("inferred", bool(reply and reply["inferred"]))):
            ticks[k].append(v)
        action, reset = (reply["action"] if reply else action), False
        if env and action is not None:
            obs, _, terminated, truncated, info = env.step(action)
            success |= bool(info["success"])
            if terminated or truncated:
                successes.append(success)
                (obs, _), reset, success = env.reset(), True, False
                next_tick = time.perf_counter()  # episode resets are not part of the timed loop
        next_tick += period
        if time.perf_counter() > next_tick + period:  # more than a period behind: skip the missed ticks
            next_tick = time.perf_counter()
    return {k: np.array(v) for k, v in ticks.items()}, successes


if __name__ == "__main__":
    import tyro

    args = tyro.cli(Args)
    client = PolicyClient(args.endpoint, args.timeout_ms)
    spec = client.info()
    if spec is None:
        sys.exit(f"no reply from {args.endpoint} in {args.timeout_ms} ms: is `robot_deploy.py --robot server` running?")
    print(f"policy at {args.endpoint}: {spec}")
    env = None
    if args.env_id:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import common

        env = common.make_env(args.env_id, args.seed)
    ticks, successes = run(client, args.hz, args.steps, env, spec["obs_dim"], args.seed)
    t = {k: v[args.warmup:] for k, v in ticks.items()}
    p = np.percentile(t["rtt"], [50, 95, 99, 100]) * 1e3
    print(f"round trip p50 {p[0]:.3f}  p95 {p[1]:.3f}  p99 {p[2]:.3f}  max {p[3]:.3f} ms over {len(t['rtt'])} ticks at "
          f"{args.hz:g} Hz ({args.warmup} warm-up ticks left out); deadline misses {t['missed'].sum()} "
          f"({100 * t['missed'].mean():.2f}%), timeouts {t['timeout'].sum()}, server watchdog {t['watchdog'].sum()}"
          + (f"; success in {sum(successes)} of {len(successes)} finished episodes" if env else ""))
    client.close()
