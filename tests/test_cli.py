"""A user's first hour: presets, progress lines in log files, a fast --help, and one clear line for bad input."""
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT

import common
import environments
import make_datasets

TRAINING_SCRIPTS = ["dbp_bc.py", "dbpo_online.py", "dfp_offline_to_online.py"]


def load_script(name):
    import importlib

    return importlib.import_module(name.replace("/", ".").removesuffix(".py"))


def resolve(script, argv):
    module = load_script(script)
    args, _ = common.parse_args(module.Args, module.PRESETS, module.__name__, module.RESUMABLE, argv=argv)
    return module, args


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_preset_cpu_resolves_to_the_recipe_and_flags_override_it(script):
    module, paper = resolve(script, [])
    assert paper == module.Args() and paper.preset == "paper"
    _, cpu = resolve(script, ["--preset", "cpu", "--env-id", "lift"])
    for key, value in module.PRESETS["cpu"]["lift"].items():
        assert getattr(cpu, key) == value, key
    assert cpu.preset == "cpu"
    key, value = next(iter(module.PRESETS["cpu"]["lift"].items()))
    flag = "--" + key.replace("_", "-")
    override = str(value * 2) if isinstance(value, int) and not isinstance(value, bool) else None
    if override:
        _, mixed = resolve(script, ["--preset", "cpu", flag, override])
        assert getattr(mixed, key) == value * 2  # the explicit flag wins over the preset
        assert all(getattr(mixed, k) == v for k, v in module.PRESETS["cpu"]["lift"].items() if k != key)


def test_the_readme_recipes_are_the_presets():
    """The recipes the README reports, spelled out: a preset that drifts from them fails here."""
    _, dfp = resolve("dfp_offline_to_online.py", ["--preset", "cpu"])
    assert (dfp.offline_steps, dfp.online_steps, dfp.hidden_dims, dfp.start_training, dfp.eval_every) == \
        (15_000, 10_000, (256, 256, 256), 1_000, 5_000)
    assert dfp.actor_init == "he" and dfp.normalize_obs and dfp.lambda_topk == 0.5
    assert dfp.temperatures is None  # lift: the paper's Robomimic pair; square: the drifting models' three
    _, dfp_square = resolve("dfp_offline_to_online.py", ["--preset", "cpu", "--env-id", "square"])
    assert dfp_square.temperatures == (0.02, 0.05, 0.2) and dfp_square.offline_steps == dfp.offline_steps
    _, paper_square = resolve("dfp_offline_to_online.py", ["--preset", "cpu", "--env-id", "square", "--temperatures",
                                                           "0.005", "0.05"])
    assert paper_square.temperatures == (0.005, 0.05)
    _, dbpo = resolve("dbpo_online.py", ["--preset", "cpu"])
    assert (dbpo.pretrain_steps, dbpo.num_envs, dbpo.num_steps, dbpo.stop_iteration, dbpo.sigma_init) == (6000, 16, 64, 80, 0.2)
    assert dbpo.chunk_baseline and not dbpo.clip_logprob_action and dbpo.clip_coef == 0.1 and dbpo.eval_every == 80
    _, can = resolve("dbp_bc.py", ["--preset", "cpu", "--env-id", "can"])
    assert (can.learning_rate, can.max_episode_steps, can.total_steps) == (1e-3, 400, 40_000)
    assert can.dataset_path.endswith("can/scripted_mh_500_noise0.1_hesitate0.3_intended_hover0.07_aside0.4.hdf5")
    assert environments.generated_recipe(can.dataset_path)["labels"] == "intended"  # generated on first use


def test_preset_errors_are_one_clear_line():
    with pytest.raises(common.UserError, match="--preset cpu has no recipe for --env-id cube"):
        resolve("dbpo_online.py", ["--preset", "cpu", "--env-id", "cube-double-play-singletask-task2-v0"])
    with pytest.raises(common.UserError, match="unknown --preset 'gpu'"):
        resolve("dbp_bc.py", ["--preset", "gpu"])


@pytest.mark.parametrize("script", [*TRAINING_SCRIPTS, "robot_deploy.py"])
def test_help_answers_fast_without_importing_torch(script):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    baseline = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), "--help"], capture_output=True,
                         text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0 and "usage" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported  # the heavy import comes after parsing
    assert elapsed < max(2.0, 40 * baseline), f"--help took {elapsed:.2f} s (python -c pass: {baseline:.2f} s)"


def test_a_run_in_a_log_file_prints_progress_lines_with_an_eta(tmp_path, robomimic_lift_file):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # stdout is a file, not a terminal: plain lines
        subprocess.run([sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--env-id", "lift", "--dataset-path",
                        robomimic_lift_file, "--total-steps", "60", "--eval-every", "30", "--eval-episodes", "1",
                        "--final-eval-episodes", "1", "--batch-size", "8", "--hidden-dims", "16", "--max-episode-steps",
                        "20", "--num-eval-envs", "1"], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, timeout=600,
                       env={**os.environ, "DRIFT_PROGRESS_SECONDS": "0"}, check=True)
    text = log.read_text()
    assert "[dbp_bc] plan: 60 steps" in text and "this run takes about" in text
    lines = [line for line in text.splitlines() if line.startswith("[dbp_bc] step ") and "ETA" in line]
    assert len(lines) > 10 and "steps/s (training)" in lines[-1]
    assert "eval: success 0.00 over 1 episodes" in lines[-1]  # the latest evaluation
    assert "\r" not in text  # no progress bar in a file


BAD_ARGS = [
    ("dbp_bc.py", ["--total-steps", "0"], "--total-steps must be > 0"),
    ("dbp_bc.py", ["--total-steps", "-5"], "--total-steps must be > 0"),
    ("dbp_bc.py", ["--warmup-steps", "0"], "--warmup-steps must be > 0"),
    ("dbp_bc.py", ["--eval-every", "0"], "--eval-every must be > 0"),
    ("dbp_bc.py", ["--batch-size", "0"], "--batch-size must be > 0"),
    ("dbp_bc.py", ["--horizon", "2"], "need To + Ta - 1 <= H"),
    ("dbp_bc.py", ["--backbone", "unet", "--horizon", "5", "--n-action-steps", "4"], "divisible by 4"),
    ("dbp_bc.py", ["--total-steps", "ten"], "ten"),
    ("dfp_offline_to_online.py", ["--offline-steps", "-1"], "--offline-steps and --online-steps must be >= 0"),
    ("dfp_offline_to_online.py", ["--eval-every", "0"], "--eval-every must be > 0"),
    ("dfp_offline_to_online.py", ["--batch-size", "0"], "--batch-size must be > 0"),
    ("dfp_offline_to_online.py", ["--k", "20"], "--k 20 must not exceed --pool-size 16"),
    ("dfp_offline_to_online.py", ["--k", "0"], "--k must be > 0"),
    ("dbpo_online.py", ["--num-envs", "0"], "--num-envs must be > 0"),
    ("dbpo_online.py", ["--num-steps", "0"], "--num-steps must be > 0"),
    ("dbpo_online.py", ["--lr-warmup-iters", "0"], "--lr-warmup-iters must be > 0"),
    ("dbpo_online.py", ["--stop-iteration", "9", "--num-iterations", "5"], "--stop-iteration 9 is past"),
]


@pytest.mark.parametrize("script,argv,message", BAD_ARGS)
def test_bad_arguments_give_one_clear_line_before_any_work(tmp_path, script, argv, message):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode in (1, 2) and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "runs")  # nothing was created


def test_a_checkpoint_of_another_script_is_refused_on_resume(tmp_path):
    path = str(tmp_path / "dfp.pt")
    common.save_checkpoint(path, {"script": "dfp_offline_to_online", "policy_module": "dfp_offline_to_online",
                                  "args": {"offline_steps": 3}, "env_id": "lift"})
    out = subprocess.run([sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--resume", path], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "a checkpoint of dfp_offline_to_online.py, not of dbp_bc.py" in out.stderr
    assert "Traceback" not in out.stderr


def test_nan_rows_are_named_at_load_time_in_both_dataset_formats(tmp_path, robomimic_lift_file):
    bad = tmp_path / "nan.hdf5"
    shutil.copy(robomimic_lift_file, bad)
    with h5py.File(bad, "r+") as f:
        f["data/demo_1/obs/object"][2, 0] = np.nan
    n0 = len(h5py.File(robomimic_lift_file, "r")["data/demo_0/actions"])
    with pytest.raises(common.UserError, match=rf"non-finite value \(nan\) in 'observations' at transition {n0 + 2}"):
        environments.load_dataset("lift", str(bad))
    path = str(tmp_path / "cube-double-play-v0.npz")
    make_datasets.generate_ogbench("cube-double-play-v0", path, num_episodes=1, num_workers=1)
    raw = dict(np.load(path))
    raw["actions"][7, 1] = np.inf
    np.savez(path, **raw)
    with pytest.raises(common.UserError, match=r"non-finite value \(inf\) in 'actions' at transition 7"):
        environments.load_dataset("cube-double-play-singletask-task2-v0", path)


def test_nan_dataset_stops_a_training_script_with_one_line(tmp_path, robomimic_lift_file):
    bad = tmp_path / "nan.hdf5"
    shutil.copy(robomimic_lift_file, bad)
    with h5py.File(bad, "r+") as f:
        f["data/demo_0/actions"][5, 3] = np.nan
    out = subprocess.run([sys.executable, os.path.join(ROOT, "dfp_offline_to_online.py"), "--env-id", "lift",
                          "--dataset-path", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "non-finite value (nan) in 'actions' at transition 5" in out.stderr
    assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "runs")


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_make_datasets_ends_its_workers(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "make_datasets.py"), "robomimic", "--task", "lift",
                             "--num-demos", "200", "--num-workers", "2", "--path", str(tmp_path / "x.hdf5")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(workers := _children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert len(workers) >= 2, "the worker pool never started"
    time.sleep(3)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    time.sleep(1)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read().lower()]
    assert not alive, f"workers {alive} outlived make_datasets.py"
    assert not os.path.exists(tmp_path / "x.hdf5")


def _sleep_forever():
    time.sleep(600)


def test_the_pools_stop_handler_ends_only_the_pools_workers():
    """The handler that _pool installs ends the processes started after it, not the caller's own children."""
    ctx = mp.get_context("spawn")
    callers, pools = ctx.Process(target=_sleep_forever, daemon=True), ctx.Process(target=_sleep_forever, daemon=True)
    callers.start()
    stop = make_datasets._stopper(set(mp.active_children()))
    pools.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            stop(signal.SIGTERM, None)
        assert exit_.value.code == 128 + signal.SIGTERM
        pools.join(timeout=30)
        assert not pools.is_alive() and pools.exitcode == -signal.SIGTERM
        assert callers.is_alive()
    finally:
        callers.kill()
        pools.kill()
