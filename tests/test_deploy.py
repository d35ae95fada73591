"""robot_deploy.py: backend parity, chunk execution, the watchdog and every failure path (safe action, counters,
stop), zero motion, start-up checks, the request parser, the scheduler, the sim loop, and the policy server with
the real openpi client: metadata, actions equal to common.load_policy(...).act for the same noise, an
ActionChunkBroker episode loop on lift against the in-process loop, and the token. The fuzz run and session
isolation are in tests/test_server_fuzz.py. Loopback only; every loop bounded."""

import glob
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import msgpack
import numpy as np
import pytest
import torch
from openpi_client import msgpack_numpy
from openpi_client.action_chunk_broker import ActionChunkBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import InvalidStatus

import common
import environments
import dfp_offline_to_online as dfp
import policy_server as ps
import robot_deploy as rd
from dbp_bc import DriftPolicy
from tests.conftest import ROOT
from tests.test_server_fuzz import start_server

ENV_ID = "cube-double-play-singletask-task2-v0"  # Do = 37, Da = 5; builds in ~1 s
RD = os.path.join(ROOT, "robot_deploy.py")
# openpi's client calls websockets' connect() the way websockets 17 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:connect.. must be used as a context manager:DeprecationWarning")


def save(path, policy_module, policy_kwargs, **state):
    common.save_checkpoint(path, dict(policy_module=policy_module, policy_kwargs=policy_kwargs, env_id=ENV_ID,
                                      args={}, run_name="test", step=0, **state))
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Tiny random-weight checkpoints with the keys the training scripts save: DBP MLP (To 1, H = Ta = 4), DBP
    U-Net (To 2, H 8, Ta 4), DFP (best-of-4, H 5)."""
    d, rng = tmp_path_factory.mktemp("ckpts"), np.random.default_rng(0)
    torch.manual_seed(0)
    out = {}
    for name, kw in (("dbp", dict(n_obs_steps=1, horizon=4, n_action_steps=4, hidden_dims=(32, 32))),
                     ("unet", dict(n_obs_steps=2, horizon=8, n_action_steps=4, backbone="unet", unet_dims=(8, 16)))):
        kw = dict(obs_dim=37, action_dim=5, **kw)
        policy = DriftPolicy(**kw)
        policy.set_normalizer(rng.uniform(-1, 2, (100, 37)), rng.uniform(-0.9, 0.9, (100, 5)))
        out[name] = save(str(d / f"{name}.pt"), "dbp_bc", kw, model=policy.state_dict(), ema_model=policy.state_dict())
    kw = dict(obs_dim=37, action_dim=5, horizon=5, hidden_dims=(32, 32), num_qs=2, n_best=4)
    policy = dfp.DFPPolicy(**kw)
    out["dfp"] = save(str(d / "dfp.pt"), "dfp_offline_to_online", kw, actor=policy.actor.state_dict(),
                      critic=policy.critic.state_dict())
    return out


def args_for(**kw):
    """Deployment args; a generous watchdog (1 s) unless a test sets it: the test machine may be busy."""
    return rd.Args(**{"hz": 100.0, "warmup_ticks": 0, "inference_timeout_ms": 1000.0, **kw})


def controller_for(policy, infer, low=-1.0, high=1.0, **kw):
    args = args_for(**kw)
    worker = rd.InferenceWorker(infer, threaded=args.inference_thread)
    dim = policy.action_dim
    return rd.Controller(policy, worker, args, np.full(dim, low), np.full(dim, high))


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", ["dbp", "unet", "dfp"])
def test_backends_match_eager_with_the_same_z(ckpts, tmp_path, name, backend):
    policy = common.load_policy(ckpts[name])
    infer = rd.make_backend(policy, backend, str(tmp_path))
    assert rd.check_parity(policy, infer, tol=1e-5, n=8) <= 1e-5
    obs, z = rd.example_inputs(policy, 1, np.random.default_rng(1))
    chunk = infer(obs, z)
    assert chunk.shape == (1, policy.horizon - policy.n_obs_steps + 1, policy.action_dim)  # from the current step on
    assert chunk.dtype == np.float32
    assert np.abs(chunk - infer(obs, -z)).max() > 1e-3  # z is a real input, not a constant folded in
    # Returned chunks are copies (ONNX writes into one preallocated buffer), and strided inputs read correctly.
    strided = lambda x: np.repeat(x, 2, axis=-1)[..., ::2]  # the same values, not contiguous
    assert not strided(obs).flags.c_contiguous
    again = infer(strided(obs), strided(z))
    np.testing.assert_array_equal(again, chunk)
    assert again is not chunk and not np.shares_memory(again, chunk)


def test_onnx_graph_is_fixed_to_batch_1(ckpts, tmp_path):
    """The exported graph is batch 1 (the deployment case) for every policy, DFP's best-of-N included, and ONNX
    Runtime refuses another batch rather than answer wrong."""
    import onnxruntime as ort

    for name in ("dbp", "dfp"):
        policy = common.load_policy(ckpts[name])
        rd.make_backend(policy, "onnx", str(tmp_path))
        session = ort.InferenceSession(str(tmp_path / "policy.onnx"), providers=["CPUExecutionProvider"])
        assert [i.shape[0] for i in session.get_inputs()] == [1, 1]
        obs, z = rd.example_inputs(policy, 3, np.random.default_rng(2))
        with pytest.raises(Exception):
            session.run(None, {"obs": obs, "z": z})


@pytest.mark.skipif(not os.environ.get("DEPLOY_TEST_COMPILE"), reason="torch.compile's first call takes 10-30 s on "
                    "this 2-core CPU (cold inductor cache); run with DEPLOY_TEST_COMPILE=1")
def test_compile_matches_eager(ckpts, tmp_path):
    policy = common.load_policy(ckpts["dbp"])
    assert rd.check_parity(policy, rd.make_backend(policy, "compile", str(tmp_path)), tol=1e-5) <= 1e-5


def test_receding_horizon_executes_the_first_ta_actions_then_replans():
    ex = rd.ChunkExecutor(n_action_steps=4)
    chunk = np.arange(5, dtype=np.float32)[:, None]  # the actions from the current step on (T = H - To + 1 >= Ta)
    assert ex.needs_chunk()
    ex.add(chunk)
    assert not ex.needs_chunk()
    got = [ex.next()[0] for _ in range(4)]
    assert got == [0, 1, 2, 3] and ex.needs_chunk() and ex.next() is None  # no stale chunk past Ta


def test_temporal_ensembling_weights_overlapping_chunks_oldest_first():
    m = 0.5
    ex = rd.ChunkExecutor(n_action_steps=1, mode="ensemble", decay=m)
    chunks = [np.full((3, 1), v, np.float32) for v in (0.0, 1.0, 2.0, 3.0)]
    actions = []
    for c in chunks:
        assert ex.needs_chunk()
        ex.add(c)
        actions.append(ex.next()[0])
    w = np.exp(-m * np.arange(3))
    assert actions[0] == 0.0 and np.isclose(actions[1], (w[0] * 0 + w[1] * 1) / w[:2].sum())
    assert np.isclose(actions[3], (w[0] * 1 + w[1] * 2 + w[2] * 3) / w.sum())  # chunk 0 (H = 3) has expired


def test_controller_clips_and_replaces_non_finite_actions(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    big = lambda obs, z: np.full((1, 4, 5), 7.0, np.float32)
    c = controller_for(policy, big, max_action=0.5)
    action, inferred, safe = c.step(np.zeros(37, np.float32), time.perf_counter())
    assert inferred and not safe and np.all(action == 0.5)
    nan = lambda obs, z: np.full((1, 4, 5), np.nan, np.float32)
    c = controller_for(policy, nan, safe_action=(0.1, 0, 0, 0, -0.2))
    action, _, safe = c.step(np.zeros(37, np.float32), time.perf_counter())
    assert safe and np.allclose(action, [0.1, 0, 0, 0, -0.2]) and c.failures == 1  # non-finite: a failure
    for bad in (dict(safe_action=(0.0, 0.0)), dict(safe_action=(np.nan,) * 5), dict(safe_action=(2.0,) * 5),
                dict(hold_dims=(5,))):
        with pytest.raises(common.UserError):
            controller_for(policy, big, **bad)


@pytest.mark.parametrize("threaded", [True, False])
def test_an_inference_exception_sends_the_safe_action_is_counted_and_stops_the_loop(ckpts, threaded, caplog):
    policy = common.load_policy(ckpts["dbp"])
    calls = {"n": 0}

    def flaky(obs, z):  # raises on calls 2 and 3, then works
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("CUDA error: an illegal memory access")
        return np.full((1, 4, 5), 0.5, np.float32)

    c = controller_for(policy, flaky, inference_thread=threaded, max_consecutive_failures=3)
    obs = np.zeros(37, np.float32)
    with caplog.at_level(logging.WARNING, logger="robot_deploy"):
        out = [c.step(obs, time.perf_counter()) for _ in range(4)]  # one chunk of Ta = 4
        out += [c.step(obs, time.perf_counter()) for _ in range(2)]  # calls 2 and 3 raise: the safe action
        assert c.failures == 2 and c.consecutive_failures == 2 and not c.should_stop()
        out.append(c.step(obs, time.perf_counter()))  # call 4 works again
    assert [o[2] for o in out] == [False] * 4 + [True, True, False]
    assert all(not o[0].any() for o in out[4:6]) and out[6][0][0] == 0.5  # zero motion on the failed ticks
    assert c.consecutive_failures == 0 and c.failures == 2
    assert sum("inference failed (RuntimeError: CUDA error" in r.message for r in caplog.records) == 2

    # Always failing: the loop sends the safe action on each tick, then stops after 3 failures in a row.
    def broken(obs, z):
        raise ValueError("broken")

    for limit, ticks in ((3, 3), (0, 12)):  # 0: never stop (the loop then ends at max_ticks)
        c = controller_for(policy, broken, inference_thread=threaded, max_consecutive_failures=limit)
        robot = StallingRobot(37, 1e9)
        stats = rd.LoopStats(0)
        rd.run_loop(robot, c, 1000.0, stats, threading.Event(), max_ticks=12, busy_wait_s=0)
        assert robot.n == ticks and all(not a.any() for a in robot.actions), (limit, robot.n)
        assert c.failures == ticks and stats.summary()["watchdog_ticks"] == ticks
        c.worker.close()


def test_safe_action_is_zero_motion_by_default_and_can_hold_dims(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    chunk = np.tile(np.float32([0.3, -0.3, 0.2, 0.1, 0.9]), (1, 4, 1))
    calls = {"n": 0}

    def first_only(obs, z):  # one good chunk, then every call fails
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("down")
        return chunk

    for hold, want in (((), [0, 0, 0, 0, 0]), ((4,), [0, 0, 0, 0, 0.9])):
        calls["n"] = 0
        c = controller_for(policy, first_only, hold_dims=hold)
        for _ in range(4):
            c.step(np.zeros(37, np.float32), time.perf_counter())
        action, _, safe = c.step(np.zeros(37, np.float32), time.perf_counter())
        assert safe and np.allclose(action, want), (hold, action)  # the gripper dim held at its last command


def test_zero_action_stops_the_lift_arm_and_holds_its_gripper():
    """Why zero is the default safe action: robosuite's OSC takes pose deltas, and its Panda gripper integrates the
    sign of its command, so zero holds both. Repeating the last action (the old default) keeps the arm moving."""
    env = environments.make_env("lift", 0)
    obs, _ = env.reset(seed=0)
    state = lambda o: np.concatenate([o[:3], o[7:9]])  # eef position, gripper joint positions
    move = np.float32([0.5, 0, -0.3, 0, 0, 0, 1.0])  # move and close the gripper
    for _ in range(10):
        obs = env.step(move)[0]
    traj = [state(env.step(np.zeros(7, np.float32))[0]) for _ in range(20)]
    settled = np.abs(np.diff(traj[10:], axis=0)).sum(0)
    assert settled[:3].sum() < 1e-3 and settled[3:].sum() < 1e-3, settled  # at rest after ~10 ticks
    held = [state(env.step(move)[0]) for _ in range(10)]
    assert np.linalg.norm(held[-1][:3] - held[0][:3]) > 0.02  # the last action repeated: still moving (> 2 cm)
    env.close()


@pytest.mark.parametrize("flags, message", [
    (["--safe-action", "nan", "0", "0", "0", "0"], "--safe-action must be finite"),
    (["--max-action", "-0.5"], "--max-action must be a finite number > 0"),
    (["--max-action", "inf"], "--max-action must be a finite number > 0"),
    (["--robot", "server", "--host", "0.0.0.0"], "reachable from other machines"),
    (["--robot", "server", "--host", "192.168.1.5", "--token", "short"], "at least 8 printable"),
    (["--safe-action", "0", "0"], "--safe-action has 2 values, the actions 5"),
])
def test_cli_refuses_unsafe_settings_at_start_up(ckpts, tmp_path, flags, message):
    env = {k: v for k, v in os.environ.items() if k != ps.TOKEN_ENV}
    proc = subprocess.run([sys.executable, RD, "--checkpoint", ckpts["dbp"], *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # before any work


def test_parse_request_accepts_openpi_arrays_lists_and_histories():
    obs = np.arange(37, dtype=np.float32)
    for req in ({"observation/state": obs}, {"state": obs.astype(np.float64)}, {"state": obs.tolist()},
                {"state": obs.astype(np.int16), "prompt": "lift the cube", "observation/image": np.zeros((4, 4, 3),
                                                                                                     np.uint8)}):
        got, reset, seed = ps.parse_request(msgpack_numpy.packb(req), 37, 2)
        assert got.dtype == np.float32 and np.array_equal(got, obs) and reset is False and seed is None
    got, reset, seed = ps.parse_request(msgpack_numpy.packb({"state": np.stack([obs, -obs]), "reset": np.bool_(True),
                                                             "seed": 5}), 37, 2)
    assert got.shape == (2, 37) and reset is True and seed == 5  # a numpy bool comes as openpi's __npgeneric__
    bad = {"expected a binary frame": "text", "under one of ['observation/state', 'state'], got ['obs']":
           msgpack.packb({"obs": obs.tolist()}), "non-finite values (in float32) at indices [3]":
           msgpack_numpy.packb({"state": np.where(np.arange(37) == 3, np.inf, obs)}),
           "shape [37] or [2, 37], not dtype <f4 shape [36]": msgpack_numpy.packb({"state": obs[:36]})}
    for message, msg in bad.items():
        with pytest.raises(ps.RequestError, match=re.escape(message)):
            ps.parse_request(msg, 37, 2)


def test_server_answers_an_inference_failure_with_the_safe_chunk_and_closes_after_the_limit(ckpts, caplog):
    """The server's request path (in-process, without the event loop): a raising policy gets the safe action in
    every row, status "failed", a count; the third failure in a row also closes the session."""
    policy = common.load_policy(ckpts["dbp"])

    def broken(obs, z):
        raise RuntimeError("the GPU fell off the bus")

    args = args_for(max_consecutive_failures=3, hold_dims=(4,))
    worker = rd.InferenceWorker(broken)
    session = rd.Controller(policy, worker, args, -np.ones(5), np.ones(5))
    server = ps.PolicyServer(policy, None, args, {}, None, rd.LoopStats(0))
    session.last = np.float32([0.5, 0.5, 0.5, 0.5, -0.7])  # the last action sent: dim 4 is held
    request = msgpack_numpy.packb({"observation/state": np.zeros(37, np.float32)})
    with caplog.at_level(logging.WARNING, logger="robot_deploy"):
        replies = [server.answer(session, request, time.perf_counter(), 0.0) for _ in range(3)]
    for i, (reply, close) in enumerate(replies):
        r = msgpack_numpy.unpackb(reply)
        assert r["status"] == "failed" and not r["inferred"] and r["actions"].shape == (4, 5)
        assert (r["actions"] == np.float32([0, 0, 0, 0, -0.7])).all()  # zero motion, the gripper dim held
        assert close == (None if i < 2 else "stopping: inference failed 3 times in a row")
    assert server.failures == 3 and server.stats.summary()["watchdog_ticks"] == 3
    assert sum("the GPU fell off the bus" in r.message for r in caplog.records) == 3  # in the log, not the reply
    assert b"GPU" not in replies[0][0]
    reply, close = server.answer(session, b"\x81\xa5state\xc1", time.perf_counter(), 0.0)  # 0xc1: never valid
    assert reply is None and close.startswith("bad request: not a msgpack-numpy message")
    worker.close()


def test_watchdog_sends_the_safe_action_when_inference_is_late(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    eager = lambda obs, z: rd.eager_chunk(policy, obs, z)
    delay = {"s": 0.0}

    def slow(obs, z):
        time.sleep(delay["s"])
        return eager(obs, z)

    for safe in (None, (0.0, 0.0, 0.0, 0.0, 1.0)):
        delay["s"] = 0.0
        c = controller_for(policy, slow, inference_timeout_ms=50.0, safe_action=safe)
        obs = np.zeros(37, np.float32)
        first = [c.step(obs, time.perf_counter()) for _ in range(4)]  # one fast chunk of Ta = 4
        assert first[0][1] and not any(w for _, _, w in first)
        delay["s"] = 0.3
        t = time.perf_counter()
        action, inferred, watchdog = c.step(obs, t)
        assert watchdog and not inferred and time.perf_counter() - t < 0.2  # did not wait for the slow call
        np.testing.assert_allclose(action, np.zeros(5) if safe is None else safe)  # zero motion, or the given one
        assert c.step(obs, time.perf_counter())[2]  # the late call is still running: still the safe action
        assert c.failures == 0  # late is not a failure (it does not count towards --max-consecutive-failures)
        delay["s"] = 0.0
        time.sleep(0.35)  # the late chunk finishes and is dropped; the next tick plans from a fresh observation
        action, inferred, watchdog = c.step(obs, time.perf_counter())
        assert inferred and not watchdog
        c.worker.close()
    # Inline inference (--no-inference-thread): a late chunk is still replaced by the safe action, after the call.
    c = controller_for(policy, slow, inference_timeout_ms=50.0, inference_thread=False)
    delay["s"] = 0.1
    action, inferred, watchdog = c.step(obs, time.perf_counter())
    assert watchdog and not inferred and not action.any()
    delay["s"] = 0.0
    assert c.step(obs, time.perf_counter())[1]


def test_scheduler_keeps_the_rate_and_counts_skipped_ticks():
    s = rd.RateScheduler(hz=200, busy_wait_s=3e-4)
    ticks = [s.wait() for _ in range(20)]
    periods = np.diff(ticks) / 0.005  # 1 each, or more where the OS held the process past a whole period
    assert np.allclose(periods, np.round(periods)) and (np.round(periods) >= 1).all()  # a fixed grid: no drift
    assert s.skipped == round(periods.sum()) - len(periods)  # every period passed over is counted
    assert time.perf_counter() >= ticks[-1]
    skipped = s.skipped
    time.sleep(0.0225)  # stall 4.5 periods
    s.wait()
    assert s.skipped - skipped >= 3


def test_rt_throttling_warning_only_for_a_real_time_loop_that_spins_under_throttling(tmp_path, monkeypatch):
    def proc(runtime):
        (tmp_path / "sched_rt_runtime_us").write_text(f"{runtime}\n")
        (tmp_path / "sched_rt_period_us").write_text("1000000\n")
        return str(tmp_path)

    monkeypatch.setattr(rd.os, "sched_getscheduler", lambda pid: rd.os.SCHED_FIFO)
    message = rd.rt_throttling_warning(1000, 1e-3, proc(950000))
    assert "50 ms in every 1 s" in message and "sched_rt_runtime_us=-1" in message
    assert rd.rt_throttling_warning(1000, 1e-3, proc(-1)) is None  # throttling lifted
    assert rd.rt_throttling_warning(1000, 3e-4, proc(950000)) is None  # sleeps 70% of each period
    assert rd.rt_throttling_warning(20, 1e-3, proc(950000)) is None
    assert rd.rt_throttling_warning(1000, 1e-3, str(tmp_path / "missing")) is None
    monkeypatch.setattr(rd.os, "sched_getscheduler", lambda pid: rd.os.SCHED_OTHER)
    assert rd.rt_throttling_warning(1000, 1e-3, proc(950000)) is None  # not real-time: never throttled


class StallingRobot:
    """A stand-in robot whose 5th action takes 3.5 control periods (period 1e9: never)."""

    def __init__(self, obs_dim, period):
        self.obs, self.period, self.n, self.actions = np.zeros(obs_dim, np.float32), period, 0, []
        self.successes, self.num_episodes = [], 1

    def apply(self, action):
        self.n += 1
        self.actions.append(action.copy())
        time.sleep(3.5 * self.period if self.n == 5 and self.period < 1 else 0)
        return False


def test_loop_counts_late_and_skipped_ticks_as_deadline_misses(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    eager = lambda o, z: rd.eager_chunk(policy, o, z)
    slow = lambda o, z: (time.sleep(0.015), eager(o, z))[1]  # 1.5 periods at 100 Hz
    for infer, robot in ((slow, StallingRobot(37, 1e9)), (eager, StallingRobot(37, 0.01))):
        controller = controller_for(policy, infer)
        stats = rd.LoopStats(0)
        rd.run_loop(robot, controller, 100.0, stats, threading.Event(), max_ticks=10)
        controller.worker.close()
        s = stats.summary()
        if infer is slow:  # a new chunk at ticks 0, 4, 8: each action is ready after its tick's slot
            assert s["ticks"] == 10 and s["deadline_misses"] >= 3 and s["chunk_latency_p50_ms"] > 10, s
        else:  # the 5th tick stalls 3.5 periods: the loop skips whole periods (2, or 3 if that tick itself ran
            # late on a busy machine) and wakes late by the rest, so skipped periods + lateness >= 2.5 periods
            skipped = s["skipped_ticks"]
            assert s["ticks"] == 10 and skipped >= 2 and s["deadline_misses"] >= skipped, s
            assert 10 * skipped + s["jitter_max_ms"] >= 25 - 0.5, (skipped, s)


def test_loop_stats_keep_a_fixed_buffer():
    stats = rd.LoopStats(warmup=2, window=8)
    for i in range(20):
        stats.add(i * 1e-3, i % 4 == 0, i == 19)
    s = stats.summary()
    assert s["ticks"] == 18 and s["chunks"] == 4 and s["watchdog_ticks"] == 1  # counts: every tick after warm-up
    assert s["latency_p50_ms"] == pytest.approx(15.5) and s["latency_max_ms"] == pytest.approx(19)  # the last 8


@pytest.mark.parametrize("name", ["dbp", "unet", "dfp"])
def test_sim_loop_runs_a_checkpoint_at_rate(ckpts, tmp_path, name):
    policy = common.load_policy(ckpts[name], env_id=ENV_ID)
    robot = rd.SimRobot(ENV_ID, seed=0, num_episodes=1)
    args = args_for(execution="ensemble" if name == "unet" else "receding")
    worker = rd.make_worker(policy, rd.make_backend(policy, "onnx", str(tmp_path)))
    controller = rd.Controller(policy, worker, args, robot.env.action_space.low, robot.env.action_space.high)
    stats, n, obs0 = rd.LoopStats(2), 12, robot.obs.copy()
    rd.run_loop(robot, controller, args.hz, stats, threading.Event(), max_ticks=n)
    s = stats.summary()
    assert s["ticks"] == n - 2 and s["chunks"] == (n - 2 if name == "unet" else (n - 2) // policy.n_action_steps)
    assert s["latency_max_ms"] < 500 and np.isfinite(s["jitter_p50_ms"]) and s["watchdog_ticks"] == 0
    assert np.abs(robot.obs - obs0).max() > 0  # the sim moved
    robot.env.close(), worker.close()


def test_cli_sim_run_writes_its_statistics(ckpts, tmp_path):
    cmd = [sys.executable, RD, "--checkpoint", ckpts["dbp"], "--max-ticks", "12", "--hz", "100", "--warmup-ticks",
           "2", "--inference-timeout-ms", "1000", "--backend", "torchscript"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "observation -> action" in proc.stdout and "inference failed 0 times" in proc.stdout
    stats_file, = glob.glob(str(tmp_path / "runs" / f"{ENV_ID}__robot_deploy__1__*" / "deploy_stats.json"))
    assert json.load(open(stats_file))["ticks"] == 10


def test_cli_refuses_a_checkpoint_of_another_env(ckpts, tmp_path):
    proc = subprocess.run([sys.executable, RD, "--checkpoint", ckpts["dbp"], "--env-id", "lift"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "trained on 'cube-double" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# The server with the real openpi client, on a lift policy trained here
# ----------------------------------------------------------------------------------------------
LIFT_SEED, LIFT_EPISODES, LIFT_STEPS = 1, 20, 100  # episodes of at most 100 steps (the demos take about 60)
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def lift(tmp_path_factory):
    """A small lift DBP policy: 20 scripted demos (little noise) and a short dbp_bc.py run (about 1-2 min on 2
    busy cores), then `robot_deploy.py --robot server` with a token, eager backend (bit-exact with the in-process
    loop), on a free loopback port."""
    import make_datasets

    d = tmp_path_factory.mktemp("lift")
    data = str(d / "lift_20.hdf5")
    make_datasets.generate_robomimic("lift", data, num_demos=20, noise=0.05, hesitate=0.0, num_workers=1)
    cmd = [sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--env-id", "lift", "--dataset-path", data,
           "--total-steps", "3000", "--hidden-dims", "256", "256", "--eval-every", "3000", "--eval-episodes", "1",
           "--final-eval-episodes", "1", "--max-episode-steps", "10", "--num-eval-envs", "1", "--threads", "1",
           "--no-cuda"]
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt, = glob.glob(str(d / "runs" / "lift__dbp_bc__1__*" / "dbp.pt"))
    server, port, log = start_server(ckpt, str(d), "--backend", "eager", "--seed", str(LIFT_SEED),
                                     env={ps.TOKEN_ENV: TOKEN})
    yield {"ckpt": ckpt, "port": port, "proc": server, "log": log}
    server.kill()
    server.wait()


def test_openpi_client_reads_the_metadata_and_gets_the_actions_of_load_policy_act(lift):
    client = WebsocketClientPolicy("127.0.0.1", lift["port"], api_key=TOKEN)
    meta = client.get_server_metadata()
    policy = common.load_policy(lift["ckpt"])
    want = {"env_id": "lift", "algorithm": "dbp_bc", "obs_dim": 19, "action_dim": 7, "n_obs_steps": 1,
            "n_action_steps": policy.n_action_steps, "chunk_length": policy.horizon, "control_hz": 20.0,
            "checkpoint_sha256": hashlib.sha256(open(lift["ckpt"], "rb").read()).hexdigest(),
            "safe_action": [0.0] * 7, "state_keys": ["observation/state", "state"]}
    assert {k: meta[k] for k in want} == want
    env = environments.make_env("lift", 0)
    obs, _ = env.reset(seed=0)
    draw = np.random.default_rng(LIFT_SEED)  # the session's own noise generator: --seed
    for k in range(6):
        noise = lambda seed: np.random.default_rng(seed).standard_normal((1, *policy.noise_shape), dtype=np.float32)
        expect = lambda z: np.clip(policy.act(obs, z=z), -1, 1)
        reply = client.infer({"observation/state": obs, "seed": 100 + k})  # an explicit seed for this draw
        np.testing.assert_array_equal(reply["actions"], expect(noise(100 + k)))
        assert reply["actions"].shape == (policy.horizon, 7) and reply["status"] == "ok"
        assert set(reply["server_timing"]) == {"infer_ms", "prev_total_ms"} and reply["policy_timing"]["infer_ms"] > 0
        obs = env.step(reply["actions"][0])[0]
    env.close()
    fresh = WebsocketClientPolicy("127.0.0.1", lift["port"], api_key=TOKEN)  # a new session: its generator at --seed
    for k in range(3):
        z = draw.standard_normal((1, *policy.noise_shape), dtype=np.float32)
        np.testing.assert_array_equal(fresh.infer({"state": obs})["actions"], np.clip(policy.act(obs, z=z), -1, 1))
    with pytest.raises(RuntimeError, match="bad request: 'state' must be a number array of shape") as e:
        fresh.infer({"state": obs[:5]})
    assert "Traceback" not in str(e.value)


class RecordingRobot(rd.SimRobot):
    def apply(self, action):
        self.actions.append(action.copy())
        return super().apply(action)


def test_action_chunk_broker_episodes_match_the_in_process_loop(lift):
    """The same policy, seeds and noise: in-process (robot_deploy.run_loop) and through the server with openpi's
    ActionChunkBroker give the same actions, tick for tick, so the same successes over 20 episodes."""
    policy = common.load_policy(lift["ckpt"])
    robot = RecordingRobot("lift", LIFT_SEED, LIFT_EPISODES, LIFT_STEPS)
    robot.actions = []
    args = rd.Args(seed=LIFT_SEED, hz=1000.0, inference_timeout_ms=60_000.0)
    controller = rd.Controller(policy, rd.InferenceWorker(lambda o, z: rd.eager_chunk(policy, o, z), threaded=False),
                               args, robot.env.action_space.low, robot.env.action_space.high)
    rd.run_loop(robot, controller, args.hz, rd.LoopStats(0), threading.Event(), busy_wait_s=0)
    robot.env.close()

    client = WebsocketClientPolicy("127.0.0.1", lift["port"], api_key=TOKEN)
    broker = ActionChunkBroker(client, action_horizon=client.get_server_metadata()["n_action_steps"])
    env, actions, successes = environments.make_env("lift", LIFT_SEED, LIFT_STEPS), [], []
    for ep in range(LIFT_EPISODES):
        (obs, _), done, success, first = env.reset(seed=environments.EVAL_SEED_OFFSET + LIFT_SEED + ep), False, False, True
        broker.reset()
        while not done:
            action = broker.infer({"observation/state": obs, "reset": first})["actions"]
            first = False
            actions.append(action)
            obs, _, terminated, truncated, info = env.step(action)
            success, done = success or bool(info["success"]), terminated or truncated
        successes.append(success)
    env.close()
    print(f"lift: {sum(successes)} of {LIFT_EPISODES} in-process and {sum(robot.successes)} through the server")
    assert robot.successes == successes and len(successes) == LIFT_EPISODES
    np.testing.assert_array_equal(np.stack(robot.actions), np.stack(actions))


def test_a_token_is_required_and_healthz_is_open(lift):
    port = lift["port"]
    for key in (None, "wrong-token-0123456789", TOKEN + "x"):
        with pytest.raises(InvalidStatus) as e:
            WebsocketClientPolicy("127.0.0.1", port, api_key=key)
        assert e.value.response.status_code == 401
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read() == b"OK\n"
    assert WebsocketClientPolicy("127.0.0.1", port, api_key=TOKEN).get_server_metadata()["env_id"] == "lift"
    assert lift["proc"].poll() is None and "Traceback" not in open(lift["log"]).read()
    args_json, = glob.glob(os.path.join(os.path.dirname(lift["log"]), "runs", "lift__robot_deploy__*", "args.json"))
    assert json.load(open(args_json))["token"] == "<redacted>" and TOKEN not in open(args_json).read()
