"""Generate the datasets locally when the official files are missing (offline machines, CI).

    python make_datasets.py robomimic --task lift                  # the default: 200 demos, noise 0.1, hesitate 0.3
    python make_datasets.py robomimic --task lift --noise 0 --hesitate 0   # clean demos (no corrections in them)
    python make_datasets.py robomimic --task square --num-demos 50 --noise 0.2 --path square_noisy.hdf5
    python make_datasets.py robomimic --task can --labels intended   # DART: imperfect states, perfect labels
    python make_datasets.py robomimic --task can --labels intended --hover 0.07 --aside-descent 0.4   # more room above the can
    python make_datasets.py ogbench --name cube-double-play-v0     # 70 + 7 oracle play episodes
    python make_datasets.py ogbench --name cube-double-play-v0 --full   # the official size (1000 + 100)
    python make_datasets.py download --name cube-double-play-v0    # the official OGBench files (needs internet)

`environments.load_dataset` calls `generate_default` on first use and caches the result in
~/.cache/drifting-policies (override with $DRIFT_DATA_DIR).

Robomimic: demos from the privileged-state experts of `scripted_experts.py`, one random strategy per
demo, successful demos only, written in Robomimic's hdf5 layout (data/demo_i/{obs,next_obs,actions,
rewards,dones,states}, model_file, env_args, mask/train|valid). They stand in for the multi-operator
(MH) files: multimodal, but scripted, so success rates are not comparable with the papers'.

OGBench: OGBench's own play-data recipe with the oracle shipped in the ogbench package:
CubePlanOracle(noise=0.1, noise_smoothing=0.5), 1001-step episodes in `data_collection` mode, a new
random target (stacked with probability p_stack) whenever the oracle finishes, and the official npz
format (with qpos / qvel) plus the `-val` file, so `ogbench.make_env_and_datasets(dataset_path=...)`
loads and relabels it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import threading
from typing import Literal

import numpy as np
from tqdm import tqdm

import environments

P_STACK = {2: (0.0, 0.25), 3: (0.05, 0.35), 4: (0.1, 0.5)}  # OGBench's per-episode stacking probability range
OGBENCH_CUBES = {"double": 2, "triple": 3, "quadruple": 4}
OGBENCH_FULL_EPISODES = {"double": 1000, "triple": 3000, "quadruple": 5000}
DEFAULT_OGBENCH_EPISODES = 70  # 70k transitions: about 3 minutes on 2 cores (MuJoCo steps at ~240/s per core)


def _quiet_worker(initializer, *initargs):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it ends the pool
    initializer(*initargs)


def _stopper(others):
    """A SIGINT / SIGTERM handler that ends the pool's workers (every child process not in `others`), then unwinds
    through `with _pool(...)`. Pool.terminate() alone could hang when the signal came while a worker was still
    starting (seen once in CI after Ctrl-C)."""

    def stop(signum, _frame):
        for worker in mp.active_children():
            if worker not in others:  # the caller's own children are left alone
                worker.terminate()
        raise SystemExit(128 + signum)

    return stop


@contextlib.contextmanager
def _pool(initializer, initargs, num_workers):
    """A worker pool whose workers end with the generator: on completion, an error, Ctrl-C or SIGTERM."""
    main = threading.current_thread() is threading.main_thread()
    stop = _stopper(set(mp.active_children()))
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        with mp.get_context("spawn").Pool(num_workers, initializer=_quiet_worker, initargs=(initializer, *initargs)) as pool:
            yield pool
    finally:
        for sig, handler in before.items():  # the caller's handlers again (a training script's, a server's)
            signal.signal(sig, handler)


def _write_atomic(path: str, write) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two runs that generate the same missing set do not collide
    write(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Robomimic: scripted multimodal demonstrations
# ----------------------------------------------------------------------------------------------
_worker_env = None


def _init_robomimic_worker(task):
    global _worker_env
    _worker_env = environments.make_env(task, seed=0)


def _robomimic_episode(job):
    """One expert episode from initial-state seed `seed`; returns its arrays and whether it succeeded."""
    from scripted_experts import make_expert

    task, seed, noise, hesitate, labels, clearance = job
    env = _worker_env
    rs_env = env.unwrapped.rs_env
    env.reset(seed=seed)
    expert = make_expert(task, np.random.default_rng(seed), noise=noise, hesitate=hesitate, **clearance)
    strategy = expert.reset(rs_env)
    keys = [("object-state" if k == "object" else k) for k in environments.LOW_DIM_KEYS]
    ep = {"obs": [], "next_obs": [], "actions": [], "executed_actions": [], "rewards": [], "states": []}
    done, success = False, False
    while not done:
        ep["states"].append(rs_env.sim.get_state().flatten())
        ep["obs"].append([env.unwrapped._obs[k] for k in keys])
        action = expert.act(rs_env)
        _, reward, term, trunc, info = env.step(action)
        ep["next_obs"].append([env.unwrapped._obs[k] for k in keys])
        ep["actions"].append(np.clip(action if labels == "executed" else expert.intended, -1.0, 1.0))
        ep["executed_actions"].append(np.clip(action, -1.0, 1.0))
        ep["rewards"].append(reward)
        done, success = term or trunc, info["success"]
    ep = {k: (np.array(v) if k in ("actions", "executed_actions", "rewards", "states") else
              [np.array([o[j] for o in v]) for j in range(len(keys))]) for k, v in ep.items()}
    ep.update(seed=seed, success=success, strategy=strategy, model_file=rs_env.sim.model.get_xml())
    return ep


def generate_robomimic(task: str, path: str | None = None, num_demos: int = environments.GENERATED_ROBOMIMIC["num_demos"],
                       noise: float = environments.GENERATED_ROBOMIMIC["noise"],
                       hesitate: float = environments.GENERATED_ROBOMIMIC["hesitate"], seed: int = 0,
                       num_workers: int = 2, labels: Literal["executed", "intended"] = "executed",
                       hover: float | None = None, aside_descent: float | None = None) -> dict:
    """Scripted demos for `task` in Robomimic's hdf5 layout; keeps the first `num_demos` successes.

    noise: std of Gaussian noise on the executed actions; hesitate: probability of an imperfect operator
    (pauses, overshoots, missed grasps and retries). labels: which action each demo records as `actions`:
    "executed" (noise and hesitation included, like human data) or "intended" (what a perfect operator would
    have done in the same state, as in DART; the executed actions are kept in `executed_actions`). hover,
    aside_descent: the side grasp's clearance (see scripted_experts.make_expert; None: its default); a
    non-default value goes into the file name. Initial-state seeds are
    seed, seed + 1, ...; evaluation uses seeds from environments.EVAL_SEED_OFFSET on, so they never overlap.
    """
    environments.check_env_id(task)
    assert task in environments.ROBOMIMIC_TASKS, f"{task} is not a Robomimic task"
    from scripted_experts import ASIDE_DESCENT, HOVER, make_expert

    clearance = dict(hover=HOVER if hover is None else hover, aside_descent=ASIDE_DESCENT if aside_descent is None else aside_descent)
    make_expert(task, np.random.default_rng(seed), **clearance)  # a bad option fails here, not in a worker
    custom = tuple(clearance.values()) if tuple(clearance.values()) != (HOVER, ASIDE_DESCENT) else None
    path = path or environments.generated_robomimic_path(task, num_demos, noise, hesitate, labels, custom)
    episodes, next_seed = [], seed
    with _pool(_init_robomimic_worker, (task,), num_workers) as pool, \
            tqdm(total=num_demos, desc=f"{task} demos", unit="demo") as bar:
        while sum(e["success"] for e in episodes) < num_demos:
            missing = num_demos - sum(e["success"] for e in episodes)
            jobs = [(task, s, noise, hesitate, labels, clearance) for s in range(next_seed, next_seed + missing + 2)]
            next_seed += len(jobs)
            for ep in pool.imap_unordered(_robomimic_episode, jobs):
                episodes.append(ep)
                bar.update(min(int(ep["success"]), num_demos - bar.n))  # spare jobs beyond the total
            assert next_seed - seed < 20 * num_demos + 100, "the expert almost never succeeds; lower noise/hesitate"
    episodes.sort(key=lambda e: e["seed"])
    expert_success = float(np.mean([e["success"] for e in episodes]))
    demos = [e for e in episodes if e["success"]][:num_demos]
    env_kwargs = environments.robomimic_env_kwargs(task)
    env_args = {"env_name": env_kwargs.pop("env_name"), "type": 1, "env_version": env_kwargs.pop("robosuite_version"),
                "env_kwargs": env_kwargs}

    def write(tmp):
        import h5py

        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["total"] = sum(len(d["actions"]) for d in demos)
            data.attrs["generator"] = json.dumps(dict(expert="scripted_experts", noise=noise, hesitate=hesitate, labels=labels, **clearance,
                                                      expert_success_rate=expert_success, attempts=len(episodes)))
            for i, d in enumerate(demos):
                g = data.create_group(f"demo_{i}")
                g.attrs.update(num_samples=len(d["actions"]), model_file=d["model_file"], seed=d["seed"],
                               strategy=json.dumps(d["strategy"]))
                for name in ("obs", "next_obs"):
                    for key, arr in zip(environments.LOW_DIM_KEYS, d[name]):
                        g.create_dataset(f"{name}/{key}", data=arr.astype(np.float64))
                g.create_dataset("actions", data=d["actions"])
                g.create_dataset("executed_actions", data=d["executed_actions"])
                g.create_dataset("rewards", data=d["rewards"])
                g.create_dataset("dones", data=(np.arange(len(d["actions"])) == len(d["actions"]) - 1).astype(np.int64))
                g.create_dataset("states", data=d["states"])
            names = np.array([f"demo_{i}" for i in range(len(demos))], dtype="S")
            n_valid = max(1, len(demos) // 10)
            f.create_dataset("mask/train", data=names[:-n_valid])
            f.create_dataset("mask/valid", data=names[-n_valid:])

    _write_atomic(path, write)
    lengths = [len(d["actions"]) for d in demos]
    print(f"{task}: expert success {expert_success:.1%} ({sum(e['success'] for e in episodes)}/{len(episodes)}), "
          f"kept {len(demos)} demos, {sum(lengths)} transitions, mean length {np.mean(lengths):.0f} -> {path}")
    return {"expert_success_rate": expert_success, "attempts": len(episodes), "transitions": sum(lengths), "path": path}


# ----------------------------------------------------------------------------------------------
# OGBench: oracle play data
# ----------------------------------------------------------------------------------------------
def _init_ogbench_worker(name):
    global _worker_env
    import gymnasium as gym
    import ogbench  # noqa: F401  (registers the envs)

    env_name = name.replace("-play", "")  # cube-double-play-v0 -> cube-double-v0
    _worker_env = gym.make(env_name, terminate_at_goal=False, mode="data_collection", max_episode_steps=1001)


def _ogbench_episode(job):
    """One 1001-step play episode: the oracle chains random pick-and-place (or stack) subtasks."""
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

    num_cubes, seed = job
    env = _worker_env
    np.random.seed(seed)  # the oracle's keyframe and noise sampling use the global numpy RNG
    p_stack = np.random.uniform(*P_STACK[num_cubes])
    ob, info = env.reset(seed=seed)
    oracle = CubePlanOracle(env=env, segment_dt=0.4, noise=0.1, noise_smoothing=0.5)
    oracle.reset(ob, info)
    ep = {k: [] for k in ("observations", "actions", "qpos", "qvel")}
    done = False
    while not done:
        action = np.clip(oracle.select_action(ob, info), -1.0, 1.0)
        next_ob, _, term, trunc, info = env.step(action)
        for k, v in (("observations", ob), ("actions", action), ("qpos", info["prev_qpos"]), ("qvel", info["prev_qvel"])):
            ep[k].append(v)
        done = term or trunc
        if oracle.done and not done:
            next_ob, info = env.unwrapped.set_new_target(p_stack=p_stack)
            oracle.reset(next_ob, info)
        ob = next_ob
    ep = {k: np.array(v, dtype=np.float32) for k, v in ep.items()}
    ep["terminals"] = np.arange(len(ep["actions"])) == len(ep["actions"]) - 1
    return seed, ep


def generate_ogbench(name: str = "cube-double-play-v0", path: str | None = None, num_episodes: int | None = None,
                     full: bool = False, seed: int = 0, num_workers: int = 2) -> str:
    """OGBench play data `{name}.npz` (num_episodes) and `{name}-val.npz` (num_episodes // 10, other seeds).

    num_episodes defaults to 70 (about 3 minutes on 2 cores); --full gives the official size
    (1000 / 3000 / 5000 episodes for double / triple / quadruple).
    """
    size = name.split("-")[1]
    assert name == f"cube-{size}-play-v0" and size in OGBENCH_CUBES, f"expected cube-{{double,triple,quadruple}}-play-v0, got {name}"
    num_episodes = num_episodes or (OGBENCH_FULL_EPISODES[size] if full else DEFAULT_OGBENCH_EPISODES)
    path = path or os.path.join(environments.DATA_DIR, "ogbench", f"{name}.npz")
    num_val = max(1, num_episodes // 10)
    jobs = [(OGBENCH_CUBES[size], s) for s in range(seed, seed + num_episodes + num_val)]
    with _pool(_init_ogbench_worker, (name,), num_workers) as pool:
        results = dict(tqdm(pool.imap_unordered(_ogbench_episode, jobs), total=len(jobs), desc=name, unit="episode"))
    for out, seeds in ((path.replace(".npz", "-val.npz"), range(seed + num_episodes, seed + num_episodes + num_val)),
                       (path, range(seed, seed + num_episodes))):
        arrays = {k: np.concatenate([results[s][k] for s in seeds]) for k in results[seed]}

        def write(tmp, arrays=arrays):
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        _write_atomic(out, write)
    print(f"{name}: {num_episodes} + {num_val} (val) episodes of 1001 steps -> {path}")
    return path


def download(name: str = "cube-double-play-v0") -> None:
    """Download the official OGBench files (and -val) into ~/.ogbench/data (needs internet)."""
    import ogbench

    ogbench.download_datasets([name], dataset_dir="~/.ogbench/data")


def generate_default(env_id: str, path: str) -> None:
    """Called by environments.load_dataset when no official data is present: generate and cache the default set."""
    if env_id in environments.ROBOMIMIC_TASKS:
        print(f"[data] No Robomimic file at ~/.robomimic/{env_id}/mh/low_dim_v15.hdf5: generating 200 scripted "
              f"multimodal demos of an imperfect operator for {env_id!r} locally (a few minutes, once) and caching "
              f"them at {path}")
        generate_robomimic(env_id, path)
    else:
        name = environments.ogbench_dataset_name(env_id)
        print(f"[data] No official OGBench file at ~/.ogbench/data/{name}.npz: generating {DEFAULT_OGBENCH_EPISODES} "
              f"oracle play episodes locally (about 3 minutes, once) and caching them at {path}. "
              f"For the official data: python make_datasets.py download --name {name}")
        generate_ogbench(name, path)


if __name__ == "__main__":
    import tyro

    tyro.extras.subcommand_cli_from_dict({"robomimic": generate_robomimic, "ogbench": generate_ogbench,
                                          "download": download})
