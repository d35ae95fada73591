"""Small helpers shared by the drifting-policy scripts: I/O, seeding, run set-up and checkpoints.

Argument handling (`parse_args` with --preset and --resume, `require`), run set-up (`set_seed`, `make_run`,
`Progress`, `Checkpointing`) and checkpoints (`save_checkpoint`, `load_policy`). Environments, datasets and
rollouts are in environments.py. No algorithm lives here: each script keeps its own networks and its own copy
of the drifting loss, CleanRL style.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time

import numpy as np  # numpy only: torch loads after the arguments are parsed (fast --help)


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
