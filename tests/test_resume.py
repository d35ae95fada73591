"""Training that never loses or corrupts work: weights-only checkpoints, exact kill-and-resume, SIGTERM saves."""
import glob
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT

import common

TINY_DBP = ["--env-id", "lift", "--total-steps", "60", "--eval-every", "30", "--eval-episodes", "2",
            "--final-eval-episodes", "2", "--batch-size", "16", "--hidden-dims", "32", "32", "--max-episode-steps", "40",
            "--num-eval-envs", "1"]


def run_script(script, args, cwd, env=None, check=True, timeout=600):
    env = {**os.environ, "DRIFT_PROGRESS_SECONDS": "0", **(env or {})}
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{script} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def kill_at(script, args, cwd, pattern, sig=signal.SIGTERM, timeout=600):
    """Start the script, send `sig` once a progress line contains `pattern`, return (exit status, output)."""
    env = {**os.environ, "DRIFT_PROGRESS_SECONDS": "0"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, t0 = [], time.time()
    for line in proc.stdout:
        lines.append(line)
        if pattern(line):
            proc.send_signal(sig)
            break
        assert time.time() - t0 < timeout, "the run never reached the kill point"
    out = proc.communicate(timeout=timeout)[0]
    return proc.returncode, "".join(lines) + out


def one_run_dir(root):
    run_dir, = glob.glob(str(root / "runs" / "*"))
    return run_dir


def assert_same_state(a, b, keys):
    for key in keys:
        ta, tb = a[key], b[key]
        if key.endswith("optimizer") or key.endswith("_opt"):
            ta, tb = ta["state"], tb["state"]
            assert ta.keys() == tb.keys()
            for i in ta:
                for k in ta[i]:
                    assert torch.equal(torch.as_tensor(ta[i][k]), torch.as_tensor(tb[i][k])), f"{key} state {i}/{k}"
        else:
            assert ta.keys() == tb.keys()
            for k in ta:
                assert torch.equal(ta[k], tb[k]), f"{key}/{k} differs after the resume"


def scalars(run_dir, skip=("charts/SPS",)):
    """{tag: [(step, value)]} as TensorBoard reads them (purged steps dropped), timing tags left out."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t not in skip}


def assert_same_scalars(a, b):
    assert a.keys() == b.keys()
    for tag in a:
        steps = [s for s, _ in b[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice after the resume"
        assert a[tag] == b[tag], f"{tag} differs after the resume"


@pytest.mark.parametrize("script,ckpt_name,extra", [
    ("dbp_bc.py", "dbp.pt", []),
    ("baselines/diffusion_bc.py", "diffusion.pt", ["--sampler", "ddim", "--inference-steps", "2"])])
def test_killed_mid_run_resumes_bit_for_bit(tmp_path, robomimic_lift_file, script, ckpt_name, extra):
    args = [*TINY_DBP, "--dataset-path", robomimic_lift_file, *extra]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_script(script, args, tmp_path / "a")
    status, out = kill_at(script, args, tmp_path / "b", lambda line: "step 40/" in line)
    assert status == common.Checkpointing.PREEMPTED, out
    run_b = one_run_dir(tmp_path / "b")
    stopped = torch.load(os.path.join(run_b, ckpt_name), weights_only=True)
    assert 40 <= stopped["step"] < 60 and not os.path.exists(os.path.join(run_b, "results.json"))
    run_script(script, ["--resume", os.path.join(run_b, ckpt_name)], tmp_path / "b")
    assert os.path.exists(os.path.join(run_b, "results.json"))
    a = torch.load(os.path.join(one_run_dir(tmp_path / "a"), ckpt_name), weights_only=True)
    b = torch.load(os.path.join(run_b, ckpt_name), weights_only=True)
    assert a["step"] == b["step"] == 60
    assert_same_state(a, b, ["model", "ema_model", "optimizer"])
    assert_same_scalars(scalars(one_run_dir(tmp_path / "a")), scalars(run_b))


def test_resume_applies_a_new_budget_and_refuses_a_new_network(tmp_path, robomimic_lift_file):
    run_script("dbp_bc.py", [*TINY_DBP, "--dataset-path", robomimic_lift_file, "--total-steps", "30"], tmp_path)
    ckpt = os.path.join(one_run_dir(tmp_path), "dbp.pt")
    out = run_script("dbp_bc.py", ["--resume", ckpt, "--hidden-dims", "64", "64"], tmp_path, check=False)
    assert out.returncode == 1 and "--hidden-dims cannot change on --resume" in out.stderr and "Traceback" not in out.stderr
    out = run_script("dbp_bc.py", ["--resume", ckpt, "--total-steps", "40"], tmp_path)
    assert "resume: --total-steps 30 -> 40" in out.stdout
    assert torch.load(ckpt, weights_only=True)["step"] == 40


class _Payload:
    """Unpickling this object creates a file: the stand-in for code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_runs_no_code_through_any_entry_point(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "evil.pt"
    torch.save({"policy_module": "dbp_bc", "env_id": "lift", "payload": _Payload(str(marker))}, crafted)
    with pytest.raises(common.UserError, match="--trust-checkpoint"):
        common.load_policy(str(crafted))
    entry_points = [("dbp_bc.py", ["--resume", str(crafted)]), ("dfp_offline_to_online.py", ["--resume", str(crafted)]),
                    ("dbpo_online.py", ["--resume", str(crafted)]), ("dbpo_online.py", ["--checkpoint", str(crafted)]),
                    ("robot_deploy.py", ["--checkpoint", str(crafted)])]
    for script, args in entry_points:
        out = run_script(script, args, tmp_path, check=False, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, (script, out.stderr[-2000:])
        assert "--trust-checkpoint" in out.stderr, (script, out.stderr[-2000:])
    assert not marker.exists()


def test_policy_module_must_be_one_of_the_projects_scripts(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"policy_module": "os", "env_id": "lift"}, path)
    with pytest.raises(common.UserError, match="not a checkpoint written by these scripts"):
        common.load_policy(str(path))


def test_checkpoints_hold_plain_data_only(tmp_path):
    path = str(tmp_path / "c.pt")
    rng = np.random.default_rng(3)
    common.save_checkpoint(path, {"policy_module": "dbp_bc", "a": np.arange(3), "x": np.float32(2.5),
                                  "rng": common.numpy_rng_state(rng), "all": common.rng_state()})
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["a"], torch.arange(3)) and ckpt["x"] == 2.5
    assert common.numpy_rng_from_state(ckpt["rng"]).random() == rng.random()
    expected = (np.random.rand(), torch.rand(1))  # the draws right after the saved state
    np.random.rand(3), torch.rand(3)  # move on
    common.set_rng_state(ckpt["all"])
    assert (np.random.rand(), torch.rand(1)) == expected


TINY_DFP = ["--env-id", "lift", "--offline-steps", "20", "--online-steps", "100", "--start-training", "5",
            "--eval-every", "60", "--eval-episodes", "1", "--final-eval-episodes", "1", "--batch-size", "16",
            "--hidden-dims", "32", "32", "--gen-per-obs", "4", "--pool-size", "4", "--normalize-obs",
            "--num-eval-envs", "1"]


def test_dfp_killed_in_the_online_phase_resumes_bit_for_bit(tmp_path, robomimic_lift_file):
    args = [*TINY_DFP, "--dataset-path", robomimic_lift_file]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_script("dfp_offline_to_online.py", args, tmp_path / "a")
    # The untrained policy's episodes run to lift's 300-step limit, so step 75 is mid-episode.
    status, out = kill_at("dfp_offline_to_online.py", args, tmp_path / "b", lambda line: "step 75/" in line)
    assert status == common.Checkpointing.PREEMPTED, out
    run_b = one_run_dir(tmp_path / "b")
    stopped = torch.load(os.path.join(run_b, "dfp.pt"), weights_only=True)
    online = stopped["replay_online"]
    # The checkpoint holds the start of the interrupted episode: the buffer ends at an episode boundary.
    assert stopped["step"] == 20 + len(online["rewards"]) and stopped["step"] <= 75
    assert len(online["rewards"]) == 0 or online["terminals"][-1] == 1
    run_script("dfp_offline_to_online.py", ["--resume", os.path.join(run_b, "dfp.pt")], tmp_path / "b")
    a = torch.load(os.path.join(one_run_dir(tmp_path / "a"), "dfp.pt"), weights_only=True)
    b = torch.load(os.path.join(run_b, "dfp.pt"), weights_only=True)
    assert a["step"] == b["step"] == 120
    assert_same_state(a, b, ["actor", "critic", "target_critic", "actor_old", "optimizer"])
    for k in a["replay_online"]:
        assert torch.equal(a["replay_online"][k], b["replay_online"][k]), k
    assert_same_scalars(scalars(one_run_dir(tmp_path / "a")), scalars(run_b))


def test_dbpo_sigterm_keeps_the_last_iteration_exactly_and_resumes(tmp_path, robomimic_lift_file):
    """DBPO checkpoints at iteration ends. A stop signal mid-iteration saves the last finished iteration, whose
    weights, optimiser states and RNG equal the uninterrupted run's there bit for bit. After the resume the envs
    start fresh episodes (robosuite's controller state cannot be restored), so later iterations see other
    episodes than an uninterrupted run: the resume is exact up to the checkpoint, and clean after it."""
    run_script("dbp_bc.py", [*TINY_DBP, "--dataset-path", robomimic_lift_file, "--total-steps", "30",
                             "--exp-name", "pre"], tmp_path)
    pretrained = glob.glob(str(tmp_path / "runs" / "lift__pre__*" / "dbp.pt"))[0]
    args = ["--env-id", "lift", "--checkpoint", pretrained, "--num-envs", "2", "--num-steps", "4", "--num-iterations",
            "4", "--eval-every", "2", "--eval-episodes", "1", "--num-eval-envs", "1", "--critic-warmup-iters", "1",
            "--max-episode-steps", "40"]
    run_script("dbpo_online.py", [*args, "--stop-iteration", "2", "--exp-name", "a"], tmp_path)
    status, out = kill_at("dbpo_online.py", [*args, "--exp-name", "b"], tmp_path, lambda line: "iteration 2/4" in line)
    assert status == common.Checkpointing.PREEMPTED, out
    run_a, run_b = (glob.glob(str(tmp_path / "runs" / f"lift__{n}__*"))[0] for n in "ab")
    a = torch.load(os.path.join(run_a, "dbpo.pt"), weights_only=True)
    b = torch.load(os.path.join(run_b, "dbpo.pt"), weights_only=True)
    assert a["iteration"] == b["iteration"] == 2
    assert_same_state(a, b, ["model", "sigma_head", "critic", "actor_opt", "critic_opt"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    run_script("dbpo_online.py", ["--resume", os.path.join(run_b, "dbpo.pt")], tmp_path)
    assert torch.load(os.path.join(run_b, "dbpo.pt"), weights_only=True)["iteration"] == 4
    for tag, events in scalars(run_b).items():
        steps = [s for s, _ in events]
        if not tag.startswith("charts/episodic") and tag != "charts/success":  # one value per iteration
            assert len(steps) == len(set(steps)), tag
    assert os.path.exists(os.path.join(run_b, "results.json"))
