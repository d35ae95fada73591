"""Environments, datasets and rollouts shared by the drifting-policy scripts.

Environments (`make_env`, `make_vec_env`), offline datasets (`load_dataset`: official files when present,
otherwise generated and cached on first use) and evaluation rollouts (`evaluate`, `record_video`). Every env
reports info["success"]; the Robomimic tasks are sparse-reward and end on success, as in QC and DFP.

Environment ids
    lift, can, square                                   Robomimic tasks, built with robosuite 1.5
    cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0   OGBench, built with env_only=True
"""

from __future__ import annotations

import json
import os
import re
import sys
import types

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for --capture-video
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import warnings

import gymnasium as gym  # numpy and gymnasium only: torch loads after the arguments are parsed (fast --help)
import numpy as np

from common import UserError, ignore_stop_signals

warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")  # OGBench's float64 Boxes

DATA_DIR = os.path.expanduser(os.environ.get("DRIFT_DATA_DIR", "~/.cache/drifting-policies"))
EVAL_SEED_OFFSET = 100_000  # evaluation seeds: never used by data generation or training rollouts

# task -> (robosuite env name, max episode steps as in QC / DFP, observation dim)
ROBOMIMIC_TASKS = {"lift": ("Lift", 300, 19), "can": ("PickPlaceCan", 300, 23), "square": ("NutAssemblySquare", 400, 23)}
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # object last, as QC/DFP
OGBENCH_IDS = [f"cube-{n}-play-singletask-task{k}-v0" for n in ("double", "triple", "quadruple") for k in range(1, 6)]
ENV_IDS = [*ROBOMIMIC_TASKS, *OGBENCH_IDS]


def check_env_id(env_id: str) -> None:
    if env_id not in ENV_IDS:
        raise UserError(f"unknown env id {env_id!r}. Valid ids: {', '.join(ENV_IDS[:3])}, and "
                        f"cube-{{double,triple,quadruple}}-play-singletask-task{{1..5}}-v0.")


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------
def import_robosuite():
    """Import robosuite without its dozen harmless start-up warnings (no private macro file, etc.)."""
    if "robosuite" not in sys.modules:
        quiet = types.ModuleType("robosuite.macros_private")
        quiet.CONSOLE_LOGGING_LEVEL = "ERROR"
        sys.modules.setdefault("robosuite.macros_private", quiet)
    import robosuite

    return robosuite


def robomimic_env_kwargs(task: str) -> dict:
    """The robosuite kwargs of a Robomimic low-dim task; stored as `env_args` in generated hdf5 files."""
    robosuite = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    env_name, horizon, _ = ROBOMIMIC_TASKS[task]
    controller = load_composite_controller_config(controller="BASIC", robot="Panda")  # OSC_POSE arm, delta input
    controller["body_parts"] = {"right": controller["body_parts"]["right"]}  # a single Panda arm
    return dict(env_name=env_name, robots=["Panda"], controller_configs=controller, control_freq=20,
                horizon=horizon, ignore_done=True, reward_shaping=False, use_object_obs=True,
                use_camera_obs=False, has_renderer=False, has_offscreen_renderer=False,
                robosuite_version=robosuite.__version__)


class RobomimicEnv(gym.Env):
    """Robomimic low-dim task on robosuite 1.5: Panda, OSC_POSE at 20 Hz, 7-D actions in [-1, 1].

    obs = concat(robot0_eef_pos, robot0_eef_quat, robot0_gripper_qpos, object)   (19 / 23 / 23 dims)
    reward = 1.0 on success else 0.0 (sparse); terminated on success (as QC / DFP); info["success"].
    report_potential=True adds info["potential"]: robosuite's dense staged reward of the state (reaching,
    grasping, ...; below 1, the success reward), for potential-based shaping (dbpo_online.py --reward-shaping).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str, seed: int = 0, terminate_on_success: bool = True, render_mode=None,
                 report_potential: bool = False):
        robosuite = import_robosuite()
        kwargs = robomimic_env_kwargs(task)
        kwargs.pop("robosuite_version")
        if render_mode == "rgb_array":
            kwargs.update(has_offscreen_renderer=True, camera_names="agentview", camera_heights=256, camera_widths=256)
        self.task, self.render_mode, self.terminate_on_success = task, render_mode, terminate_on_success
        self.report_potential = report_potential
        self.rs_env = robosuite.make(seed=seed, **kwargs)  # the raw robosuite env (privileged state for experts)
        obs_dim = ROBOMIMIC_TASKS[task][2]
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)

    @staticmethod
    def flatten_obs(obs_dict) -> np.ndarray:
        """robosuite's dict -> the Robomimic low-dim vector (robosuite names `object` `object-state`)."""
        return np.concatenate([obs_dict["object-state" if k == "object" else k] for k in LOW_DIM_KEYS]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:  # robosuite's placement samplers hold a reference to env.rng: reseed it in place
            self.rs_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._obs = self.rs_env.reset()
        return self.flatten_obs(self._obs), self._info(False)

    def _info(self, success: bool) -> dict:
        if not self.report_potential:
            return {"success": success}
        self.rs_env.reward_shaping = True  # robosuite's dense reward of the current state (the action is unused)
        potential = 0.0 if success else float(self.rs_env.reward())
        self.rs_env.reward_shaping = False
        return {"success": success, "potential": potential}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self._obs, reward, _, _ = self.rs_env.step(action)
        success = bool(self.rs_env._check_success())
        terminated = success and self.terminate_on_success
        return self.flatten_obs(self._obs), float(reward), terminated, False, self._info(success)

    def render(self):
        return self.rs_env.sim.render(width=256, height=256, camera_name="agentview")[::-1]

    def close(self):
        self.rs_env.close()


class _Float32Obs(gym.ObservationWrapper):
    """OGBench observations are float64; the policies work in float32."""

    def __init__(self, env):
        super().__init__(env)
        inf = np.full(env.observation_space.shape, np.inf, np.float32)
        self.observation_space = gym.spaces.Box(-inf, inf, dtype=np.float32)

    def observation(self, obs):
        return obs.astype(np.float32)


def make_env(env_id: str, seed: int = 0, max_episode_steps: int | None = None, **kwargs) -> gym.Env:
    """Build one environment. Every env reports info["success"] and has a time limit: max_episode_steps, or
    by default QC / DFP's (lift 300, can 300, square 400; OGBench's registered limits).

    Robomimic kwargs: terminate_on_success=True, render_mode=None, report_potential=False.
    OGBench kwargs go to the env, e.g. success_timing="post" to match ogbench 1.1.2 (QC / DFP);
    ogbench >= 1.2 defaults to "pre" (success judged before the action, as the dataset labels).
    """
    check_env_id(env_id)
    if env_id in ROBOMIMIC_TASKS:
        env = RobomimicEnv(env_id, seed=seed, **kwargs)
        env = gym.wrappers.TimeLimit(env, max_episode_steps=max_episode_steps or ROBOMIMIC_TASKS[env_id][1])
    else:
        import ogbench

        if max_episode_steps:
            kwargs["max_episode_steps"] = max_episode_steps  # passed on to gymnasium.make
        env = _Float32Obs(ogbench.make_env_and_datasets(env_id, env_only=True, **kwargs))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


def make_vec_env(env_id: str, num_envs: int, seed: int = 0, **kwargs) -> gym.vector.VectorEnv:
    """Subprocess-vectorised envs (one process each, so both cores simulate). Finished envs reset in the
    same step (the final observation and info move to info["final_obs"] / info["final_info"]).
    kwargs go to make_env, except wrapper (a function applied to each env inside its worker)."""
    check_env_id(env_id)
    wrapper = kwargs.pop("wrapper", None) or (lambda env: env)
    fns = [lambda i=i: (ignore_stop_signals(), wrapper(make_env(env_id, seed + i, **kwargs)))[1] for i in range(num_envs)]
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
def ogbench_dataset_name(env_id: str) -> str:
    """cube-double-play-singletask-task2-v0 -> cube-double-play-v0 (the file the singletask ids share)."""
    return env_id.split("-singletask")[0] + "-v0"


# The default generated Robomimic set: 200 demos of an imperfect operator, like Robomimic's human MH data. Noise-free
# demos hold no corrections; DBP trained on them left the demo states and failed 36-45% of lift episodes.
GENERATED_ROBOMIMIC = dict(num_demos=200, noise=0.1, hesitate=0.3)


def generated_robomimic_path(task: str, num_demos: int, noise: float, hesitate: float, labels: str = "executed",
                             clearance: tuple[float, float] | None = None) -> str:
    """clearance: the expert's (hover, aside_descent) where they differ from its defaults."""
    suffix = ("" if labels == "executed" else f"_{labels}") + (f"_hover{clearance[0]:g}_aside{clearance[1]:g}" if clearance else "")
    return os.path.join(DATA_DIR, "robomimic", task, f"scripted_mh_{num_demos}_noise{noise:g}_hesitate{hesitate:g}{suffix}.hdf5")


def default_dataset_path(env_id: str) -> tuple[str, bool]:
    """(path, is_official). Official files are used when present; otherwise our generated cache."""
    if env_id in ROBOMIMIC_TASKS:
        official = os.path.expanduser(f"~/.robomimic/{env_id}/mh/low_dim_v15.hdf5")
        generated = generated_robomimic_path(env_id, **GENERATED_ROBOMIMIC)
    else:
        name = ogbench_dataset_name(env_id)
        official = os.path.expanduser(f"~/.ogbench/data/{name}.npz")
        generated = os.path.join(DATA_DIR, "ogbench", f"{name}.npz")
    return (official, True) if os.path.exists(official) else (generated, False)


def generated_recipe(path: str) -> dict | None:
    """The make_datasets.generate_robomimic kwargs of a file named by generated_robomimic_path, else None:
    a missing file of that name in the cache is generated on first use like the default set."""
    m = re.fullmatch(r"scripted_mh_(\d+)_noise([\d.e-]+)_hesitate([\d.e-]+)(_intended)?(?:_hover([\d.e-]+)_aside([\d.e-]+))?\.hdf5",
                     os.path.basename(path))
    task = os.path.basename(os.path.dirname(path))
    if not m or task not in ROBOMIMIC_TASKS or os.path.dirname(os.path.dirname(os.path.abspath(path))) != \
            os.path.join(os.path.abspath(DATA_DIR), "robomimic"):
        return None
    recipe = dict(task=task, path=path, num_demos=int(m[1]), noise=float(m[2]), hesitate=float(m[3]),
                  labels="intended" if m[4] else "executed")
    if m[5]:
        recipe.update(hover=float(m[5]), aside_descent=float(m[6]))
    return recipe


def load_dataset(env_id: str, dataset_path: str | None = None) -> dict:
    """Transitions as float32 numpy arrays: observations, actions, rewards, terminals (1 at the last step
    of each episode), masks (0 where the task is solved), next_observations; dataset_path: the file used.

    With no dataset_path: the official file if present (~/.robomimic/{task}/mh/low_dim_v15.hdf5,
    ~/.ogbench/data/{name}.npz), else locally generated data, created and cached on first use. A missing file
    named like a generated set in the cache (generated_robomimic_path) is generated the same way.
    Every value is checked to be finite at load time.
    """
    check_env_id(env_id)
    if dataset_path is None:
        dataset_path, official = default_dataset_path(env_id)
        if not official and not os.path.exists(dataset_path):
            import make_datasets

            make_datasets.generate_default(env_id, dataset_path)
    elif not os.path.exists(dataset_path):
        recipe = generated_recipe(dataset_path)
        if recipe is None or recipe["task"] != env_id:
            raise UserError(f"dataset file {dataset_path} does not exist. {_how_to_get_data(env_id)}")
        import make_datasets

        print(f"[data] generating {dataset_path} (once; a few minutes): "
              f"{', '.join(f'{k}={v}' for k, v in recipe.items() if k != 'path')}", flush=True)
        make_datasets.generate_robomimic(**recipe)
    loader = _load_robomimic if env_id in ROBOMIMIC_TASKS else _load_ogbench
    data = loader(env_id, dataset_path)
    obs_dim = make_obs_dim(env_id)
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != make_action_dim(env_id):
        raise UserError(f"dataset {dataset_path} has obs/action dims {data['observations'].shape[1]}/"
                        f"{data['actions'].shape[1]}, but env {env_id} has {obs_dim}/{make_action_dim(env_id)}. "
                        f"Pass the dataset that belongs to {env_id}.")
    for key, x in data.items():
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise UserError(f"dataset {dataset_path} has a non-finite value ({x[row].ravel()[~np.isfinite(x[row].ravel())][0]}) "
                            f"in {key!r} at transition {row} ({int(bad.sum())} rows in all). Fix or regenerate the file.")
    data["dataset_path"] = os.path.abspath(dataset_path)
    return data


def make_obs_dim(env_id: str) -> int:
    if env_id in ROBOMIMIC_TASKS:
        return ROBOMIMIC_TASKS[env_id][2]
    return {"double": 37, "triple": 46, "quadruple": 55}[env_id.split("-")[1]]


def make_action_dim(env_id: str) -> int:
    return 7 if env_id in ROBOMIMIC_TASKS else 5


def _how_to_get_data(env_id: str) -> str:
    if env_id in ROBOMIMIC_TASKS:
        return (f"Generate scripted demos with `python make_datasets.py robomimic --task {env_id}`, or download "
                f"Robomimic's {env_id}/mh/low_dim_v15.hdf5 to ~/.robomimic/{env_id}/mh/.")
    return (f"Generate play data with `python make_datasets.py ogbench --name {ogbench_dataset_name(env_id)}`, "
            f"or download the official files with `python make_datasets.py download --name "
            f"{ogbench_dataset_name(env_id)}`.")


def _controller_arm(cfg: dict) -> dict:
    """The arm controller of a robosuite-1.5 composite config, or of an old (1.4) flat one."""
    return cfg["body_parts"]["right"] if "body_parts" in cfg else cfg


def _load_robomimic(task: str, path: str) -> dict:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"cannot read {path} as hdf5 ({e}): the file is truncated or corrupt. Delete it. "
                        f"{_how_to_get_data(task)}") from None
    with f:
        try:
            env_args = json.loads(f["data"].attrs["env_args"])
            demos = sorted(f["data"].keys(), key=lambda k: int(k.split("_")[-1]))
            episodes = [[np.concatenate([f[f"data/{d}/{o}/{k}"][()] for k in LOW_DIM_KEYS], axis=1)
                         for o in ("obs", "next_obs")] + [f[f"data/{d}/{k}"][()] for k in ("actions", "rewards")]
                        for d in demos]
        except (KeyError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a Robomimic low-dim hdf5 file ({e}). {_how_to_get_data(task)}") from None
    expected = robomimic_env_kwargs(task)
    kw = env_args.get("env_kwargs", {})
    arm, want = _controller_arm(kw.get("controller_configs", {})), _controller_arm(expected["controller_configs"])
    mismatches = [f"env_name {env_args.get('env_name')!r} != {expected['env_name']!r}"] * (
        env_args.get("env_name") != expected["env_name"])
    mismatches += [f"control_freq {kw.get('control_freq')} != 20"] * (kw.get("control_freq") != 20)
    for key in ("type", "output_max", "output_min", "kp", "uncouple_pos_ori"):
        if key in arm and arm[key] != want[key]:
            mismatches.append(f"controller {key} {arm[key]} != {want[key]}")
    if not demos or mismatches:
        raise UserError(f"{path} does not match env {task!r}: {'; '.join(mismatches) or 'no demos'}. "
                        f"{_how_to_get_data(task)}")
    obs, next_obs, actions, rewards = (np.concatenate(x).astype(np.float32) for x in zip(*episodes))
    terminals = np.concatenate([np.arange(len(e[2])) == len(e[2]) - 1 for e in episodes]).astype(np.float32)
    return dict(observations=obs, actions=actions, rewards=rewards, terminals=terminals,
                masks=(rewards <= 0).astype(np.float32), next_observations=next_obs)


def _load_ogbench(env_id: str, path: str) -> dict:
    import zipfile

    import ogbench

    val_path = path.replace(".npz", "-val.npz")
    if not os.path.exists(val_path):
        raise UserError(f"{val_path} is missing (ogbench's loader needs the -val file beside {path}). "
                        f"{_how_to_get_data(env_id)}")
    try:
        _, train, _ = ogbench.make_env_and_datasets(env_id, dataset_path=path)
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as e:
        raise UserError(f"cannot load {path} ({type(e).__name__}: {e}): the file is truncated or corrupt. "
                        f"Delete it. {_how_to_get_data(env_id)}") from None
    return {k: train[k].astype(np.float32) for k in
            ("observations", "actions", "rewards", "terminals", "masks", "next_observations")}


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------
def evaluate(act_fn, env_id: str, num_episodes: int, n_obs_steps: int, n_action_steps: int,
             seed: int = EVAL_SEED_OFFSET, num_envs: int = 2, envs=None, **env_kwargs) -> dict:
    """Success rate of a chunked policy: act_fn(obs_history [n, To, Do]) -> chunk [n, >=Ta, Da].

    Each env executes Ta actions of a chunk open-loop, then re-plans; a finished episode flushes its
    action queue and observation history. Env i runs a fixed quota of episodes (quotas sum to
    num_episodes), so fast-finishing episodes do not bias the estimate.
    """
    own_envs = envs is None
    envs = envs or make_vec_env(env_id, num_envs, seed, **env_kwargs)
    n = envs.num_envs
    obs, _ = envs.reset(seed=[seed + i for i in range(n)])
    quota = np.array([num_episodes // n + (i < num_episodes % n) for i in range(n)])
    hist = np.repeat(obs[:, None], n_obs_steps, axis=1)
    chunk = np.zeros((n, n_action_steps, *envs.single_action_space.shape), np.float32)
    ptr = np.full(n, n_action_steps)  # index of the next queued action; == Ta means the queue is empty
    finished, successes, returns, lengths = np.zeros(n, int), [], [], []
    ep_ret, ep_len, ep_succ = np.zeros(n), np.zeros(n, int), np.zeros(n, bool)
    while (finished < quota).any():
        need = ptr >= n_action_steps
        if need.any():
            chunk[need] = np.asarray(act_fn(hist[need]))[:, :n_action_steps]
            ptr[need] = 0
        obs, reward, term, trunc, info = envs.step(chunk[np.arange(n), ptr])
        ptr += 1
        done = term | trunc
        step_succ = np.asarray(info.get("success", np.zeros(n)), bool)  # absent when every env just reset
        if done.any():
            final_succ = np.asarray(info["final_info"]["success"], bool)
            step_succ = np.where(done, final_succ, step_succ)
        ep_ret += reward
        ep_len += 1
        ep_succ |= step_succ
        hist = np.concatenate([hist[:, 1:], obs[:, None]], axis=1)
        for i in np.flatnonzero(done):
            if finished[i] < quota[i]:
                successes.append(ep_succ[i]), returns.append(ep_ret[i]), lengths.append(ep_len[i])
            finished[i] += 1
            ep_ret[i], ep_len[i], ep_succ[i], ptr[i] = 0.0, 0, False, n_action_steps
            hist[i] = obs[i]
    if own_envs:
        envs.close()
    return {"success_rate": float(np.mean(successes)), "return": float(np.mean(returns)),
            "length": float(np.mean(lengths)), "episodes": len(successes)}


def record_video(act_fn, env_id: str, path: str, n_obs_steps: int, n_action_steps: int,
                 num_episodes: int = 2, seed: int = EVAL_SEED_OFFSET, max_episode_steps: int | None = None) -> None:
    """Render a few evaluation episodes to an mp4 (MUJOCO_GL=egl; about 10 frames/s on a CPU)."""
    import imageio

    env = make_env(env_id, seed, max_episode_steps, render_mode="rgb_array")
    frames = []
    for ep in range(num_episodes):
        obs, _ = env.reset(seed=seed + ep)
        hist, done = np.repeat(obs[None], n_obs_steps, axis=0), False
        while not done:
            for action in np.asarray(act_fn(hist[None]))[0, :n_action_steps]:
                obs, _, term, trunc, _ = env.step(action)
                frames.append(env.render())
                hist, done = np.concatenate([hist[1:], obs[None]]), term or trunc
                if done:
                    break
    env.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imageio.mimsave(path, frames, fps=20)
