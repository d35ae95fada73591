"""Environments, dataset formats, scripted experts, and clear errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import common
import environments
import make_datasets
from tests.conftest import ROOT


@pytest.mark.parametrize("env_id, obs_dim, action_dim", [("lift", 19, 7), ("can", 23, 7), ("square", 23, 7),
                                                          ("cube-double-play-singletask-task2-v0", 37, 5)])
def test_env_builds_steps_and_has_the_documented_spaces(env_id, obs_dim, action_dim):
    env = environments.make_env(env_id, seed=0)
    obs, info = env.reset(seed=3)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    assert env.action_space.shape == (action_dim,) and (env.action_space.high == 1).all()
    obs2, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs, obs2)  # reset(seed) is reproducible
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.shape == (obs_dim,) and not info["success"] and not terminated
    env.close()


def test_robomimic_env_reports_success_and_terminates():
    env = environments.make_env("lift", seed=0)
    env.reset(seed=0)
    rs = env.unwrapped.rs_env
    qpos = rs.sim.data.get_joint_qpos(rs.cube.joints[0]).copy()
    qpos[2] += 0.15  # the cube held 15 cm above the table: Lift's success test
    rs.sim.data.set_joint_qpos(rs.cube.joints[0], qpos)
    rs.sim.forward()
    _, reward, terminated, _, info = env.step(np.zeros(7))
    assert info["success"] and terminated and reward == 1.0


def test_ogbench_env_reports_success_and_terminates():
    env = environments.make_env("cube-double-play-singletask-task1-v0", seed=0)
    env.reset(seed=0)
    u = env.unwrapped
    for i, goal in enumerate(u.cur_task_info["goal_xyzs"]):  # place every cube on its goal
        u._data.joint(f"object_joint_{i}").qpos[:3] = goal
    for _ in range(2):  # success_timing 'pre' (ogbench >= 1.2): reported one step later
        _, reward, terminated, _, info = env.step(np.zeros(5))
    assert info["success"] and terminated and reward == 0.0


@pytest.mark.parametrize("env_id, default", [("can", 300), ("cube-double-play-singletask-task1-v0", 500)])
def test_time_limit_default_and_override(env_id, default):
    """QC / DFP's limits by default; max_episode_steps (DBP's 400-step Robomimic protocol) replaces them."""
    for limit, expected in ((None, default), (7, 7)):
        env = environments.make_env(env_id, seed=0, max_episode_steps=limit)
        env.reset(seed=0)
        truncated, steps = False, 0
        while not truncated and steps < expected:
            _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, np.float32))
            steps += 1
            assert not terminated
        assert truncated and steps == expected
        env.close()


def test_envs_run_inside_async_vector_env():
    envs = environments.make_vec_env("lift", num_envs=2, seed=0)
    obs, _ = envs.reset(seed=[0, 1])
    assert obs.shape == (2, 19) and not np.allclose(obs[0], obs[1])
    obs, reward, term, trunc, info = envs.step(np.zeros((2, 7), np.float32))
    assert obs.shape == (2, 19) and "success" in info
    envs.close()


def test_scripted_experts_solve_their_tasks():
    from scripted_experts import make_expert

    for task, episodes in (("lift", 3), ("can", 2), ("square", 2)):
        env = environments.make_env(task, seed=0)
        solved = 0
        for seed in range(episodes):
            env.reset(seed=seed)
            expert = make_expert(task, np.random.default_rng(seed))
            expert.reset(env.unwrapped.rs_env)
            done = False
            while not done:
                _, _, term, trunc, info = env.step(expert.act(env.unwrapped.rs_env))
                done = term or trunc
            solved += info["success"]
        assert solved == episodes, f"{task}: {solved}/{episodes}"
        env.close()


def test_scripted_expert_intended_action_is_the_perfect_operators():
    """DART labels: `intended` is the action without noise, pause or overshoot; `act` returns the executed one."""
    from scripted_experts import make_expert

    env = environments.make_env("lift", seed=0)
    for noise, hesitate in ((0.0, 0.0), (0.1, 0.0), (0.0, 1.0)):
        env.reset(seed=3)
        expert = make_expert("lift", np.random.default_rng(3), noise=noise, hesitate=hesitate)
        expert.reset(env.unwrapped.rs_env)
        diffs = []
        for _ in range(30):
            executed = expert.act(env.unwrapped.rs_env)
            intended = expert.intended.copy()
            assert intended[6] == executed[6]  # the gripper button carries no noise
            diffs.append(executed[:6] - np.clip(intended[:6], -1, 1))
            env.step(executed)
        diffs = np.array(diffs)
        if noise == hesitate == 0:
            np.testing.assert_array_equal(diffs, 0)
        elif noise:  # only the noise separates them (up to clipping at +-1)
            assert 0.07 < diffs.std() < 0.12 and abs(diffs.mean()) < 0.03
        else:  # every phase hesitates: a pause (executed arm action 0) or an overshoot
            assert np.abs(diffs).max() > 0.1
    env.close()


def test_side_grasp_clearance_option_moves_the_hover_point_and_names_the_cache():
    from scripted_experts import ASIDE_DESCENT, HOVER, make_expert

    env = environments.make_env("can", seed=0)
    env.reset(seed=0)
    rs = env.unwrapped.rs_env
    hovers = []
    for kwargs in ({}, dict(hover=HOVER + 0.025, aside_descent=0.4)):
        expert = make_expert("can", np.random.default_rng(0), **kwargs)
        expert.reset(rs)
        hovers.append(expert.targets(rs)[2])
        expert.phase = "step_aside"
        assert expert.speed_limits()[2] == pytest.approx(expert.speed_limits()[0] * kwargs.get("aside_descent", ASIDE_DESCENT))
    np.testing.assert_allclose(hovers[1] - hovers[0], [0, 0, 0.025], atol=1e-12)
    env.close()
    with pytest.raises(ValueError, match="side grasp"):
        make_expert("square", np.random.default_rng(0), hover=0.07)
    default = environments.generated_robomimic_path("can", 500, 0.1, 0.3, "intended")
    assert environments.generated_robomimic_path("can", 500, 0.1, 0.3, "intended", (0.07, 0.4)) == \
        default.replace(".hdf5", "_hover0.07_aside0.4.hdf5")


def test_robomimic_hdf5_layout_and_loader_round_trip(robomimic_lift_file):
    with h5py.File(robomimic_lift_file, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "Lift" and env_args["type"] == 1
        assert env_args["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"
        demos = sorted(f["data"].keys())
        assert demos == ["demo_0", "demo_1", "demo_2"]
        g = f["data/demo_0"]
        n = g.attrs["num_samples"]
        for key, dim in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2), ("object", 10)):
            assert g[f"obs/{key}"].shape == (n, dim) and g[f"next_obs/{key}"].shape == (n, dim)
        assert g["actions"].shape == (n, 7) and g["rewards"].shape == (n,) and g["dones"][-1] == 1
        np.testing.assert_array_equal(g["actions"], g["executed_actions"])  # the default labels are the executed actions
        assert g["states"].shape[0] == n and "<mujoco" in g.attrs["model_file"]
        assert len(f["mask/train"]) + len(f["mask/valid"]) == 3
        np.testing.assert_array_equal(g["obs/object"][1:], g["next_obs/object"][:-1])
        total = sum(f[f"data/{d}"].attrs["num_samples"] for d in demos)
        seed, actions = g.attrs["seed"], g["actions"][()]
    data = environments.load_dataset("lift", robomimic_lift_file)
    assert data["observations"].shape == (total, 19) and data["actions"].shape == (total, 7)
    assert data["terminals"].sum() == 3 and data["masks"][data["terminals"] == 1].max() == 0  # demos end solved
    # The recorded actions, replayed from the recorded initial state, solve the task again.
    env = environments.make_env("lift", seed=0)
    obs, _ = env.reset(seed=int(seed))
    np.testing.assert_allclose(obs, data["observations"][0], atol=1e-5)
    for a in actions:
        _, _, term, _, info = env.step(a)
    assert info["success"] and term


def test_ogbench_generator_round_trips_through_ogbench_loader(tmp_path):
    path = str(tmp_path / "cube-double-play-v0.npz")
    make_datasets.generate_ogbench("cube-double-play-v0", path, num_episodes=2, num_workers=1)
    raw = np.load(path)
    assert {"observations", "actions", "terminals", "qpos", "qvel"} <= set(raw.keys())
    assert raw["observations"].shape == (2002, 37) and raw["terminals"].sum() == 2
    assert os.path.exists(path.replace(".npz", "-val.npz"))
    data = environments.load_dataset("cube-double-play-singletask-task2-v0", path)
    assert data["observations"].shape == (2000, 37) and data["actions"].shape == (2000, 5)  # last steps dropped
    assert set(np.unique(data["rewards"])) <= {-2.0, -1.0, 0.0} and data["terminals"].sum() == 2
    assert np.abs(data["actions"]).max() <= 1.0


def test_unknown_env_id_lists_the_valid_ones():
    with pytest.raises(common.UserError, match="unknown env id 'pick'.*lift, can, square"):
        environments.make_env("pick")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--env-id", "pick"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "error: unknown env id" in out.stderr and "Traceback" not in out.stderr


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(common.UserError, match="does not exist.*make_datasets.py robomimic --task lift"):
        environments.load_dataset("lift", str(tmp_path / "nope.hdf5"))


def test_truncated_or_corrupt_datasets_are_reported(tmp_path, robomimic_lift_file):
    truncated = tmp_path / "lift.hdf5"
    truncated.write_bytes(open(robomimic_lift_file, "rb").read()[:5000])
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        environments.load_dataset("lift", str(truncated))
    corrupt = tmp_path / "cube-double-play-v0.npz"
    corrupt.write_bytes(b"not a zip file")
    shutil.copy(corrupt, tmp_path / "cube-double-play-v0-val.npz")
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        environments.load_dataset("cube-double-play-singletask-task2-v0", str(corrupt))


def test_dataset_of_another_env_is_refused(tmp_path, robomimic_lift_file):
    with pytest.raises(common.UserError, match="does not match env 'can'.*env_name 'Lift'"):
        environments.load_dataset("can", robomimic_lift_file)
    relabelled = tmp_path / "relabelled.hdf5"  # env_args say PickPlaceCan, but the data are lift's 19-D obs
    shutil.copy(robomimic_lift_file, relabelled)
    with h5py.File(relabelled, "r+") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_name"] = "PickPlaceCan"
        f["data"].attrs["env_args"] = json.dumps(env_args)
    with pytest.raises(common.UserError, match="obs/action dims 19/7, but env can has 23/7"):
        environments.load_dataset("can", str(relabelled))
