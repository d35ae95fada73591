"""Deploy a trained drifting policy in a fixed-rate control loop: a simulated robot, or a policy server.

    python robot_deploy.py                               # no checkpoint: trains a tiny lift DBP policy first, then sim
    python robot_deploy.py --checkpoint runs/lift__dbp_bc__1__1700000000/dbp.pt     # lift in sim at 20 Hz, ONNX
    python robot_deploy.py --checkpoint dbp.pt --backend torchscript --execution ensemble --hz 50
    python robot_deploy.py --checkpoint dfp.pt --robot server --port 5555 --safe-action 0 0 0 0 0
    python examples/robot_client.py --endpoint tcp://127.0.0.1:5555 --env-id lift  # a robot process for the server

Any checkpoint loads through common.load_policy: forward(obs [B, To, Do], z [B, *noise_shape]) -> the actions
from the current step on [B, T, Da] in [-1, 1] (T = H - To + 1 >= Ta for DBP), normalisation inside. The noise
z is an explicit input (sampled here with numpy), so each backend is checked at start-up against eager PyTorch
on the same observation and z. One network call per chunk (DFP: N' actor samples and the critic, one pass).

Design notes (threads, watchdog, temporal ensembling, timing definitions, the server protocol) and measured
latencies: docs/robot_deploy.md. In short: inference runs on one thread in a worker thread; if no chunk is
ready --inference-timeout-ms after the observation, the safe action goes out and the late chunk is dropped.
Server: ZeroMQ REQ/REP, msgpack; {"obs": [Do] array, "reset": bool} -> {"action": [Da] array, "inferred",
"watchdog"}; {"info": true} -> the policy's dimensions.
"""

import glob
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import msgpack
import numpy as np
import torch
import tyro
import zmq

import common

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, cuda will be used when available (eager / torchscript / compile; batch 1 is faster on the CPU)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "drifting-policies"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """not supported here: rendering (~10 frames/s) breaks a real-time loop; use the training script's flag"""
    save_model: bool = True
    """whether to keep the exported model (policy.onnx with --backend onnx) in runs/{run_name}/"""

    # Algorithm specific arguments
    checkpoint: Optional[str] = None
    """checkpoint of any training script (dbp.pt, dfp.pt, ...); none: train a tiny lift DBP policy first"""
    env_id: Optional[str] = None
    """env of --robot sim (default: the checkpoint's); a checkpoint trained on another env is refused"""
    robot: Literal["sim", "server"] = "sim"
    """sim: drive a common.make_env env at --hz; server: answer a robot's control process over ZeroMQ"""
    backend: Literal["eager", "torchscript", "compile", "onnx"] = "onnx"
    """inference backend, checked against eager PyTorch at start-up (same observation and z)"""
    execution: Literal["receding", "ensemble"] = "receding"
    """receding: execute Ta actions of each chunk, then re-plan; ensemble: ACT temporal ensembling (docs/robot_deploy.md)"""
    ensemble_decay: float = 0.01
    """ACT's m: chunk i (0 = the oldest) overlapping the current tick gets weight exp(-m * i)"""
    hz: float = 20.0
    """control rate (the sims' native rate is 20 Hz); the server's watchdog timeout follows it"""
    inference_timeout_ms: float = 0.0
    """watchdog: the longest wait for a new chunk after an observation (0: half a control period)"""
    inference_thread: bool = True
    """watchdog in time: inference in a worker thread (--no-inference-thread: inline, no hand-off, docs/robot_deploy.md)"""
    safe_action: Optional[tuple[float, ...]] = None
    """action sent when the watchdog fires (none: hold the last action, which keeps a delta controller moving)"""
    max_action: float = 1.0
    """actions are clipped to [-max_action, max_action] (and to the env's limits in sim)"""
    num_episodes: int = 2
    """sim: episodes to run"""
    max_ticks: int = 0
    """stop after this many control ticks (sim) or requests (server); 0: no limit"""
    warmup_ticks: int = 20
    """first ticks / requests left out of the statistics"""
    busy_wait_us: float = 1000.0
    """the scheduler sleeps until this long before each tick, then busy-waits (a sleeper wakes 0.1-1 ms late; on an
    idle VM, whose halted vCPU must be woken, later still). 1000: spin the whole period at 1 kHz"""
    threads: int = 1
    """intra-op threads of torch and onnxruntime (docs/robot_deploy.md)"""
    parity_tol: float = 1e-5
    """largest action difference accepted between the backend and eager PyTorch"""
    host: str = "127.0.0.1"
    """server: address to bind (loopback only by default)"""
    port: int = 5555
    """server: TCP port (0: any free port)"""
    max_msg_bytes: int = 65536
    """server: larger requests get an error reply (ZeroMQ drops peers sending 16x more)"""


# ----------------------------------------------------------------------------------------------
# Backends: infer(obs [1, To, Do], z [1, *noise_shape]) -> chunk [1, T, Da], numpy float32 in and out
# ----------------------------------------------------------------------------------------------
def example_inputs(policy, batch, rng):
    """Observations inside the normaliser's range (where the policy is not saturated) and z ~ N(0, I)."""
    lo = getattr(policy, "obs_min", torch.full((policy.obs_dim,), -1.0)).cpu().numpy()
    hi = getattr(policy, "obs_max", torch.full((policy.obs_dim,), 1.0)).cpu().numpy()
    obs = rng.uniform(lo, hi, (batch, policy.n_obs_steps, policy.obs_dim)).astype(np.float32)
    return obs, rng.standard_normal((batch, *policy.noise_shape), dtype=np.float32)


@torch.inference_mode()
def run_torch(fn, device, obs, z):
    return fn(torch.from_numpy(obs).to(device), torch.from_numpy(z).to(device)).cpu().numpy()  # .cpu() syncs cuda


def eager_chunk(policy, obs, z):
    return run_torch(policy, next(policy.parameters()).device, obs, z)


def make_backend(policy, backend, export_dir, threads=1):
    """The backend's infer function. TorchScript and ONNX trace the graph at batch 1, the deployment case: a
    fixed shape lets ONNX Runtime drop the shape arithmetic of a dynamic batch (17 nodes instead of 25 for the
    DBP MLP; docs/robot_deploy.md has the timings). torch.compile compiles at its first call (5-30 s on 2 cores)."""
    rng, device = np.random.default_rng(0), next(policy.parameters()).device
    obs1, z1 = (torch.from_numpy(x).to(device) for x in example_inputs(policy, 1, rng))
    with warnings.catch_warnings():  # deprecation notices and tracer warnings: check_parity is the arbiter
        warnings.simplefilter("ignore")
        if backend == "eager":
            fn = policy
        elif backend == "torchscript":
            fn = torch.jit.freeze(torch.jit.trace(policy, (obs1, z1)))
        elif backend == "compile":
            fn = torch.compile(policy, dynamic=False)
        if backend != "onnx":
            return lambda obs, z: run_torch(fn, device, obs, z)
        import onnxruntime as ort

        path, options = os.path.join(export_dir, "policy.onnx"), ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        torch.onnx.export(policy, (obs1, z1), path, input_names=["obs", "z"], output_names=["chunk"],
                          opset_version=17, dynamo=False)  # dynamo=True needs onnxscript
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    # I/O binding: the inputs are read in place and the output goes to a preallocated buffer (no per-call
    # allocation; benchmarks/onnx_call_variants.py: a few us less at the median). The copy keeps returned chunks apart.
    shape = eager_chunk(policy, obs1.cpu().numpy(), z1.cpu().numpy()).shape
    binding, out = session.io_binding(), np.empty(shape, np.float32)  # C order (eager's chunk may be a strided view)
    binding.bind_output("chunk", "cpu", 0, np.float32, out.shape, out.ctypes.data)

    def infer(obs, z):
        binding.bind_cpu_input("obs", obs), binding.bind_cpu_input("z", z)  # (a strided array is copied)
        session.run_with_iobinding(binding)
        return out.copy()
    return infer


def check_parity(policy, infer, tol, n=4, seed=0):
    """Same observation and z -> the same chunk as eager PyTorch, within tol. Returns the largest difference."""
    rng = np.random.default_rng(seed)
    inputs = [example_inputs(policy, 1, rng) for _ in range(n)]
    err = max(np.abs(infer(obs, z) - eager_chunk(policy, obs, z)).max() for obs, z in inputs)
    if not err <= tol:
        raise common.UserError(f"the backend differs from eager PyTorch by {err:.2e} > --parity-tol {tol}")
    return float(err)


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: chunk execution (which action goes out at each tick) and the watchdog
# ----------------------------------------------------------------------------------------------
class ChunkExecutor:
    """Chunks hold the actions from the current step on (forward's contract; T >= Ta rows).
    receding: the first Ta actions of a chunk, then a new chunk. ensemble: a new chunk every tick; the action is
    the exp(-m * i)-weighted mean (i = 0: the oldest chunk) of every chunk's prediction for this tick (ACT)."""

    def __init__(self, n_action_steps, mode="receding", decay=0.01):
        self.ta, self.mode, self.decay = n_action_steps, mode, decay
        self.reset()

    def reset(self):
        self.chunks, self.tick = [], 0  # (tick the chunk was planned at, chunk [T, Da]), oldest first

    def needs_chunk(self):
        return self.mode == "ensemble" or not self.chunks or self.tick - self.chunks[-1][0] >= self.ta

    def add(self, chunk):
        self.chunks = [*self.chunks, (self.tick, chunk)] if self.mode == "ensemble" else [(self.tick, chunk)]

    def next(self):
        """The action for this tick, or None if no chunk covers it; advances the tick."""
        t, self.tick = self.tick, self.tick + 1
        span = lambda c: len(c) if self.mode == "ensemble" else self.ta  # the ticks a chunk is used for
        self.chunks = [(t0, c) for t0, c in self.chunks if t - t0 < span(c)]
        if len(self.chunks) <= 1:  # receding horizon (or the first ensemble tick)
            return self.chunks[0][1][t - self.chunks[0][0]] if self.chunks else None
        w = np.exp(-self.decay * np.arange(len(self.chunks)))[:, None]  # oldest first
        return (w * np.stack([c[t - t0] for t0, c in self.chunks])).sum(0) / w.sum()


class InferenceWorker:
    """Runs inference in a thread, so the control loop can stop waiting for it (the watchdog). threaded=False:
    inline, without the hand-off; a late chunk is still replaced by the safe action, but that goes out late."""

    def __init__(self, infer, warmup_inputs=(), threaded=True):
        self.infer, self.requests, self.done, self.threaded = infer, queue.SimpleQueue(), threading.Event(), threaded
        if threaded:
            threading.Thread(target=self._serve, args=(list(warmup_inputs),), daemon=True).start()
            self.done.wait()  # idle once warmed up
        else:
            for obs, z in warmup_inputs:
                infer(obs, z)

    def _serve(self, warmup_inputs):
        for obs, z in warmup_inputs:  # in this thread: a thread's first torch call costs ~70 ms (per-thread set-up)
            self.infer(obs, z)
        self.done.set()
        while (request := self.requests.get()) is not None:
            try:
                self.result = self.infer(*request)
            except Exception as e:  # re-raised in the caller's thread
                self.result = e
            self.done.set()

    def __call__(self, obs, z, timeout):
        """The chunk, or None if it is not ready within timeout seconds (or a late chunk is still running)."""
        if not self.threaded:
            deadline = time.perf_counter() + timeout
            chunk = self.infer(obs, z)
            return chunk if time.perf_counter() <= deadline else None
        if not self.done.is_set():
            return None
        self.done.clear()
        self.requests.put((obs, z))
        if not self.done.wait(max(timeout, 0.0)):
            return None
        if isinstance(self.result, Exception):
            raise self.result
        return self.result

    def close(self):
        self.requests.put(None)  # ends the worker thread (if any)


class Controller:
    """One control tick: observation -> safe action. The observation history, the chunk executor, inference
    under the watchdog, and the action limits. Shared by the sim loop and the policy server."""

    def __init__(self, policy, infer, args, low, high):
        self.n_obs_steps, self.noise_shape = policy.n_obs_steps, policy.noise_shape
        self.executor = ChunkExecutor(policy.n_action_steps, args.execution, args.ensemble_decay)
        warmup = [example_inputs(policy, 1, np.random.default_rng(i)) for i in range(20)]
        self.worker = InferenceWorker(infer, warmup, args.inference_thread)
        self.rng = np.random.default_rng(args.seed)
        self.low, self.high = np.maximum(low, -args.max_action), np.minimum(high, args.max_action)
        self.timeout = args.inference_timeout_ms / 1e3 or 0.5 / args.hz
        if args.safe_action is not None and len(args.safe_action) != policy.action_dim:
            raise common.UserError(f"--safe-action has {len(args.safe_action)} values, the actions {policy.action_dim}")
        self.safe = None if args.safe_action is None else np.clip(np.float32(args.safe_action), self.low, self.high)
        self.last = np.clip(np.zeros(policy.action_dim, np.float32), self.low, self.high)
        self.reset()

    def reset(self):
        """A new episode: forget the observation history and the queued chunks."""
        self.history = None
        self.executor.reset()

    def step(self, obs, t_obs):
        """obs [Do] received at time t_obs -> (action [Da], a chunk was inferred, the watchdog fired)."""
        if self.history is None:  # the first observation of an episode fills the whole history
            self.history = np.repeat(obs[None], self.n_obs_steps, 0)
        self.history = np.concatenate([self.history[1:], obs[None]])  # a new array: a late call may still read the old
        inferred = watchdog = False
        if self.executor.needs_chunk():
            z = self.rng.standard_normal((1, *self.noise_shape), dtype=np.float32)
            chunk = self.worker(self.history[None], z, t_obs + self.timeout - time.perf_counter())
            inferred, watchdog = chunk is not None, chunk is None
            if inferred:
                self.executor.add(chunk[0])
        action = self.executor.next()
        if watchdog or action is None or not np.isfinite(action).all():
            action, watchdog = self.last if self.safe is None else self.safe, True
        self.last = np.minimum(np.maximum(action, self.low), self.high).astype(np.float32)  # = np.clip, faster
        return self.last, inferred, watchdog


# ----------------------------------------------------------------------------------------------
# The fixed-rate loop and its statistics
# ----------------------------------------------------------------------------------------------
class RateScheduler:
    """Ticks at a fixed rate on the monotonic clock: sleep until busy_wait_s before the tick, then busy-wait."""

    def __init__(self, hz, busy_wait_s):
        self.period, self.busy_wait_s, self.skipped = 1.0 / hz, busy_wait_s, 0
        self.restart()

    def restart(self):
        self.next_tick = time.perf_counter()

    def wait(self):
        """Returns the scheduled time of this tick. More than a period behind: skip (count) the missed ticks."""
        now = time.perf_counter()
        if now > self.next_tick + self.period:
            missed = int((now - self.next_tick) / self.period)
            self.skipped, self.next_tick = self.skipped + missed, self.next_tick + missed * self.period
        if self.next_tick - now > self.busy_wait_s:
            time.sleep(self.next_tick - now - self.busy_wait_s)
        while time.perf_counter() < self.next_tick:
            pass
        tick, self.next_tick = self.next_tick, self.next_tick + self.period
        return tick


def rt_throttling_warning(hz, busy_wait_s, proc="/proc/sys/kernel"):
    """A real-time (SCHED_FIFO / RR) thread that spins most of every period is stopped by the kernel's RT throttling
    for 50 ms of every second (sched_rt_runtime_us = 950000 of sched_rt_period_us = 1000000 by default): about
    5% of the ticks of a 1 kHz loop. A message that says so, or None."""
    try:
        runtime, period = (int(open(os.path.join(proc, f"sched_rt_{k}_us")).read()) for k in ("runtime", "period"))
    except (OSError, ValueError):
        return None
    if os.sched_getscheduler(0) not in (os.SCHED_FIFO, os.SCHED_RR) or runtime < 0 or busy_wait_s * hz < 0.9:
        return None
    return (f"warning: this real-time loop spins {100 * min(busy_wait_s * hz, 1):.0f}% of each period, and the "
            f"kernel's RT throttling will stop it for {(period - runtime) / 1e3:.0f} ms in every {period / 1e6:g} s "
            f"(sched_rt_runtime_us = {runtime}). Lift it as real-time robot set-ups do "
            f"(`sudo sysctl kernel.sched_rt_runtime_us=-1`), or spin less (--busy-wait-us)")


class LoopStats:
    """Per-tick records after warm-up: latency (observation -> action), chunk inferred, watchdog fired, jitter,
    deadline missed, ticks skipped before this one. A server has no ticks: its jitter is nan, its misses 0."""

    def __init__(self, warmup):
        self.warmup, self.seen, self.rows = warmup, 0, []

    def add(self, latency, inferred, watchdog, jitter=float("nan"), miss=False, skipped=0):
        self.seen += 1
        if self.seen > self.warmup:
            self.rows.append((latency, inferred, watchdog, jitter, miss, skipped))

    def summary(self):
        r = np.array(self.rows, np.float64).reshape(-1, 6)
        pct = lambda x, name: {f"{name}_{k}_ms": float(np.percentile(x, q)) * 1e3 if len(x) else float("nan")
                               for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}
        misses = int(r[:, 4].sum() + r[:, 5].sum())
        return {"ticks": len(r), "warmup_ticks": min(self.seen, self.warmup), **pct(r[:, 0], "latency"),
                **pct(r[r[:, 1] > 0, 0], "chunk_latency"), **pct(r[~np.isnan(r[:, 3]), 3], "jitter"),
                "chunks": int(r[:, 1].sum()), "watchdog_ticks": int(r[:, 2].sum()), "deadline_misses": misses,
                "deadline_miss_pct": 100.0 * misses / max(len(r) + r[:, 5].sum(), 1)}

    def report(self, s):
        def line(name, k):
            return f"  {name:<30}" + "  ".join(f"{q} {s[f'{k}_{q}_ms']:.3f}" for q in ("p50", "p95", "p99", "max"))

        lines = [line("observation -> action (ms)", "latency"), line(f"  ticks with a new chunk ({s['chunks']})",
                                                                      "chunk_latency")]
        if np.isfinite(s["jitter_p50_ms"]):  # a server has no ticks: the robot's client measures its deadlines
            lines += [line("jitter (late wake-up)", "jitter"), f"  deadline misses {s['deadline_misses']} "
                      f"({s['deadline_miss_pct']:.2f}%, skipped ticks included)"]
        return "\n".join(lines + [f"  watchdog fired on {s['watchdog_ticks']} of {s['ticks']} ticks "
                                  f"({s['warmup_ticks']} warm-up ticks left out)"])


class SimRobot:
    """--robot sim: a common.make_env env stands in for the robot (evaluation seeds, one per episode)."""

    def __init__(self, env_id, seed, num_episodes):
        self.env, self.seed, self.num_episodes, self.successes = common.make_env(env_id, seed), seed, num_episodes, []
        self.reset()

    def reset(self):
        self.obs, _ = self.env.reset(seed=common.EVAL_SEED_OFFSET + self.seed + len(self.successes))
        self.success = False

    def apply(self, action):
        """Step the sim; returns True at the end of an episode."""
        self.obs, _, terminated, truncated, info = self.env.step(action)
        self.success |= bool(info["success"])
        if terminated or truncated:
            self.successes.append(self.success)
        return terminated or truncated


def run_loop(robot, controller, hz, stats, stop, max_ticks=0, busy_wait_s=1e-3):
    """The control loop. Episode resets happen outside the timed ticks (a real robot pauses there too)."""
    scheduler, tick = RateScheduler(hz, busy_wait_s), 0
    while not stop.is_set() and len(robot.successes) < robot.num_episodes and not (max_ticks and tick >= max_ticks):
        skipped = scheduler.skipped
        t_tick = scheduler.wait()
        t_obs = time.perf_counter()  # the observation is in hand: robot.obs, from the last step
        action, inferred, watchdog = controller.step(robot.obs, t_obs)
        t_action = time.perf_counter()
        done = robot.apply(action)
        stats.add(t_action - t_obs, inferred, watchdog, t_obs - t_tick, t_action > t_tick + scheduler.period,
                  scheduler.skipped - skipped)
        tick += 1
        if done and len(robot.successes) < robot.num_episodes:
            robot.reset(), controller.reset(), scheduler.restart()


# ----------------------------------------------------------------------------------------------
# The policy server (protocol in the module docstring)
# ----------------------------------------------------------------------------------------------
def pack_array(x):
    return {"dtype": "float32", "shape": list(x.shape), "data": np.ascontiguousarray(x, "<f4").tobytes()}


def decode_request(msg, obs_dim, max_bytes):
    """bytes -> ("info", None) or ("obs", (obs [Do], reset)); ValueError with a readable message otherwise."""
    if len(msg) > max_bytes:
        raise ValueError(f"request of {len(msg)} bytes is over the limit of {max_bytes} (--max-msg-bytes)")
    try:
        req = msgpack.unpackb(msg)
    except Exception as e:
        raise ValueError(f"not a msgpack message ({type(e).__name__})") from None
    if isinstance(req, dict) and req.get("info") is True:
        return "info", None
    o = req.get("obs") if isinstance(req, dict) else None
    if not isinstance(o, dict):
        raise ValueError("expected a map {'obs': {'dtype': 'float32', 'shape': [Do], 'data': bytes}, 'reset': bool}")
    if o.get("dtype") != "float32" or o.get("shape") != [obs_dim]:
        raise ValueError(f"obs must be dtype 'float32' shape [{obs_dim}], not {o.get('dtype')!r} {o.get('shape')!r}")
    if not isinstance(o.get("data"), bytes) or len(o["data"]) != 4 * obs_dim:
        raise ValueError(f"obs data must be {4 * obs_dim} bytes (little-endian float32)")
    obs = np.frombuffer(o["data"], "<f4").astype(np.float32)
    if not np.isfinite(obs).all():
        raise ValueError(f"obs has non-finite values at indices {np.flatnonzero(~np.isfinite(obs)).tolist()}")
    return "obs", (obs, bool(req.get("reset", False)))


def bind_server(host, port, max_bytes):
    """A ZeroMQ REP socket bound to host:port (port 0: any free port). Returns (context, socket, endpoint)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 16 * max_bytes)  # bounds memory: bigger messages drop the peer, no reply
    port = sock.bind_to_random_port(f"tcp://{host}") if port == 0 else (sock.bind(f"tcp://{host}:{port}"), port)[1]
    return ctx, sock, f"tcp://{host}:{port}"


def serve(sock, policy, controller, stats, stop, max_bytes, max_requests=0):
    """Answer requests until stop is set (polling every 0.1 s) or after max_requests. Bad requests get {"error"}."""
    spec = {k: getattr(policy, k) for k in ("obs_dim", "action_dim", "n_obs_steps", "horizon", "n_action_steps")}
    n = 0
    while not stop.is_set() and not (max_requests and n >= max_requests):
        if not sock.poll(100):
            continue
        msg, n = sock.recv(), n + 1
        t_obs = time.perf_counter()
        try:
            kind, payload = decode_request(msg, policy.obs_dim, max_bytes)
            if kind == "info":
                reply = spec
            else:
                if payload[1]:
                    controller.reset()
                action, inferred, watchdog = controller.step(payload[0], t_obs)
                reply = {"action": pack_array(action), "inferred": inferred, "watchdog": watchdog}
        except ValueError as e:
            kind, reply = "error", {"error": str(e)}
        data = msgpack.packb(reply)
        if kind == "obs":
            stats.add(time.perf_counter() - t_obs, inferred, watchdog)
        sock.send(data)


# ----------------------------------------------------------------------------------------------
# The bare command: a tiny lift policy
# ----------------------------------------------------------------------------------------------
def tiny_lift_checkpoint():
    found = sorted(glob.glob(os.path.join("runs", "lift__dbp_bc_tiny__*", "dbp.pt")), key=os.path.getmtime)
    if not found:
        cmd = [sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--env-id", "lift", "--exp-name", "dbp_bc_tiny",
               "--total-steps", "3000", "--eval-every", "3000", "--eval-episodes", "4", "--final-eval-episodes", "4"]
        print(f"no --checkpoint: training a tiny lift DBP policy first (about 1-5 min; the first run also generates "
              f"scripted lift demos). Pass --checkpoint to deploy your own.\n  {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise common.UserError("training the tiny lift policy failed (see above); pass --checkpoint instead")
        found = sorted(glob.glob(os.path.join("runs", "lift__dbp_bc_tiny__*", "dbp.pt")), key=os.path.getmtime)
    print(f"using {found[-1]}")
    return found[-1]


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.capture_video:
        raise common.UserError("--capture-video is not supported by robot_deploy.py (rendering breaks the real-time "
                               "loop); record videos with the training script's --capture-video")
    if args.hz <= 0 or args.inference_timeout_ms < 0:
        raise common.UserError("--hz must be > 0 and --inference-timeout-ms >= 0")
    args.checkpoint = args.checkpoint or tiny_lift_checkpoint()
    policy = common.load_policy(args.checkpoint, env_id=args.env_id)  # refuses a checkpoint of another env
    args.env_id = args.env_id or common.load_checkpoint(args.checkpoint)["env_id"]
    run_name, run_dir, writer = common.make_run(args)

    # TRY NOT TO MODIFY: seeding, 1 inference thread (docs/robot_deploy.md)
    common.set_seed(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    if args.cuda and torch.cuda.is_available() and args.backend != "onnx":
        policy = policy.cuda()

    export_dir = run_dir if args.save_model else tempfile.mkdtemp()
    infer = make_backend(policy, args.backend, export_dir, args.threads)
    err = check_parity(policy, infer, args.parity_tol)  # also the first calls (torch.compile compiles here)
    print(f"{args.checkpoint}: {type(policy).__name__} To={policy.n_obs_steps} H={policy.horizon} "
          f"Ta={policy.n_action_steps} Do={policy.obs_dim} Da={policy.action_dim}; backend {args.backend} matches "
          f"eager within {err:.1e}; {args.execution} execution at {args.hz:g} Hz")

    stop, stats = threading.Event(), LoopStats(args.warmup_ticks)
    if args.robot == "sim" and (message := rt_throttling_warning(args.hz, args.busy_wait_us * 1e-6)):
        print(message)

    def on_sigint(*_):  # first Ctrl-C: stop cleanly and print the statistics; a second one: stop at once
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    result = {}
    if args.robot == "sim":
        robot = SimRobot(args.env_id, args.seed, args.num_episodes)
        controller = Controller(policy, infer, args, robot.env.action_space.low, robot.env.action_space.high)
        try:
            run_loop(robot, controller, args.hz, stats, stop, args.max_ticks, args.busy_wait_us * 1e-6)
        finally:
            robot.env.close()
        result = {"episodes": len(robot.successes), "successes": sum(robot.successes)}
    else:
        controller = Controller(policy, infer, args, -np.ones(policy.action_dim), np.ones(policy.action_dim))
        ctx, sock, endpoint = bind_server(args.host, args.port, args.max_msg_bytes)
        print(f"serving on {endpoint} (Ctrl-C to stop)", flush=True)
        try:
            serve(sock, policy, controller, stats, stop, args.max_msg_bytes, args.max_ticks)
        finally:
            sock.close(), ctx.term()
    controller.worker.close()

    # TRY NOT TO MODIFY: statistics, printed and logged (TensorBoard time/ and runs/{run_name}/deploy_stats.json)
    summary = {**stats.summary(), **result, "backend": args.backend, "hz": args.hz, "parity_error": err}
    print(f"{args.robot} ({args.backend}, {args.execution}, {args.hz:g} Hz):\n{stats.report(summary)}")
    if result:
        print(f"  success in {result['successes']} of {result['episodes']} finished episodes")
    summary = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in summary.items()}
    for k, v in summary.items():
        if isinstance(v, (int, float)):
            writer.add_scalar(f"{'charts' if k in result else 'time'}/{k}", v, 0)
    with open(os.path.join(run_dir, "deploy_stats.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
