"""Deploy a trained drifting policy: a fixed-rate control loop on a simulated robot, or a policy server for a real one.

    python robot_deploy.py                               # no checkpoint: trains a tiny lift DBP policy first, then sim
    python robot_deploy.py --checkpoint runs/lift__dbp_bc__1__1700000000/dbp.pt     # lift in sim at 20 Hz, ONNX
    python robot_deploy.py --checkpoint dbp.pt --backend torchscript --execution ensemble --hz 50
    export DRIFT_POLICY_TOKEN=$(openssl rand -hex 16)            # a shared secret for both sides (optional on loopback)
    python robot_deploy.py --checkpoint dbp.pt --robot server --port 8000 --safe-action 0 0 0 0 0 0 0
    python examples/robot_client.py --port 8000 --env-id lift      # a robot process (openpi-client) for the server

Any checkpoint loads through common.load_policy: forward(obs [B, To, Do], z [B, *noise_shape]) -> the actions
from the current step on [B, T, Da] in [-1, 1] (T = H - To + 1 >= Ta for DBP), normalisation inside. The noise
z is an explicit input (sampled here with numpy), so each backend is checked at start-up against eager PyTorch
on the same observation and z. One network call per chunk (DFP: N' actor samples and the critic, one pass).
Shapes: B batch, To observation steps, Do observation dim, T chunk length, Ta executed actions, Da action dim.

Server (--robot server): openpi's websocket policy protocol (policy_server.py), one session per connection.
Safety: every failure path (inference late, raising, non-finite) sends the safe action, zero motion by default.
Protocol, key mapping, tokens, sessions, safety and measured latencies: docs/robot_deploy.md.
"""

import asyncio
import dataclasses
import glob
import json
import logging
import math
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

import numpy as np
import tyro

import common  # numpy and gymnasium: torch loads after the arguments are parsed
import environments
import policy_server


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (and of every server session's noise generator)"""
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
    trust_checkpoint: bool = False
    """load a checkpoint that is not weights-only (it may run code: only a file from a source you trust)"""
    env_id: Optional[str] = None
    """env of --robot sim (default: the checkpoint's); a checkpoint trained on another env is refused"""
    robot: Literal["sim", "server"] = "sim"
    """sim: drive an environments.make_env env at --hz; server: answer robots over websockets (openpi's protocol)"""
    backend: Literal["eager", "torchscript", "compile", "onnx"] = "onnx"
    """inference backend, checked against eager PyTorch at start-up (same observation and z)"""
    execution: Literal["receding", "ensemble"] = "receding"
    """sim: receding executes Ta actions of each chunk, then re-plans; ensemble: ACT temporal ensembling"""
    ensemble_decay: float = 0.01
    """ACT's m: chunk i (0 = the oldest) overlapping the current tick gets weight exp(-m * i)"""
    hz: float = 20.0
    """control rate (the sims' native rate is 20 Hz); the watchdog's default timeout follows it"""
    inference_timeout_ms: float = 0.0
    """watchdog: the longest wait for a new chunk after an observation (0: half a control period)"""
    inference_thread: bool = True
    """watchdog in time: inference in a worker thread (--no-inference-thread: inline, no hand-off)"""
    safe_action: Optional[tuple[float, ...]] = None
    """action sent on every failure path (late, raising or non-finite inference); none: zero motion (delta control)"""
    hold_dims: tuple[int, ...] = ()
    """action dims the safe action holds at their last value instead (e.g. an absolute gripper command)"""
    max_action: float = 1.0
    """actions are clipped to [-max_action, max_action] (and to the env's limits in sim)"""
    max_consecutive_failures: int = 5
    """stop after this many failed inference calls in a row, the safe action sent (server: that session); 0: never"""
    num_episodes: int = 2
    """sim: episodes to run"""
    max_ticks: int = 0
    """stop after this many control ticks (sim) or requests (server, all sessions); 0: no limit"""
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
    """server: address to bind (loopback by default; any other needs a token, or --insecure)"""
    port: int = 8000
    """server: TCP port (0: any free port; 8000 is openpi's default)"""
    token: Optional[str] = None
    """server: shared secret, sent by clients as `Authorization: Api-Key <token>` (default: $DRIFT_POLICY_TOKEN)"""
    insecure: bool = False
    """server: allow a non-loopback --host without a token (anyone who reaches the port steers the robot)"""
    max_message_mb: float = 8.0
    """server: larger messages close the connection (code 1009); 0: no cap, as openpi"""
    max_sessions: int = 16
    """server: connections beyond this many are refused (HTTP 503)"""
    busy_poll: bool = False
    """server: the event loop spins between requests instead of sleeping in epoll (it burns one core; on a VM whose
    idle vCPU halts, a sleeping server wakes late for each request)"""


def check_args(args):
    """Start-up checks that need no checkpoint; each failure is one clear line (common.UserError)."""
    common.require(args.hz > 0 and args.inference_timeout_ms >= 0, "--hz must be > 0 and --inference-timeout-ms >= 0")
    common.require(math.isfinite(args.max_action) and args.max_action > 0,
                   f"--max-action must be a finite number > 0, not {args.max_action}")
    common.require(args.max_consecutive_failures >= 0 and args.max_message_mb >= 0 and args.max_sessions >= 1,
                   "--max-consecutive-failures and --max-message-mb must be >= 0, --max-sessions >= 1")
    common.require(args.safe_action is None or all(math.isfinite(v) and abs(v) <= args.max_action
                                                   for v in args.safe_action),
                   f"--safe-action must be finite and within +-{args.max_action:g} (--max-action), not "
                   f"{list(args.safe_action or ())}")
    if args.robot == "server":
        token = args.token or os.environ.get(policy_server.TOKEN_ENV)
        common.require(token is None or (len(token) >= 8 and token.isascii() and token.isprintable()
                                         and " " not in token),
                       "the token must be at least 8 printable ASCII characters without spaces")
        common.require(token is not None or args.insecure or policy_server.is_loopback(args.host),
                       f"--host {args.host} is reachable from other machines, and without a token anyone who reaches "
                       f"it steers the robot: set {policy_server.TOKEN_ENV} (or --token), or pass --insecure")


if __name__ == "__main__":
    args = tyro.cli(Args)  # --help, mistyped flags and bad values answer before torch loads
    check_args(args)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("robot_deploy")


def safe_action(args, action_dim):
    """The safe action [Da]: --safe-action, or zero motion (every env here takes delta / relative actions: zero holds
    the arm's pose and the gripper's opening). Dims in --hold-dims repeat their last sent value instead."""
    safe = np.zeros(action_dim, np.float32) if args.safe_action is None else np.float32(args.safe_action)
    common.require(safe.shape == (action_dim,), f"--safe-action has {safe.size} values, the actions {action_dim}")
    common.require(np.isfinite(safe).all() and (np.abs(safe) <= args.max_action).all(),
                   f"--safe-action must be finite and within +-{args.max_action:g} (--max-action), not {safe.tolist()}")
    common.require(all(0 <= i < action_dim for i in args.hold_dims), f"--hold-dims must be in 0..{action_dim - 1}")
    return safe


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
# ALGO LOGIC: chunk execution (which action goes out at each tick), the watchdog and the safe action
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
    """Runs inference in a thread, so the caller can stop waiting for it (the watchdog). threaded=False: inline,
    without the hand-off; a late chunk is still replaced by the safe action, but that goes out late. One worker
    serves every session of a server (one network call at a time; a late call makes the next ones wait for it)."""

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


def make_worker(policy, infer, threaded=True):
    return InferenceWorker(infer, [example_inputs(policy, 1, np.random.default_rng(i)) for i in range(20)], threaded)


class Controller:
    """One robot's state (a server: one session's): the observation history, the noise generator, the chunk
    executor, the failure counts and the action limits. plan() is one network call under the watchdog; every
    failure path returns the safe chunk. step() is one control tick of the sim loop."""

    def __init__(self, policy, worker, args, low, high):
        self.n_obs_steps, self.noise_shape, self.ta = policy.n_obs_steps, policy.noise_shape, policy.n_action_steps
        self.chunk_length = policy.horizon - policy.n_obs_steps + 1  # forward's contract: from the current step on
        self.worker, self.rng = worker, np.random.default_rng(args.seed)
        self.executor = ChunkExecutor(policy.n_action_steps, args.execution, args.ensemble_decay)
        self.low, self.high = np.maximum(low, -args.max_action), np.minimum(high, args.max_action)
        self.timeout = args.inference_timeout_ms / 1e3 or 0.5 / args.hz
        self.safe = np.minimum(np.maximum(safe_action(args, policy.action_dim), self.low), self.high)
        self.hold, self.max_failures = list(args.hold_dims), args.max_consecutive_failures
        self.last, self.failures, self.consecutive_failures = self.safe.copy(), 0, 0
        self.reset()

    def reset(self):
        """A new episode: forget the observation history and the queued chunks."""
        self.history = None
        self.executor.reset()

    def observe(self, obs):
        """obs [Do]: appended to the history (the first of an episode fills it); [To, Do]: the whole history."""
        if obs.ndim == 2:
            self.history = obs
            return
        if self.history is None:
            self.history = np.repeat(obs[None], self.n_obs_steps, 0)
        self.history = np.concatenate([self.history[1:], obs[None]])  # a new array: a late call may still read the old

    def safe_action(self):
        action = self.safe.copy()
        action[self.hold] = self.last[self.hold]
        return action

    def plan(self, t_obs):
        """The chunk [T, Da] for the history, clipped, and its status: "ok"; "late" (the watchdog fired); "failed"
        (inference raised or returned non-finite values; logged and counted). Not ok: the safe action, T times."""
        z = self.rng.standard_normal((1, *self.noise_shape), dtype=np.float32)
        try:
            chunk = self.worker(self.history[None], z, t_obs + self.timeout - time.perf_counter())
            if chunk is not None and not np.isfinite(chunk).all():
                raise FloatingPointError("the policy returned non-finite actions")
        except Exception as e:
            self.failures, self.consecutive_failures = self.failures + 1, self.consecutive_failures + 1
            log.warning(f"inference failed ({type(e).__name__}: {e}); the safe action goes out "
                        f"({self.consecutive_failures} in a row, {self.failures} in all)")
            return np.tile(self.safe_action(), (self.chunk_length, 1)), "failed"
        if chunk is None:
            return np.tile(self.safe_action(), (self.chunk_length, 1)), "late"
        self.consecutive_failures = 0
        return np.minimum(np.maximum(chunk[0], self.low), self.high).astype(np.float32), "ok"

    def should_stop(self):
        return 0 < self.max_failures <= self.consecutive_failures

    def step(self, obs, t_obs):
        """obs [Do] received at time t_obs -> (action [Da], a chunk was inferred, the safe action went out)."""
        self.observe(obs)
        status = None
        if self.executor.needs_chunk():
            chunk, status = self.plan(t_obs)
            if status == "ok":
                self.executor.add(chunk)
        action = self.executor.next()
        safe = status in ("late", "failed") or action is None
        self.last = self.safe_action() if safe else action.astype(np.float32)  # (within the limits: clipped chunks)
        return self.last, status == "ok", safe


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
    """Per-tick records after warm-up: latency (observation -> action), chunk inferred, safe action sent, jitter,
    deadline missed, ticks skipped before this one. A server has no ticks: its jitter is nan, its misses 0. The
    percentiles cover the last `window` ticks, in a buffer allocated once (a server runs for days); counts cover all."""

    def __init__(self, warmup, window=1 << 16):
        self.warmup, self.seen, self.n = warmup, 0, 0
        self.rows, self.counts = np.full((window, 6), np.nan), np.zeros(6, np.int64)  # counts: columns 1, 2, 4, 5

    def add(self, latency, inferred, watchdog, jitter=float("nan"), miss=False, skipped=0):
        self.seen += 1
        if self.seen > self.warmup:
            self.rows[self.n % len(self.rows)] = latency, inferred, watchdog, jitter, miss, skipped
            self.counts += (0, inferred, watchdog, 0, miss, skipped)
            self.n += 1

    def summary(self):
        r = self.rows[:min(self.n, len(self.rows))]
        pct = lambda x, name: {f"{name}_{k}_ms": float(np.percentile(x, q)) * 1e3 if len(x) else float("nan")
                               for k, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))}
        misses = int(self.counts[4] + self.counts[5])
        return {"ticks": self.n, "warmup_ticks": min(self.seen, self.warmup), **pct(r[:, 0], "latency"),
                **pct(r[r[:, 1] > 0, 0], "chunk_latency"), **pct(r[~np.isnan(r[:, 3]), 3], "jitter"),
                "chunks": int(self.counts[1]), "watchdog_ticks": int(self.counts[2]),
                "skipped_ticks": int(self.counts[5]), "deadline_misses": misses,
                "deadline_miss_pct": 100.0 * misses / max(self.n + self.counts[5], 1)}

    def report(self, s):
        def line(name, k):
            return f"  {name:<32}" + "  ".join(f"{q} {s[f'{k}_{q}_ms']:.3f}" for q in ("p50", "p95", "p99", "max"))

        lines = [line("observation -> action (ms)", "latency"), line(f"  ticks with a new chunk ({s['chunks']})",
                                                                      "chunk_latency")]
        if np.isfinite(s["jitter_p50_ms"]):  # a server has no ticks: the robot's client measures its deadlines
            lines += [line("jitter (late wake-up)", "jitter"), f"  deadline misses {s['deadline_misses']} "
                      f"({s['deadline_miss_pct']:.2f}%, skipped ticks included)"]
        return "\n".join(lines + [f"  safe action sent on {s['watchdog_ticks']} of {s['ticks']} ticks "
                                  f"({s['warmup_ticks']} warm-up ticks left out)"])


class SimRobot:
    """--robot sim: an environments.make_env env stands in for the robot (evaluation seeds, one per episode)."""

    def __init__(self, env_id, seed, num_episodes, max_episode_steps=None):
        self.env, self.seed = environments.make_env(env_id, seed, max_episode_steps), seed
        self.num_episodes, self.successes = num_episodes, []
        self.reset()

    def reset(self):
        self.obs, _ = self.env.reset(seed=environments.EVAL_SEED_OFFSET + self.seed + len(self.successes))
        self.success = False

    def apply(self, action):
        """Step the sim; returns True at the end of an episode."""
        self.obs, _, terminated, truncated, info = self.env.step(action)
        self.success |= bool(info["success"])
        if terminated or truncated:
            self.successes.append(self.success)
        return terminated or truncated


def run_loop(robot, controller, hz, stats, stop, max_ticks=0, busy_wait_s=1e-3):
    """The control loop; it stops early after --max-consecutive-failures (the safe action applied). Episode resets
    happen outside the timed ticks (a real robot pauses there too)."""
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
        if controller.should_stop():
            log.error(f"stopping: inference failed {controller.consecutive_failures} times in a row")
            break
        if done and len(robot.successes) < robot.num_episodes:
            robot.reset(), controller.reset(), scheduler.restart()


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("robot_deploy.websockets").setLevel(logging.WARNING)  # refused handshakes: not worth a line
    if args.capture_video:
        raise common.UserError("--capture-video is not supported by robot_deploy.py (rendering breaks the real-time "
                               "loop); record videos with the training script's --capture-video")
    token = (args.token or os.environ.get(policy_server.TOKEN_ENV)) if args.robot == "server" else None
    args.checkpoint = args.checkpoint or tiny_lift_checkpoint()
    ckpt = common.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    policy = common.load_policy(args.checkpoint, env_id=args.env_id, trust=args.trust_checkpoint)  # refuses another env
    safe = safe_action(args, policy.action_dim)
    args.env_id = args.env_id or ckpt["env_id"]
    run_name, run_dir, writer = common.make_run(dataclasses.replace(args, token=token and "<redacted>"))

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
          f"eager within {err:.1e}; safe action {safe.tolist()}" + (f" holding dims {list(args.hold_dims)}"
                                                                   if args.hold_dims else ""))

    stop, stats = threading.Event(), LoopStats(args.warmup_ticks)
    worker = make_worker(policy, infer, args.inference_thread)
    result = {}
    if args.robot == "sim":
        if message := rt_throttling_warning(args.hz, args.busy_wait_us * 1e-6):
            print(message)

        def on_sigint(*_):  # first Ctrl-C: stop cleanly and print the statistics; a second one: stop at once
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()

        signal.signal(signal.SIGINT, on_sigint)
        robot = SimRobot(args.env_id, args.seed, args.num_episodes)
        controller = Controller(policy, worker, args, robot.env.action_space.low, robot.env.action_space.high)
        print(f"{args.execution} execution at {args.hz:g} Hz", flush=True)
        try:
            run_loop(robot, controller, args.hz, stats, stop, args.max_ticks, args.busy_wait_us * 1e-6)
        finally:
            robot.env.close()
        result = {"episodes": len(robot.successes), "successes": sum(robot.successes)}
        failures = controller.failures
    else:
        new_session = lambda: Controller(policy, worker, args, -np.ones(policy.action_dim), np.ones(policy.action_dim))
        metadata = policy_server.server_metadata(policy, ckpt, args, safe)
        server = policy_server.PolicyServer(policy, new_session, args, metadata, token, stats)
        asyncio.run(server.run(args.host, args.port))
        failures = server.failures
    worker.close()

    # TRY NOT TO MODIFY: statistics, printed and logged (TensorBoard time/ and runs/{run_name}/deploy_stats.json)
    summary = {**stats.summary(), **result, "inference_failures": failures, "backend": args.backend, "hz": args.hz,
               "parity_error": err}
    print(f"{args.robot} ({args.backend}, {args.execution}, {args.hz:g} Hz):\n{stats.report(summary)}")
    print(f"  inference failed {failures} times" + (f"; success in {result['successes']} of {result['episodes']} "
                                                    f"finished episodes" if result else ""))
    summary = {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in summary.items()}
    for k, v in summary.items():
        if isinstance(v, (int, float)):
            writer.add_scalar(f"{'charts' if k in result else 'time'}/{k}", v, 0)
    with open(os.path.join(run_dir, "deploy_stats.json"), "w") as f:
        json.dump(summary, f, indent=2)
    writer.close()
