"""Small helpers shared by the drifting-policy scripts.

Environments (`make_env`, `make_vec_env`), datasets (`load_dataset`), run set-up (`set_seed`,
`make_run`), rollouts (`evaluate`, `record_video`) and checkpoints (`save_checkpoint`,
`load_policy`). No algorithm lives here: each script keeps its own networks and its own copy of the
drifting loss, CleanRL style.

Environment ids
    lift, can, square                                   Robomimic tasks, built with robosuite 1.5
    cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0   OGBench, built with env_only=True
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import sys
import time
import types

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for --capture-video
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import warnings

import gymnasium as gym  # numpy and gymnasium only: torch loads after the arguments are parsed (fast --help)
import numpy as np

warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")  # OGBench's float64 Boxes

DATA_DIR = os.path.expanduser(os.environ.get("DRIFT_DATA_DIR", "~/.cache/drifting-policies"))
EVAL_SEED_OFFSET = 100_000  # evaluation seeds: never used by data generation or training rollouts

# task -> (robosuite env name, max episode steps as in QC / DFP, observation dim)
ROBOMIMIC_TASKS = {"lift": ("Lift", 300, 19), "can": ("PickPlaceCan", 300, 23), "square": ("NutAssemblySquare", 400, 23)}
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")  # object last, as QC/DFP
OGBENCH_IDS = [f"cube-{n}-play-singletask-task{k}-v0" for n in ("double", "triple", "quadruple") for k in range(1, 6)]
ENV_IDS = [*ROBOMIMIC_TASKS, *OGBENCH_IDS]


class UserError(Exception):
    """Bad input (env id, dataset, checkpoint): shown as one clear message, without a traceback."""


def _print_user_errors(hook):
    def excepthook(kind, value, tb):
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.stderr)
        else:
            hook(kind, value, tb)

    return excepthook


sys.excepthook = _print_user_errors(sys.excepthook)


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
# Arguments: presets, --resume, validation (before torch is imported, so --help answers at once)
# ----------------------------------------------------------------------------------------------
def _argv_value(argv, flag):
    """The value of `--flag VALUE` or `--flag=VALUE` in argv (the last one wins), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def parse_args(Args, presets: dict, script: str, mutable: tuple[str, ...] = (), argv=None):
    """tyro.cli(Args) with two extras, resolved before any work starts. Returns (args, checkpoint or None).

    --preset NAME: `presets[NAME][env_id]` replaces Args' defaults ("paper" = the defaults themselves); flags given
    on the command line still win. --resume PATH: the checkpoint's args are the defaults instead. Flags named in
    `mutable` (budgets, evaluation, threads) may change on resume and are printed; any other changed flag is an error.
    """
    import tyro

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return tyro.cli(Args, args=argv), None  # prints the help and exits
    defaults, ckpt = Args(), None
    resume = _argv_value(argv, "--resume")
    if resume:
        ckpt = load_checkpoint(resume, trust="--trust-checkpoint" in argv)
        owner = ckpt.get("script", ckpt["policy_module"])
        if owner != script:
            raise UserError(f"{resume} is a checkpoint of {owner.replace('.', '/')}.py, not of {script.replace('.', '/')}.py: "
                            f"resume it with `python {owner.replace('.', '/')}.py --resume {resume}`.")
        known = {f.name for f in dataclasses.fields(Args)}
        defaults = Args(**{k: v for k, v in ckpt["args"].items() if k in known})
    else:
        preset = _argv_value(argv, "--preset") or defaults.preset
        env_id = _argv_value(argv, "--env-id") or defaults.env_id
        if preset != "paper":
            if preset not in presets:
                raise UserError(f"unknown --preset {preset!r}; choose from paper, {', '.join(presets)}.")
            if env_id not in presets[preset]:
                raise UserError(f"--preset {preset} has no recipe for --env-id {env_id}; it has "
                                f"{', '.join(presets[preset])}. Use --preset paper with your own flags.")
            defaults = dataclasses.replace(defaults, preset=preset, env_id=env_id, **presets[preset][env_id])
    args = tyro.cli(Args, args=argv, default=defaults)
    if ckpt:
        args.resume = resume
        changed = {f.name: (getattr(defaults, f.name), getattr(args, f.name)) for f in dataclasses.fields(Args)
                   if f.name not in ("resume", "trust_checkpoint") and getattr(defaults, f.name) != getattr(args, f.name)}
        frozen = [k for k in changed if k not in mutable]
        if frozen:
            k = frozen[0]
            raise UserError(f"--{k.replace('_', '-')} cannot change on --resume (the run has {changed[k][0]!r}, the "
                            f"command line says {changed[k][1]!r}). Drop the flag, or start a new run. Flags that may "
                            f"change: {', '.join('--' + m.replace('_', '-') for m in mutable)}.")
        for k, (old, new) in changed.items():
            print(f"resume: --{k.replace('_', '-')} {old!r} -> {new!r}")
    return args, ckpt


def require(condition: bool, message: str) -> None:
    """Argument checks: one clear line (`error: ...`, exit 1) before any work starts."""
    if not condition:
        raise UserError(message)


def require_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        require(value is None or value > 0, f"--{name.replace('_', '-')} must be > 0, not {value!r}.")


# ----------------------------------------------------------------------------------------------
# Run set-up: seeding, run directory, TensorBoard (and wandb behind --track), results, progress
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int, torch_deterministic: bool = True) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def make_run(args, run_name: str | None = None, purge_step: int | None = None):
    """runs/{env_id}__{exp_name}__{seed}__{time}/ with args.json and a SummaryWriter; wandb if --track.
    Call it after the data has loaded and the arguments are checked. To continue a run (--resume) pass its
    run_name and purge_step = the first step not in the checkpoint: TensorBoard then drops the events the
    interrupted process wrote after its last checkpoint, so every step of every tag appears once."""
    from torch.utils.tensorboard import SummaryWriter

    run_name = run_name or f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2, default=str)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True, resume="allow", id=run_name)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_name, run_dir, writer


def write_results(run_dir: str, args, script: str, **results) -> None:
    """runs/<run>/results.json, written once the run has finished: its presence marks a finished run
    (benchmarks/sweep.py collects these files). results: steps, final_success, final_episodes, best_success,
    switch_success (offline-to-online scripts), wall_time_s."""
    row = {"script": script, "env_id": args.env_id, "exp_name": args.exp_name, "seed": args.seed,
           "preset": args.preset, "best_success": None, "switch_success": None, **results}
    tmp = os.path.join(run_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "results.json"))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 \
        else f"{s // 60}m {s % 60:02d}s"


class Progress:
    """Progress that a person and a log file can both read.

    On a terminal: a tqdm bar. Otherwise (nohup, Slurm, `> log`): one plain line every DRIFT_PROGRESS_SECONDS
    (default 60) with the step, the training-only speed (evaluations excluded), the ETA of the whole run and the
    latest evaluation. Once the speed is measured (after 30 s, or 5% of the run and 20 steps), one line states the plan: the
    steps and the expected duration, with a hint where that is long for the machine.
    """

    def __init__(self, name: str, total: int, start: int = 0, unit: str = "step", hint: str = ""):
        from tqdm import tqdm

        self.name, self.total, self.n, self.start, self.unit, self.hint = name, total, start, start, unit, hint
        self.interval = float(os.environ.get("DRIFT_PROGRESS_SECONDS", 60))
        self.t0 = self.t_last = self.t_print = time.perf_counter()
        self.train_time, self.planned, self.last_eval = 0.0, False, "none yet"
        self.bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True) if sys.stderr.isatty() else None

    def rates(self):
        done, wall = self.n - self.start, time.perf_counter() - self.t0
        train_sps = done / max(self.train_time, 1e-9)
        eta = (self.total - self.n) * wall / done if done else float("inf")  # evaluations included
        return train_sps, eta

    def update(self, n: int = 1):
        now = time.perf_counter()
        self.train_time += now - self.t_last
        self.t_last, self.n = now, self.n + n
        sps, eta = self.rates()
        if not self.planned and (self.train_time > 30 or self.n - self.start >= min(self.total - self.start, max(20, (self.total - self.start) // 20))):
            self.planned = True
            long = eta > 4 * 3600 and self.hint
            self.write(f"plan: {self.total:,} {self.unit}s ({self.n:,} done); at the measured {sps:.3g} {self.unit}s/s "
                       f"this run takes about {_duration(eta)}{'. ' + self.hint if long else ''}")
        if self.bar is not None:
            self.bar.update(n)
            if now - self.t_print > 1:
                self.bar.set_postfix_str(f"train {sps:.3g}/s, eval: {self.last_eval}", refresh=False)
                self.t_print = now
        elif now - self.t_print >= self.interval:
            self.t_print = now
            print(f"[{self.name}] {self.unit} {self.n:,}/{self.total:,} ({100 * self.n / self.total:.0f}%) | "
                  f"{sps:.3g} {self.unit}s/s (training) | ETA {_duration(eta)} | eval: {self.last_eval}", flush=True)

    def evaluation(self, text: str):
        """Call after an evaluation: its time does not count as training, and its result shows in the next line."""
        self.t_last, self.last_eval = time.perf_counter(), text
        self.write(f"{self.unit} {self.n:,}: {text}")

    def write(self, text: str):
        if self.bar is not None:
            self.bar.write(f"[{self.name}] {text}")
        else:
            print(f"[{self.name}] {text}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Checkpointing:
    """When to write the resumable checkpoint: every `minutes` of wall time, and at once on SIGTERM, SIGINT or
    SIGUSR1 (Slurm's and submitit's preemption notice), after which the run exits with status 75 (EX_TEMPFAIL:
    "continue me with --resume"). The handlers only set a flag; the loop saves at its next consistent point."""

    PREEMPTED = 75

    def __init__(self, minutes: float):
        self.period, self.t_last, self.signal = 60 * minutes, time.monotonic(), None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def due(self) -> bool:
        return self.signal is not None or time.monotonic() - self.t_last >= self.period

    def saved(self, path: str, step: int, writer=None):
        """Call after each save: restarts the clock, and exits (status 75) if a signal asked for the save."""
        self.t_last = time.monotonic()
        if self.signal is not None:
            if writer is not None:
                writer.close()
            print(f"{self.signal}: checkpoint written at step {step}; continue with --resume {path}", flush=True)
            sys.exit(self.PREEMPTED)


def ignore_stop_signals():
    """For env worker processes: Ctrl-C (sent to the whole process group) and SIGUSR1 are the main process's
    to handle, so an evaluation in flight finishes and the checkpoint can be written. SIGTERM ends a worker
    (as the parent's exit sends it; a forked worker would otherwise inherit the parent's handler). A no-op in the
    main process, where AsyncVectorEnv also builds one env to read the spaces."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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


# ----------------------------------------------------------------------------------------------
# Checkpoints and policies
# ----------------------------------------------------------------------------------------------
# The scripts whose checkpoints load_policy may rebuild (the file names its script; nothing else is imported).
POLICY_MODULES = ("dbp_bc", "dbpo_online", "dfp_offline_to_online", "baselines.diffusion_bc", "baselines.qc_fql")


def _plain(x):
    """numpy arrays -> tensors and numpy scalars -> Python numbers, recursively: what torch.load(weights_only=True)
    reads back without unpickling arbitrary objects."""
    import torch

    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_checkpoint(path: str, payload: dict) -> None:
    """Atomic write of plain data (tensors, numbers, strings, lists, dicts): a crash mid-save never leaves a
    half-written file, and the file loads with weights_only=True, so loading it cannot run code."""
    import torch

    tmp = f"{path}.tmp"
    torch.save(_plain(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu", trust: bool = False) -> dict:
    """Load a checkpoint weights-only. trust=True (--trust-checkpoint) unpickles anything: only for files from
    a source you trust (a crafted file runs code on load), e.g. checkpoints written before weights-only saving."""
    import pickle

    import torch

    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist. Train one first, e.g. `python dbp_bc.py --env-id lift`.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=not trust)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds Python objects that a weights-only load refuses (loading them could run "
                        f"code). If you trust where the file came from, pass --trust-checkpoint.") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); it is truncated or not a "
                        f"checkpoint of these scripts.") from None
    if not isinstance(ckpt, dict) or ckpt.get("policy_module") not in POLICY_MODULES:
        raise UserError(f"{path} is not a checkpoint written by these scripts (its policy_module is not one of "
                        f"{', '.join(POLICY_MODULES)}).")
    return ckpt


def load_policy(path: str, device="cpu", env_id: str | None = None, trust: bool = False, **kwargs):
    """Rebuild a trained policy from its checkpoint alone. The file names the script that defines the
    policy (`policy_module`, one of POLICY_MODULES); that script's `policy_from_checkpoint` returns an nn.Module
    with forward(obs [B, To, Do], z [B, *noise_shape]) -> the actions from the current step on [B, H - To + 1, Da]
    (execute the first n_action_steps) and `.act(obs)`, the same in numpy.
    With env_id, a checkpoint trained on another env is refused."""
    import importlib

    ckpt = load_checkpoint(path, device, trust)
    if env_id is not None and ckpt["env_id"] != env_id:
        raise UserError(f"checkpoint {path} was trained on {ckpt['env_id']!r}, not {env_id!r}: pass "
                        f"--env-id {ckpt['env_id']} or a checkpoint trained on {env_id}.")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    module = importlib.import_module(ckpt["policy_module"])
    return module.policy_from_checkpoint(ckpt, device=device, **kwargs).eval()


def rng_state() -> dict:
    """Every global random stream (Python, numpy, torch CPU and CUDA) as plain data, for exact resume."""
    import torch

    np_state = np.random.get_state(legacy=False)
    return {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
            "numpy_key": np_state["state"]["key"].astype(np.int64), "numpy_pos": np_state["state"]["pos"],
            "numpy_gauss": [np_state["has_gauss"], np_state["gauss"]], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate((3, tuple(int(v) for v in state["python"]), state["python_gauss"]))
    key = np.asarray(state["numpy_key"]).astype(np.uint32)
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": int(state["numpy_pos"])},
                         "has_gauss": int(state["numpy_gauss"][0]), "gauss": float(state["numpy_gauss"][1])})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def numpy_rng_state(rng: np.random.Generator) -> dict:
    """A numpy Generator's state as plain data (its PCG64 state is a few Python ints)."""
    return rng.bit_generator.state


def numpy_rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


class ActMixin:
    """`.act(obs)` for chunk policies (nn.Modules with obs_dim, n_obs_steps, noise_shape and forward).

    obs: [Do] or [To, Do] for one observation, [B, Do] (To = 1) or [B, To, Do] for a batch.
    Returns the actions from the current step on, [T, Da] or [B, T, Da] as float32 numpy (T >= Ta; execute
    the first n_action_steps). z (noise [B, *noise_shape]) may be given for reproducible actions.
    """

    def act(self, obs, z=None, generator=None) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._act(torch, obs, z, generator)

    def _act(self, torch, obs, z, generator):
        device = next(self.parameters()).device
        obs = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
        single = obs.ndim == 1 or (obs.ndim == 2 and self.n_obs_steps > 1)
        obs = obs.reshape(-1, self.n_obs_steps, self.obs_dim)
        if z is None:
            z = torch.randn((obs.shape[0], *self.noise_shape), generator=generator, device="cpu")
        z = torch.as_tensor(np.asarray(z, dtype=np.float32)).to(device).reshape(obs.shape[0], *self.noise_shape)
        chunk = self(obs, z).cpu().numpy()
        return chunk[0] if single else chunk
