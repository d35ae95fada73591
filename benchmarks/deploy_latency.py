"""Deployment latency of robot_deploy.py, per backend, for the default DBP MLP (3x256; lift-sized Do = 19, Da = 7;
To = 1, H = Ta = 4). Random weights unless --checkpoint is given: latency does not depend on training.

    python benchmarks/deploy_latency.py                           # all backends, 60 s at 1 kHz each (~6 min)
    python benchmarks/deploy_latency.py --backends onnx eager --loop-seconds 10
    python benchmarks/deploy_latency.py --backends onnx --no-inference-thread   # inference inline in the loop
    python benchmarks/deploy_latency.py --backends onnx --no-inference-thread --busy-poll   # the server never sleeps
    python benchmarks/deploy_latency.py --backends onnx --calls 1000 --loop-seconds 5 --server-requests 20000  # ~40 s
    sudo chrt -f 50 python benchmarks/deploy_latency.py      # real-time priority (SCHED_FIFO), as a robot would run
    # ... after `sudo sysctl kernel.sched_rt_runtime_us=-1` (RT throttling off; the README's table, scheduler
    # "fifo_unthrottled" in the CSV): else the kernel stops a real-time loop that spins its whole period 50 ms a second

Per backend, 1 torch / onnxruntime thread, warm-up calls left out, all times on time.perf_counter:
  call        in-process observation -> action: noise sampling, normalisation, network, unnormalisation, clip
              (a direct call to the backend; p50 / p95 / p99 / max over --calls calls, one every 0.5 ms)
  floor       the same timing with the network replaced by a precomputed chunk (noise, clip and the clock reads
              only): what this machine costs before any inference, a part of every call's time
  loop        robot_deploy.run_loop at --loop-hz for --loop-seconds with a stand-in robot (a fixed observation,
              no physics): every tick's observation -> action through the Controller (a new chunk every Ta ticks,
              through the watchdog's worker thread, or inline with --no-inference-thread), wake-up jitter,
              deadline misses and watchdog ticks
  server      round trip on loopback: `robot_deploy.py --robot server` (websockets, openpi's protocol) in its
              own process, and openpi's WebsocketClientPolicy (examples/robot_client.py) at --loop-hz, one
              request per tick; every request plans a chunk, so the round trip includes one network call. The
              server's watchdog is set to 50 ms here so that the round trip shows the real inference time
Writes the table to benchmarks/results/deploy_latency.csv, with the machine's load average and the scheduling
policy (rows of the same backend, scheduling, --inference-thread and server transport are replaced, others kept).
"""

import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import robot_deploy as rd  # noqa: E402
from dbp_bc import DriftPolicy  # noqa: E402
from examples.robot_client import round_trips  # noqa: E402


@dataclass
class Args:
    checkpoint: Optional[str] = None
    """a checkpoint to time instead of the random-weight lift-sized DBP MLP"""
    backends: tuple[str, ...] = ("eager", "torchscript", "compile", "onnx")
    """backends to time"""
    calls: int = 5000
    """timed direct calls per backend (after 500 warm-up calls)"""
    loop_hz: float = 1000.0
    """rate of the in-process loop and of the server's client"""
    loop_seconds: float = 60.0
    """duration of the in-process loop per backend"""
    server_requests: int = 5000
    """timed server requests per backend, one per tick at --loop-hz (after 500 warm-up requests)"""
    inference_thread: bool = True
    """loop and server: inference in robot_deploy's watchdog thread (--no-inference-thread: inline)"""
    busy_wait_us: float = 1000.0
    """loop: robot_deploy's --busy-wait-us (sleep until this long before each tick, then spin)"""
    busy_poll: bool = False
    """server: robot_deploy's --busy-poll (the server's event loop spins between requests instead of sleeping)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "deploy_latency.csv")
    """CSV file of the table"""


class StandInRobot:
    """A robot that always reports the same observation and takes no time to act."""

    def __init__(self, obs):
        self.obs, self.successes, self.num_episodes = obs, [], 1

    def apply(self, action):
        return False


def pct(x, qs=(50, 95, 99, 100)):
    return [float(np.percentile(x, q)) * 1e6 for q in qs]  # microseconds


def time_calls(policy, infer, n, rng):
    obs = rd.example_inputs(policy, 1, rng)[0]
    out = []
    for i in range(500 + n):
        t0 = time.perf_counter()
        z = rng.standard_normal((1, *policy.noise_shape), dtype=np.float32)  # as robot_deploy.Controller does
        action = np.minimum(np.maximum(infer(obs, z)[0, 0], -1.0), 1.0).astype(np.float32)
        out.append(time.perf_counter() - t0)
        t_next = time.perf_counter() + 5e-4  # pace the calls like a control loop would (caches cool between ticks)
        while time.perf_counter() < t_next:
            pass
    assert action.shape == (policy.action_dim,)
    return pct(out[500:])


def time_server(checkpoint, backend, args, tmp):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    cmd = [sys.executable, os.path.join(ROOT, "robot_deploy.py"), "--checkpoint", checkpoint, "--robot", "server",
           "--backend", backend, "--port", "0", "--hz", str(args.loop_hz), "--inference-timeout-ms", "50",
           "--inference-thread" if args.inference_thread else "--no-inference-thread",
           *(["--busy-poll"] if args.busy_poll else [])]
    log_path = os.path.join(tmp, f"server_{backend}.log")
    with open(log_path, "w") as log:  # a file: a pipe nobody reads would block the server
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not (m := re.search(r"serving on ws://[^:]+:(\d+)", open(log_path).read())):
            if proc.poll() is not None:
                raise RuntimeError(f"the server did not start: {open(log_path).read()}")
            time.sleep(0.1)
        policy = WebsocketClientPolicy("127.0.0.1", int(m.group(1)))
        obs_dim = policy.get_server_metadata()["obs_dim"]
        round_trips(policy, obs_dim, args.loop_hz, 500)  # warm-up
        rtt, infer = round_trips(policy, obs_dim, args.loop_hz, args.server_requests)
        policy._ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    period = 1.0 / args.loop_hz
    return {"server_transport": "websocket", "server_rtt_p50_us": pct(rtt)[0], "server_rtt_p99_us": pct(rtt)[2],
            "server_rtt_max_us": pct(rtt)[3], "server_infer_p99_us": pct(infer)[2],
            "server_miss_pct": 100 * float(np.mean(rtt > period))}


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="deploy_latency_")
    if args.checkpoint:
        policy, checkpoint = common.load_policy(args.checkpoint), args.checkpoint
    else:
        torch.manual_seed(0)
        kw = dict(obs_dim=19, action_dim=7, n_obs_steps=1, horizon=4, n_action_steps=4, hidden_dims=(256, 256, 256))
        policy, checkpoint = DriftPolicy(**kw).eval(), os.path.join(tmp, "dbp_random.pt")
        common.save_checkpoint(checkpoint, dict(policy_module="dbp_bc", policy_kwargs=kw, model=policy.state_dict(),
                                                ema_model=policy.state_dict(), env_id="lift", args={}, step=0))
    load, scheduler = os.getloadavg(), "fifo" if os.sched_getscheduler(0) == os.SCHED_FIFO else "normal"
    if scheduler == "fifo":
        with open("/proc/sys/kernel/sched_rt_runtime_us") as f:
            scheduler += "_unthrottled" if int(f.read()) < 0 else ""  # RT throttling off
    print(f"{type(policy).__name__} Do={policy.obs_dim} Da={policy.action_dim} H={policy.horizon} "
          f"Ta={policy.n_action_steps}; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{scheduler} scheduling")
    if message := rd.rt_throttling_warning(args.loop_hz, args.busy_wait_us * 1e-6):
        print(message)
    chunk = rd.eager_chunk(policy, *rd.example_inputs(policy, 1, np.random.default_rng(0)))
    floor = time_calls(policy, lambda obs, z: chunk, args.calls, np.random.default_rng(0))
    print("floor (no network) p50 / p95 / p99 / max: " + " / ".join(f"{x:.0f}" for x in floor) + " us", flush=True)
    rows = []
    for backend in args.backends:
        t = time.perf_counter()
        infer = rd.make_backend(policy, backend, tmp)
        err = rd.check_parity(policy, infer, 1e-5)
        row = {"backend": backend, "parity_err": err, "setup_s": time.perf_counter() - t}
        row.update(zip(("call_p50_us", "call_p95_us", "call_p99_us", "call_max_us"),
                       time_calls(policy, infer, args.calls, np.random.default_rng(0))))
        row.update({"floor_p50_us": floor[0], "floor_p99_us": floor[2]})
        loop_args = rd.Args(hz=args.loop_hz, inference_thread=args.inference_thread)  # watchdog at half a period
        worker = rd.make_worker(policy, infer, args.inference_thread)
        controller = rd.Controller(policy, worker, loop_args, -np.ones(policy.action_dim), np.ones(policy.action_dim))
        stats = rd.LoopStats(warmup=int(args.loop_hz))  # the first second is warm-up
        n = int(args.loop_hz * (args.loop_seconds + 1))
        rd.run_loop(StandInRobot(rd.example_inputs(policy, 1, np.random.default_rng(1))[0][0, -1]), controller,
                    args.loop_hz, stats, threading.Event(), max_ticks=n, busy_wait_s=args.busy_wait_us * 1e-6)
        worker.close()
        s = stats.summary()
        row.update({f"loop_{k}_us": 1e3 * s[f"{k}_ms"] for k in ("latency_p50", "latency_p99", "chunk_latency_p50",
                                                                  "chunk_latency_p99", "jitter_p99", "jitter_max")})
        row.update({"loop_ticks": s["ticks"], "loop_miss_pct": s["deadline_miss_pct"],
                    "loop_watchdog_pct": 100 * s["watchdog_ticks"] / max(s["ticks"], 1)})
        row.update(time_server(checkpoint, backend, args, tmp))
        row.update({"load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "scheduler": scheduler,
                    "inference_thread": args.inference_thread, "busy_wait_us": args.busy_wait_us,
                    "server_busy_poll": args.busy_poll})
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(f"  {backend}: done ({time.perf_counter() - t:.0f} s)", flush=True)

    cols = [("backend", "{}"), ("call_p50_us", "{:.0f}"), ("call_p95_us", "{:.0f}"), ("call_p99_us", "{:.0f}"),
            ("call_max_us", "{:.0f}"), ("floor_p99_us", "{:.0f}"), ("loop_chunk_latency_p99_us", "{:.0f}"),
            ("loop_jitter_p99_us", "{:.0f}"),
            ("loop_miss_pct", "{:.3f}"), ("loop_watchdog_pct", "{:.3f}"), ("server_rtt_p50_us", "{:.0f}"),
            ("server_rtt_p99_us", "{:.0f}"), ("server_infer_p99_us", "{:.0f}"), ("server_miss_pct", "{:.3f}"),
            ("load_avg_1min", "{:.2f}")]
    print(f"\nlatencies in us; loop: {args.loop_hz:g} Hz for {args.loop_seconds:g} s; server: {args.server_requests} "
          f"requests at {args.loop_hz:g} Hz; {scheduler} scheduling; inference thread: {args.inference_thread}")
    print(" | ".join(c for c, _ in cols))
    for row in rows:
        print(" | ".join(f.format(row[c]) for c, f in cols))
    # Rows of the same (backend, scheduler, inference_thread, transport, busy poll) are replaced; other rows are kept.
    key = lambda r: (str(r["backend"]), str(r["scheduler"]), str(r["inference_thread"]),
                     r.get("server_transport") or "", str(r.get("server_busy_poll") or False))
    new_keys = {key(r) for r in rows}
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = [r for r in csv.DictReader(f) if key(r) not in new_keys] + rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # every column
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
