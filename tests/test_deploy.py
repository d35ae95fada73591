"""robot_deploy.py: backend parity, chunk execution, watchdog, scheduler, policy server (real client, malformed
requests, Ctrl-C), and the sim loop with DBP and DFP checkpoints. Loopback only; every loop bounded."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import common
import dfp_offline_to_online as dfp
import robot_deploy as rd
from dbp_bc import DriftPolicy
from examples.robot_client import PolicyClient
from tests.conftest import ROOT

ENV_ID = "cube-double-play-singletask-task2-v0"  # Do = 37, Da = 5; builds in ~1 s


def save(path, policy_module, policy_kwargs, **state):
    common.save_checkpoint(path, dict(policy_module=policy_module, policy_kwargs=policy_kwargs, env_id=ENV_ID,
                                      args={}, run_name="test", step=0, **state))
    return path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Tiny checkpoints with the keys the training scripts save: DBP MLP (To 1, H = Ta = 4), DBP U-Net
    (To 2, H 8, Ta 4), DFP (best-of-4, H 5)."""
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
    c = rd.Controller(policy, big, args_for(max_action=0.5), -np.ones(5), np.ones(5))
    action, inferred, watchdog = c.step(np.zeros(37, np.float32), time.perf_counter())
    assert inferred and not watchdog and np.all(action == 0.5)
    nan = lambda obs, z: np.full((1, 4, 5), np.nan, np.float32)
    c = rd.Controller(policy, nan, args_for(safe_action=(0.1, 0, 0, 0, -0.2)), -np.ones(5), np.ones(5))
    action, _, watchdog = c.step(np.zeros(37, np.float32), time.perf_counter())
    assert watchdog and np.allclose(action, [0.1, 0, 0, 0, -0.2])
    with pytest.raises(common.UserError):
        rd.Controller(policy, big, args_for(safe_action=(0.0, 0.0)), -np.ones(5), np.ones(5))


def test_watchdog_sends_the_safe_action_when_inference_is_late(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    eager = lambda obs, z: rd.eager_chunk(policy, obs, z)
    delay = {"s": 0.0}

    def slow(obs, z):
        time.sleep(delay["s"])
        return eager(obs, z)

    for safe in (None, (0.0, 0.0, 0.0, 0.0, 1.0)):
        c = rd.Controller(policy, slow, args_for(inference_timeout_ms=50.0, safe_action=safe), -np.ones(5), np.ones(5))
        obs = np.zeros(37, np.float32)
        first = [c.step(obs, time.perf_counter()) for _ in range(4)]  # one fast chunk of Ta = 4
        assert first[0][1] and not any(w for _, _, w in first)
        delay["s"] = 0.3
        t = time.perf_counter()
        action, inferred, watchdog = c.step(obs, t)
        assert watchdog and not inferred and time.perf_counter() - t < 0.2  # did not wait for the slow call
        np.testing.assert_allclose(action, first[-1][0] if safe is None else safe)  # hold the last, or the safe one
        assert c.step(obs, time.perf_counter())[2]  # the late call is still running: still the safe action
        delay["s"] = 0.0
        time.sleep(0.35)  # the late chunk finishes and is dropped; the next tick plans from a fresh observation
        action, inferred, watchdog = c.step(obs, time.perf_counter())
        assert inferred and not watchdog
        c.worker.close()
    # Inline inference (--no-inference-thread): a late chunk is still replaced by the safe action, after the call.
    c = rd.Controller(policy, slow, args_for(inference_timeout_ms=50.0, inference_thread=False, safe_action=(0.0,) * 5),
                      -np.ones(5), np.ones(5))
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
        self.obs, self.period, self.n = np.zeros(obs_dim, np.float32), period, 0
        self.successes, self.num_episodes = [], 1

    def apply(self, action):
        self.n += 1
        time.sleep(3.5 * self.period if self.n == 5 and self.period < 1 else 0)
        return False


def test_loop_counts_late_and_skipped_ticks_as_deadline_misses(ckpts):
    policy = common.load_policy(ckpts["dbp"])
    eager = lambda o, z: rd.eager_chunk(policy, o, z)
    slow = lambda o, z: (time.sleep(0.015), eager(o, z))[1]  # 1.5 periods at 100 Hz
    for infer, robot in ((slow, StallingRobot(37, 1e9)), (eager, StallingRobot(37, 0.01))):
        controller = rd.Controller(policy, infer, args_for(), -np.ones(5), np.ones(5))
        stats = rd.LoopStats(0)
        rd.run_loop(robot, controller, 100.0, stats, threading.Event(), max_ticks=10)
        controller.worker.close()
        s = stats.summary()
        if infer is slow:  # a new chunk at ticks 0, 4, 8: each action is ready after its tick's slot
            assert s["ticks"] == 10 and s["deadline_misses"] >= 3 and s["chunk_latency_p50_ms"] > 10, s
        else:  # the 5th tick stalls 3.5 periods: the loop skips whole periods (2, or 3 if that tick itself ran
            # late on a busy machine) and wakes late by the rest, so skipped periods + lateness >= 2.5 periods
            skipped = int(np.array(stats.rows)[:, 5].sum())
            assert s["ticks"] == 10 and skipped >= 2 and s["deadline_misses"] >= skipped, s
            assert 10 * skipped + s["jitter_max_ms"] >= 25 - 0.5, (skipped, s)


def serve_in_thread(policy, infer, args):
    controller = rd.Controller(policy, infer, args, -np.ones(policy.action_dim), np.ones(policy.action_dim))
    ctx, sock, endpoint = rd.bind_server("127.0.0.1", 0, args.max_msg_bytes)
    stats, stop = rd.LoopStats(0), threading.Event()
    thread = threading.Thread(target=rd.serve, args=(sock, policy, controller, stats, stop, args.max_msg_bytes, 200))
    thread.start()
    return endpoint, stats, stop, thread, (sock, ctx, controller)


def stop_server(stop, thread, resources):
    stop.set()
    thread.join(timeout=5)
    sock, ctx, controller = resources
    sock.close(), ctx.term(), controller.worker.close()
    assert not thread.is_alive()


def test_server_answers_a_real_client_over_loopback(ckpts, tmp_path):
    policy = common.load_policy(ckpts["dbp"])
    args = args_for(seed=3)
    endpoint, stats, stop, thread, res = serve_in_thread(policy, rd.make_backend(policy, "onnx", str(tmp_path)), args)
    client = PolicyClient(endpoint, timeout_ms=2000)
    try:
        assert client.info() == {"obs_dim": 37, "action_dim": 5, "n_obs_steps": 1, "horizon": 4, "n_action_steps": 4}
        obs = np.random.default_rng(0).uniform(-1, 2, (6, 37)).astype(np.float32)
        replies = [client.act(o, reset=i == 0) for i, o in enumerate(obs)]
        assert [r["inferred"] for r in replies] == [True, False, False, False, True, False]
        z = np.random.default_rng(3).standard_normal((1, 4, 5), dtype=np.float32)  # the server's first noise draw
        want = rd.eager_chunk(policy, obs[None, :1], z)[0]
        np.testing.assert_allclose(np.stack([r["action"] for r in replies[:4]]), want, atol=1e-5)
        assert stats.summary()["ticks"] == 6
    finally:
        client.close()
        stop_server(stop, thread, res)


def test_server_replies_errors_to_malformed_requests_and_keeps_serving(ckpts, tmp_path):
    policy = common.load_policy(ckpts["dbp"])
    args = args_for(max_msg_bytes=4096)
    endpoint, stats, stop, thread, res = serve_in_thread(policy, lambda o, z: rd.eager_chunk(policy, o, z), args)
    client = PolicyClient(endpoint, timeout_ms=2000)
    arr = lambda x, dtype="float32": {"dtype": dtype, "shape": list(x.shape), "data": x.tobytes()}
    good = np.zeros(37, np.float32)
    bad = {"wrong shape": {"obs": arr(np.zeros(36, np.float32))},
           "wrong dtype": {"obs": arr(np.zeros(37, np.float64), "float64")},
           "NaN": {"obs": arr(np.where(np.arange(37) == 5, np.nan, good).astype(np.float32))},
           "short data": {"obs": {"dtype": "float32", "shape": [37], "data": b"\x00" * 10}},
           "garbage bytes": b"\xc1\xff\x00garbage",
           "not a map": [1, 2, 3],
           "oversized": {"obs": arr(good), "pad": b"x" * 5000}}
    try:
        for what, msg in bad.items():
            reply = client.request(msg)
            assert reply is not None and set(reply) == {"error"}, (what, reply)
            assert client.act(good)["action"].shape == (5,), what  # still serving after each bad request
        assert "[5]" in client.request(bad["NaN"])["error"] and "4096" in client.request(bad["oversized"])["error"]
        assert thread.is_alive()
    finally:
        client.close()
        stop_server(stop, thread, res)


@pytest.mark.parametrize("name", ["dbp", "unet", "dfp"])
def test_sim_loop_runs_a_checkpoint_at_rate(ckpts, tmp_path, name):
    policy = common.load_policy(ckpts[name], env_id=ENV_ID)
    robot = rd.SimRobot(ENV_ID, seed=0, num_episodes=1)
    args = args_for(execution="ensemble" if name == "unet" else "receding")
    controller = rd.Controller(policy, rd.make_backend(policy, "onnx", str(tmp_path)), args,
                               robot.env.action_space.low, robot.env.action_space.high)
    stats, n, obs0 = rd.LoopStats(2), 12, robot.obs.copy()
    rd.run_loop(robot, controller, args.hz, stats, threading.Event(), max_ticks=n)
    s = stats.summary()
    assert s["ticks"] == n - 2 and s["chunks"] == (n - 2 if name == "unet" else (n - 2) // policy.n_action_steps)
    assert s["latency_max_ms"] < 500 and np.isfinite(s["jitter_p50_ms"]) and s["watchdog_ticks"] == 0
    assert np.abs(robot.obs - obs0).max() > 0  # the sim moved
    robot.env.close(), controller.worker.close()


def test_cli_server_stops_cleanly_on_ctrl_c(ckpts, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "robot_deploy.py"), "--checkpoint", ckpts["dfp"], "--robot", "server",
           "--port", "0", "--backend", "torchscript", "--warmup-ticks", "2", "--inference-timeout-ms", "1000"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving on"):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        client = PolicyClient(lines[-1].split()[2], timeout_ms=5000)
        assert all(client.act(np.zeros(37, np.float32), reset=i == 0)["action"].shape == (5,) for i in range(8))
        client.close()
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "observation -> action" in out and "watchdog fired on 0 of 6 ticks" in out
    stats_file, = glob.glob(str(tmp_path / "runs" / f"{ENV_ID}__robot_deploy__1__*" / "deploy_stats.json"))
    assert json.load(open(stats_file))["ticks"] == 6


def test_cli_refuses_a_checkpoint_of_another_env(ckpts, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "robot_deploy.py"), "--checkpoint", ckpts["dbp"], "--env-id", "lift"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "trained on 'cube-double" in proc.stderr and "Traceback" not in proc.stderr
