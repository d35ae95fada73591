"""One sweep runner for every benchmark: a grid of script x env id x seed x extra flags, run on this machine (a
process pool, the default) or on Slurm (one submitit job array per grid), safe under preemption, with one collection
step that reads only the run directories, wherever they ran.

    python benchmarks/sweep.py GRID.toml --jobs 2                     # local: 2 runs at a time, 1 torch thread each
    python benchmarks/sweep.py GRID.toml --cluster slurm --partition gpu --gpus-per-run 1 --time-min 2880
    python benchmarks/sweep.py GRID.toml --dry-run [--cluster slurm]  # the commands (and the sbatch script); runs nothing
    python benchmarks/sweep.py GRID.toml --collect out.csv            # every cell's results.json -> out.csv and out.md
    python benchmarks/sweep.py --script dbp_bc.py --env-ids lift can --seeds 1 2 --flags "--total-steps 100"

Grid file (TOML; the grids of this repository are in benchmarks/grids/):
    name = "tiny"                        # the grid's name: its exp names, logs and job folder carry it
    env_ids = ["lift", "can"]            # every method's env ids and seeds (a method may override them)
    seeds = [1, 2]
    flags = "--preset cpu"               # flags of every run: a string (split as a shell does) or a list
    [env_flags]                          # flags by env id (fnmatch patterns, every match applies, in file order)
    "cube-*" = "--success-timing post"
    [methods.dbp]                        # one table per method, run in file order
    script = "dbp_bc.py"                 # relative to the repository root
    flags = "--total-steps 100"
    # optional: env_ids, seeds; exp_name (a fixed name instead of the hashed one); checkpoint (its file name)
Cells run seed-major (every method and task at seed 1, then seed 2, ...), so an interrupted grid is balanced.

Names. Cell (method, env id, seed) gets the exp name {grid}_{method}_{8 hex digits of a hash of its script and
flags}, passed as --exp-name; the script writes runs/{env_id}__{exp_name}__{seed}__{unix time}/ (under --work-dir).
The name is deterministic, so a re-run of the grid finds its cells' run dirs; it changes with the flags, so a grid
with another budget never mistakes old runs for its own.

Resume. A cell whose run dir holds results.json is finished and skipped. A cell whose run dir holds the script's
resumable checkpoint (dbp.pt, dfp.pt, dbpo.pt, qc_fql.pt, diffusion.pt) continues with `script --resume <it>`,
which keeps the run dir and the exact training state. Any other cell starts fresh.

Local mode: a pool of --jobs processes, each run with --threads torch threads (and OMP/MKL/OpenBLAS threads), in its
own process group. SIGINT or SIGTERM to the runner sends SIGTERM to every run (each writes its checkpoint and exits
with status 75), waits up to --grace-s, then kills what is left of every group: no run outlives the runner. The
runner then exits with 128 + the signal; the same command later resumes the grid.

Slurm mode (submitit): one job array, capped at --array-parallelism jobs at a time. Each array task runs a
`SlurmRun` (a submitit Checkpointable) that starts the script. The preemption notice is SIGUSR1 (submitit's
SUBMITIT_PREEMPT_SIGNAL, set to USR1 here): sent by Slurm --time-min minus --signal-delay-s into the job, by a
preempting scheduler, or by hand with `scancel --signal=USR1 JOBID_TASK`. On it, submitit calls
SlurmRun.checkpoint(), which sends SIGTERM to the run, waits for its checkpoint (exit 75) and returns the same
cell with --resume <checkpoint>; submitit requeues the task, which continues where it stopped. A run stopped by a
plain SIGTERM (exit 75 with no notice) requeues its task itself. Job ids go to runs/sweeps/{grid}/jobs.json: a
re-submitted grid skips the cells whose job is still queued or running, as well as the finished ones.

Collection: one row per cell (grid, method, script, env id, seed, exp name, status, steps, final / best / switch
success, episodes, wall time, run dir relative to --work-dir) from results.json alone, as CSV and as a markdown
table of mean +- std over seeds (numpy's ddof = 0). Without a grid, every runs/*/results.json under --work-dir.

Shapes: none; this file launches processes and holds no tensors.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal, Optional

import tyro
from typing_extensions import Annotated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import common  # noqa: E402  (numpy, gymnasium: no torch here)
import environments  # noqa: E402

os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # before submitit is imported, here and in every job
PREEMPTED = 75  # the scripts' exit status after writing their checkpoint on a stop signal
# script (relative to ROOT) -> its resumable checkpoint in the run dir
CHECKPOINTS = {"dbp_bc.py": "dbp.pt", "dbpo_online.py": "dbpo.pt", "dfp_offline_to_online.py": "dfp.pt",
               "baselines/qc_fql.py": "qc_fql.pt", "baselines/diffusion_bc.py": "diffusion.pt"}
RUNNER_FLAGS = {"--env-id", "--seed", "--exp-name", "--resume"}  # set per cell, never by a grid's flags
GRID_KEYS = {"name", "env_ids", "seeds", "flags", "env_flags", "methods"}
METHOD_KEYS = {"script", "flags", "env_ids", "seeds", "exp_name", "checkpoint"}
FIELDS = ["grid", "method", "script", "env_id", "seed", "exp_name", "status", "steps", "final_success",
          "final_episodes", "best_success", "switch_success", "wall_time_s", "preset", "run_dir"]


@dataclass
class Launch:
    """Where and how a grid's runs are started (shared by the benchmarks that launch through this file)."""

    cluster: Literal["local", "slurm"] = "local"
    """local: a process pool on this machine; slurm: one submitit job array"""
    jobs: int = 1
    """local: runs at the same time (each also starts its evaluation env processes)"""
    threads: int = 1
    """torch threads of every run (--threads, OMP_NUM_THREADS, MKL_NUM_THREADS)"""
    pin_cores: bool = False
    """local: pin each of the --jobs slots to its own --threads cores (taskset)"""
    grace_s: float = 120.0
    """seconds a stopped run gets to write its checkpoint before it is killed"""
    work_dir: str = "."
    """where the runs write runs/{run_name}/ and the runner writes runs/sweeps/{grid}/"""
    dry_run: bool = False
    """print the commands (and, with --cluster slurm, the sbatch script) and exit"""
    partition: Optional[str] = None
    """slurm: partition"""
    gpus_per_run: int = 0
    """slurm: GPUs per run (--gpus-per-node of each array task)"""
    cpus_per_run: Optional[int] = None
    """slurm: CPUs per run (default: --threads + 1, for the evaluation env processes)"""
    mem_gb: Optional[float] = None
    """slurm: memory per run in GB (default: the cluster's)"""
    time_min: int = 1440
    """slurm: time limit of each job in minutes; a run that outlives it is checkpointed and requeued"""
    signal_delay_s: int = 120
    """slurm: the preemption notice comes this many seconds before the time limit"""
    array_parallelism: int = 256
    """slurm: array tasks running at the same time"""
    sbatch_extra: str = ""
    """slurm: extra sbatch flags, e.g. "--qos=high --account=lab --exclusive" """
    setup: tuple[str, ...] = ()
    """slurm: shell lines run before each job (module load ..., source .venv/bin/activate)"""
    wait: bool = False
    """slurm: wait until the array has ended, then collect (local runs always wait)"""
    rerun: bool = False
    """start every cell again in a new run dir, ignoring its earlier runs (default: skip the finished, resume the rest)"""
    python: str = sys.executable
    """the Python that runs the scripts (on Slurm: a path valid on the compute nodes)"""


@dataclass
class Args:
    grid: Annotated[Optional[str], tyro.conf.Positional] = None
    """grid file (TOML); or give --script, --env-ids and --seeds"""
    script: Optional[str] = None
    """a grid from flags: the script (relative to the repository root)"""
    env_ids: tuple[str, ...] = ()
    """env ids (with a grid file: only these of its env ids)"""
    seeds: tuple[int, ...] = ()
    """seeds (with a grid file: only these of its seeds)"""
    flags: str = ""
    """a grid from flags: the extra flags of every run, one string"""
    methods: tuple[str, ...] = ()
    """with a grid file: only these of its methods"""
    name: Optional[str] = None
    """the grid's name (default: the file's `name`, or the script's)"""
    collect: Optional[str] = None
    """gather the cells' results.json into this CSV (and a .md table beside it), run nothing"""
    launch: tyro.conf.OmitArgPrefixes[Launch] = field(default_factory=Launch)


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the grid, its names, and what each cell has already done
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    grid: str
    method: str
    script: str
    env_id: str
    seed: int
    flags: tuple[str, ...]
    exp_name: str
    checkpoint: str

    @property
    def key(self) -> str:
        """The run dir's name without its start time."""
        return f"{self.env_id}__{self.exp_name}__{self.seed}"


def _flag_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise common.UserError(f"{where}: flags must be a string or a list of strings, not {value!r}")


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*(_[A-Za-z0-9.+-]+)*", name):
        raise common.UserError(f"{what} {name!r}: use letters, digits, '.', '+', '-' and single '_' (a run dir's "
                               f"name is {{env_id}}__{{exp_name}}__{{seed}}__{{time}}, so no '__')")
    return name


def exp_name(grid: str, method: str, script: str, flags) -> str:
    digest = hashlib.sha1(json.dumps([script, list(flags)]).encode()).hexdigest()[:8]
    return f"{grid}_{method}_{digest}"


def make_cells(name: str, methods: dict, env_ids, seeds, flags=(), env_flags=None) -> list[Cell]:
    """methods: {method: {"script", "flags"?, "env_ids"?, "seeds"?, "exp_name"?, "checkpoint"?}} in run order."""
    _check_name(name, "grid name")
    if not methods:
        raise common.UserError(f"grid {name!r} has no methods")
    per_method = []
    for method, spec in methods.items():
        where = f"grid {name!r}, method {method!r}"
        _check_name(method, "method name")
        unknown = set(spec) - METHOD_KEYS
        if unknown:
            raise common.UserError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(METHOD_KEYS)}")
        script = spec.get("script")
        if not script or not os.path.isfile(os.path.join(ROOT, script)):
            raise common.UserError(f"{where}: script {script!r} is not a file under {ROOT}")
        m_envs, m_seeds = list(spec.get("env_ids", env_ids)), [int(s) for s in spec.get("seeds", seeds)]
        if not m_envs or not m_seeds:
            raise common.UserError(f"{where}: no env ids or no seeds")
        for env_id in m_envs:
            environments.check_env_id(env_id)
        checkpoint = spec.get("checkpoint") or CHECKPOINTS.get(script)
        if not checkpoint:
            raise common.UserError(f"{where}: no known resumable checkpoint for {script}; set `checkpoint`")
        per_method.append((method, script, m_envs, m_seeds, _flag_list(spec.get("flags", []), where),
                           spec.get("exp_name"), checkpoint))
    cells = []
    all_seeds = list(dict.fromkeys(s for m in per_method for s in m[3]))
    all_envs = list(dict.fromkeys(e for m in per_method for e in m[2]))
    for seed in all_seeds:
        for env_id in all_envs:
            for method, script, m_envs, m_seeds, m_flags, fixed, checkpoint in per_method:
                if env_id not in m_envs or seed not in m_seeds:
                    continue
                cell_flags = list(flags) + m_flags
                for pattern, extra in (env_flags or {}).items():
                    if fnmatch.fnmatchcase(env_id, pattern):
                        cell_flags += _flag_list(extra, f"grid {name!r}, env_flags {pattern!r}")
                owned = [f for f in cell_flags if f.split("=")[0] in RUNNER_FLAGS]
                if owned:
                    raise common.UserError(f"grid {name!r}, method {method!r}: {owned[0]} is the runner's to set "
                                           f"(each cell gets its env id, seed, exp name and --resume)")
                name_ = _check_name(fixed, "exp_name") if fixed else exp_name(name, method, script, cell_flags)
                cells.append(Cell(name, method, script, env_id, seed, tuple(cell_flags), name_, checkpoint))
    keys = [c.key for c in cells]
    if len(set(keys)) != len(keys):
        raise common.UserError(f"grid {name!r}: two cells share a run name (a fixed exp_name used twice?)")
    return cells


def load_grid(path: str) -> tuple[str, list[Cell]]:
    import tomllib

    if not os.path.isfile(path):
        raise common.UserError(f"grid file {path} does not exist")
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise common.UserError(f"grid file {path} is not valid TOML: {e}")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return spec["name"], grid_cells(spec, f"grid file {path}")


def grid_cells(spec: dict, where: str = "grid") -> list[Cell]:
    """The cells of a grid given as a dict with a grid file's keys (name, env_ids, seeds, flags, env_flags, methods)."""
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise common.UserError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    return make_cells(spec.get("name", ""), spec.get("methods", {}), spec.get("env_ids", []), spec.get("seeds", []),
                      _flag_list(spec.get("flags", []), where), spec.get("env_flags", {}))


def select(cells: list[Cell], env_ids=(), seeds=(), methods=()) -> list[Cell]:
    for what, wanted, have in (("env id", env_ids, {c.env_id for c in cells}), ("seed", seeds, {c.seed for c in cells}),
                               ("method", methods, {c.method for c in cells})):
        missing = [w for w in wanted if w not in have]
        if missing:
            raise common.UserError(f"{what}(s) {missing} not in the grid (it has {sorted(have, key=str)})")
    return [c for c in cells if (not env_ids or c.env_id in env_ids) and (not seeds or c.seed in seeds)
            and (not methods or c.method in methods)]


def find_run(work_dir: str, cell: Cell, since: int = 0) -> tuple[str, Optional[str], Optional[str]]:
    """(status, run dir, resumable checkpoint): "finished" (results.json), "checkpointed", "started" or "missing".
    Among several run dirs of one cell: the newest finished one, else the newest with a checkpoint, else the
    newest. Run dirs started before the unix time `since` are ignored (--rerun)."""
    dirs = [d for d in glob.glob(os.path.join(glob.escape(work_dir), "runs", glob.escape(cell.key) + "__*"))
            if d.rsplit("__", 1)[1].isdigit() and int(d.rsplit("__", 1)[1]) >= since and os.path.isdir(d)]
    dirs.sort(key=lambda d: int(d.rsplit("__", 1)[1]))
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "results.json")):
            return "finished", d, None
    for d in reversed(dirs):
        ckpt = os.path.join(d, cell.checkpoint)
        if os.path.exists(ckpt):
            return "checkpointed", d, ckpt
    return ("started", dirs[-1], None) if dirs else ("missing", None, None)


def command(cell: Cell, launch: Launch, resume: Optional[str] = None) -> list[str]:
    script = os.path.join(ROOT, cell.script)
    if resume:  # the checkpoint holds every argument; only budgets, evaluation and threads may change
        return [launch.python, script, "--resume", os.path.abspath(resume)]
    return [launch.python, script, "--env-id", cell.env_id, "--seed", str(cell.seed), "--exp-name", cell.exp_name,
            "--threads", str(launch.threads), *cell.flags]


def child_env(threads: int) -> dict:
    t = str(threads)
    return {**os.environ, "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
            "PYTHONUNBUFFERED": "1", "DRIFT_PROGRESS_SECONDS": os.environ.get("DRIFT_PROGRESS_SECONDS", "60")}


def sweep_dir(work_dir: str, grid: str) -> str:
    return os.path.join(os.path.abspath(work_dir), "runs", "sweeps", grid)


def log_path(work_dir: str, cell: Cell) -> str:
    return os.path.join(sweep_dir(work_dir, cell.grid), "logs", cell.key + ".log")


def mark_run(run_dir: str, cell: Cell):
    """runs/<run>/sweep.json: which grid and method the run belongs to, for a collection without the grid file."""
    with open(os.path.join(run_dir, "sweep.json"), "w") as f:
        json.dump(dict(grid=cell.grid, method=cell.method, script=cell.script, flags=list(cell.flags)), f, indent=2)


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: local mode, a process pool whose runs die with it
# ----------------------------------------------------------------------------------------------
class _Stop(Exception):
    def __init__(self, signum):
        self.signum = signum


class LocalPool:
    """Runs cells as child processes, each the leader of its own process group, at most `jobs` at a time."""

    def __init__(self, launch: Launch, since: int = 0):
        self.launch, self.since, self.lock, self.active, self.stopping = launch, since, threading.Lock(), {}, False
        self.slots = queue.Queue()
        cores = sorted(os.sched_getaffinity(0))
        for i in range(launch.jobs):
            self.slots.put([cores[(i * launch.threads + k) % len(cores)] for k in range(launch.threads)])

    def run(self, cell: Cell) -> dict:
        work_dir = os.path.abspath(self.launch.work_dir)
        status, run_dir, ckpt = find_run(work_dir, cell, self.since)
        if status == "finished":
            return dict(cell=cell, state="finished", returncode=0, run_dir=run_dir, wall_s=0.0, resumed=False)
        cmd = command(cell, self.launch, ckpt)
        cores = self.slots.get()
        try:
            if self.launch.pin_cores and shutil.which("taskset"):
                cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
            log = log_path(work_dir, cell)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            start = time.time()
            with open(log, "a") as out:
                out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
                out.flush()
                with self.lock:
                    if self.stopping:
                        return dict(cell=cell, state="not started", returncode=None, run_dir=run_dir, wall_s=0.0,
                                    resumed=bool(ckpt))
                    proc = subprocess.Popen(cmd, cwd=work_dir, env=child_env(self.launch.threads), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
                    self.active[proc.pid] = proc
                rc = proc.wait()
            with self.lock:
                self.active.pop(proc.pid, None)
            _killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind in its group
        finally:
            self.slots.put(cores)
        status, run_dir, _ = find_run(work_dir, cell, self.since)
        if status == "finished":
            mark_run(run_dir, cell)
        state = ("finished" if rc == 0 and status == "finished" else "interrupted" if rc == PREEMPTED else "failed")
        if state == "failed":
            why = "exit 0 but no results.json" if rc == 0 else f"exit {rc}"
            print(f"FAILED ({why}): {shlex.join(cmd)}\n{_tail(log)}", flush=True)
        return dict(cell=cell, state=state, returncode=rc, run_dir=run_dir, wall_s=time.time() - start,
                    resumed=bool(ckpt))

    def stop(self, grace_s: Optional[float] = None):
        """SIGTERM to every run (it checkpoints and exits 75), --grace-s to do so, then SIGKILL to every group."""
        with self.lock:
            self.stopping = True
            procs = list(self.active.values())
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (self.launch.grace_s if grace_s is None else grace_s)
        while time.monotonic() < deadline and any(p.returncode is None for p in procs):
            time.sleep(0.2)  # the pool's threads reap the runs and set returncode
        for p in procs:
            _killpg(p.pid, signal.SIGKILL)
        return procs


def _killpg(pgid: int, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_local(cells: list[Cell], launch: Launch, log=print, since: int = 0) -> list[dict]:
    """Run the cells that are not finished; returns one outcome per cell (finished ones included, state
    "finished"). Raises SystemExit(128 + signal) after a SIGINT or SIGTERM, once every run has ended."""
    pool = LocalPool(launch, since)
    outcomes, n = [], len(cells)

    def on_signal(signum, _frame):
        raise _Stop(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    executor = ThreadPoolExecutor(max(1, launch.jobs))
    try:
        futures = {executor.submit(pool.run, c): c for c in cells}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                o = fut.result()
                outcomes.append(o)
                c = o["cell"]
                log(f"[{len(outcomes)}/{n}] {c.env_id} {c.method} seed {c.seed}: {o['state']}"
                    f"{' (resumed)' if o['resumed'] else ''} ({o['wall_s']:.0f} s)", flush=True)
    except _Stop as e:
        for s, h in old.items():  # a second signal now ends the runner at once (the groups still get killed)
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else h)
        log(f"{signal.Signals(e.signum).name}: stopping {len(pool.active)} run(s) (checkpoint, then exit)", flush=True)
        executor.shutdown(wait=False, cancel_futures=True)
        pool.stop()
        executor.shutdown(wait=True)
        raise SystemExit(128 + e.signum)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        pool.stop(grace_s=10.0)  # the runner itself failed: a short grace, then kill
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    executor.shutdown(wait=True)
    order = {c: i for i, c in enumerate(cells)}
    return sorted(outcomes, key=lambda o: order[o["cell"]])


# ----------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: Slurm mode through submitit
# ----------------------------------------------------------------------------------------------
def _checkpointable():
    import submitit

    return submitit.helpers.Checkpointable


class SlurmRun(_checkpointable()):
    """One array task: runs one cell's script and, on the preemption notice, checkpoints it and requeues itself
    with --resume. The job dict: cell (fields of Cell), launch (fields of Launch), work_dir, resume (or None)."""

    def __init__(self):
        self.proc, self.notified = None, False

    def _reap(self, timeout: Optional[float] = None) -> Optional[int]:
        # os.waitpid with WNOHANG in a sleep loop, not Popen.wait: checkpoint() runs inside a signal handler that
        # may interrupt the wait below, and Popen.wait holds a lock that the handler would wait on forever.
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.proc.returncode is None:
            try:
                pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
        return self.proc.returncode

    def _on_sigterm(self, signum, _frame):
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # the run checkpoints and exits 75; __call__ then requeues

    def __call__(self, job: dict) -> dict:
        cell, launch = Cell(**{**job["cell"], "flags": tuple(job["cell"]["flags"])}), Launch(**job["launch"])
        work_dir, since = job["work_dir"], job.get("since", 0)
        status, run_dir, ckpt = find_run(work_dir, cell, since)
        if status == "finished":
            return dict(key=cell.key, state="finished", run_dir=run_dir, resumed=False)
        resume = job.get("resume") if job.get("resume") and os.path.exists(job["resume"]) else ckpt
        cmd = command(cell, launch, resume)
        signal.signal(signal.SIGTERM, self._on_sigterm)  # submitit only logs SIGTERM; the run must checkpoint
        log = log_path(work_dir, cell)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as out:
            out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} job {os.environ.get('SLURM_JOB_ID')} "
                      f"(array {os.environ.get('SLURM_ARRAY_JOB_ID')}_{os.environ.get('SLURM_ARRAY_TASK_ID')}, "
                      f"restart {os.environ.get('SLURM_RESTART_COUNT', 0)}): {shlex.join(cmd)}\n")
            out.flush()
            self.proc = subprocess.Popen(cmd, cwd=work_dir, env=child_env(launch.threads), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            rc = self._reap()
        status, run_dir, ckpt = find_run(work_dir, cell, since)
        if rc == 0 and status == "finished":
            mark_run(run_dir, cell)
            return dict(key=cell.key, state="finished", run_dir=run_dir, resumed=bool(resume))
        if rc == PREEMPTED and not self.notified:  # stopped by a plain SIGTERM: requeue this task, if Slurm lets us
            job_id = _slurm_job_id()
            if job_id and subprocess.run(["scontrol", "requeue", job_id], capture_output=True).returncode == 0:
                sys.exit(-1)  # as submitit does after its own requeue
            raise RuntimeError(f"{cell.key} stopped with its checkpoint {ckpt} (exit 75) and could not be requeued; "
                               f"submit the grid again to resume it")
        raise RuntimeError(f"{shlex.join(cmd)} ended with exit {rc}"
                           f"{' but wrote no results.json' if rc == 0 else ''}; log {log}:\n{_tail(log)}")

    def checkpoint(self, job: dict):
        """Called by submitit on the preemption notice: stop the run at its next consistent point (it writes its
        checkpoint and exits 75), then hand submitit the same cell with --resume for the requeued task."""
        import submitit

        self.notified = True
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self._reap(timeout=Launch(**job["launch"]).grace_s) is None:
                self.proc.kill()  # out of time: the last periodic checkpoint is all there is
                self._reap()
        cell = Cell(**{**job["cell"], "flags": tuple(job["cell"]["flags"])})
        _, _, ckpt = find_run(job["work_dir"], cell, job.get("since", 0))
        return submitit.helpers.DelayedSubmission(SlurmRun(), {**job, "resume": ckpt})


def _slurm_job_id() -> Optional[str]:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def sbatch_extra(text: str) -> dict:
    """"--qos=high --exclusive -A lab" -> {"qos": "high", "exclusive": True, "A": "lab"} (submitit's form)."""
    out, words = {}, shlex.split(text)
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("-"):
            raise common.UserError(f"--sbatch-extra: expected a flag, got {w!r} in {text!r}")
        key = w.lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(words) and not words[i + 1].startswith("-"):
            value, i = words[i + 1], i + 1
        else:
            value = True
        out[key.replace("-", "_")] = value
        i += 1
    return out


def slurm_parameters(launch: Launch, grid: str, work_dir: str) -> dict:
    bench = os.path.join(ROOT, "benchmarks")
    setup = [f"export SUBMITIT_PREEMPT_SIGNAL={os.environ['SUBMITIT_PREEMPT_SIGNAL']}",
             f"export PYTHONPATH={shlex.quote(bench)}:{shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"cd {shlex.quote(work_dir)}", *launch.setup]
    params = dict(job_name=f"sweep_{grid}", time=launch.time_min, cpus_per_task=launch.cpus_per_run or launch.threads + 1,
                  array_parallelism=launch.array_parallelism, signal_delay_s=launch.signal_delay_s, setup=setup,
                  stderr_to_stdout=True)
    if launch.partition:
        params["partition"] = launch.partition
    if launch.gpus_per_run:
        params["gpus_per_node"] = launch.gpus_per_run
    if launch.mem_gb:
        params["mem"] = f"{int(launch.mem_gb * 1024)}MB"
    extra = sbatch_extra(launch.sbatch_extra)
    if extra:
        params["additional_parameters"] = extra
    return params


def job_dict(cell: Cell, launch: Launch, work_dir: str, since: int = 0) -> dict:
    return dict(cell=dataclasses.asdict(cell), launch=dataclasses.asdict(launch), work_dir=work_dir, resume=None,
                since=since)


def sbatch_script(launch: Launch, grid: str, n: int) -> str:
    """The sbatch script submitit writes for an array of n tasks (without submitting anything)."""
    from submitit.slurm import slurm as submitit_slurm

    work_dir = os.path.abspath(launch.work_dir)
    folder = os.path.join(sweep_dir(work_dir, grid), "submitit", "%j")
    cmd = " ".join([shlex.quote(launch.python), "-u -m submitit.core._submit", shlex.quote(folder)])
    return submitit_slurm._make_sbatch_string(command=cmd, folder=folder, map_count=n,
                                              **slurm_parameters(launch, grid, work_dir))


def _jobs_file(work_dir, grid):
    return os.path.join(sweep_dir(work_dir, grid), "jobs.json")


def queued_jobs(job_ids) -> set[str]:
    """The job ids (and array task ids 123_4) among job_ids that squeue still lists (pending, running, ...)."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return set()
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True, text=True)
    listed = set(out.stdout.split()) if out.returncode == 0 else set()
    return {j for j in job_ids if j in listed}


def submit_slurm(cells: list[Cell], launch: Launch, log=print, since: int = 0) -> dict[str, str]:
    """Submit the unfinished cells, not already queued, as one job array; returns {cell key: array task id}."""
    import submitit

    work_dir = os.path.abspath(launch.work_dir)
    grid = cells[0].grid
    jobs_path = _jobs_file(work_dir, grid)
    known = json.load(open(jobs_path)) if os.path.exists(jobs_path) else {}
    alive = queued_jobs([known[c.key] for c in cells if c.key in known])
    todo, skipped, queued = [], 0, 0
    for c in cells:
        if find_run(work_dir, c, since)[0] == "finished":
            skipped += 1
        elif known.get(c.key) in alive:
            queued += 1
        else:
            todo.append(c)
    log(f"grid {grid}: {len(cells)} runs: {skipped} finished, {queued} still queued or running, "
        f"{len(todo)} to submit", flush=True)
    if not todo:
        return {}
    if shutil.which("sbatch") is None:
        raise common.UserError("--cluster slurm: sbatch is not on PATH (is this a Slurm login node?)")
    folder = os.path.join(sweep_dir(work_dir, grid), "submitit", "%j")
    executor = submitit.SlurmExecutor(folder=folder, python=launch.python)
    executor.update_parameters(**slurm_parameters(launch, grid, work_dir))
    jobs = executor.map_array(SlurmRun(), [job_dict(c, launch, work_dir, since) for c in todo])
    ids = {c.key: j.job_id for c, j in zip(todo, jobs)}
    known.update(ids)
    os.makedirs(os.path.dirname(jobs_path), exist_ok=True)
    with open(jobs_path, "w") as f:
        json.dump(known, f, indent=2)
    log(f"submitted array {jobs[0].job_id.split('_')[0]} ({len(todo)} tasks); job ids in {jobs_path}", flush=True)
    return ids


def wait_slurm(job_ids, log=print, poll_s: float = 5.0):
    """Wait until squeue no longer lists any of job_ids."""
    job_ids, last = list(job_ids), None
    while True:
        left = queued_jobs(job_ids)
        if not left:
            return
        if len(left) != last:
            log(f"waiting for {len(left)} Slurm job(s)", flush=True)
            last = len(left)
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------
# Collection: results.json -> CSV and markdown, whatever ran them
# ----------------------------------------------------------------------------------------------
def row_of(run_dir: Optional[str], work_dir: str, status: str, **known) -> dict:
    row = dict.fromkeys(FIELDS, "")
    row.update(known, status=status)
    if run_dir:
        row["run_dir"] = os.path.relpath(run_dir, work_dir)
    if status == "finished":
        with open(os.path.join(run_dir, "results.json")) as f:
            res = json.load(f)
        for k in ("steps", "final_success", "final_episodes", "best_success", "switch_success", "wall_time_s", "preset"):
            v = res.get(k)
            row[k] = "" if v is None else v
        for k in ("env_id", "seed", "exp_name"):
            row[k] = row[k] if row[k] != "" else res.get(k, "")
        row["script"] = row["script"] or res.get("script", "")
    return row


def collect(work_dir: str, cells: Optional[list[Cell]] = None, since: int = 0) -> list[dict]:
    """One row per cell of the grid (or, without one, per runs/*/results.json under work_dir)."""
    work_dir = os.path.abspath(work_dir)
    if cells is not None:
        rows = []
        for c in cells:
            status, run_dir, _ = find_run(work_dir, c, since)
            rows.append(row_of(run_dir, work_dir, status, grid=c.grid, method=c.method, script=c.script,
                               env_id=c.env_id, seed=c.seed, exp_name=c.exp_name))
        return rows
    rows = []
    for res in sorted(glob.glob(os.path.join(glob.escape(work_dir), "runs", "*", "results.json"))):
        run_dir = os.path.dirname(res)
        mark = os.path.join(run_dir, "sweep.json")
        meta = json.load(open(mark)) if os.path.exists(mark) else {}
        with open(res) as f:
            r = json.load(f)
        rows.append(row_of(run_dir, work_dir, "finished", grid=meta.get("grid", ""),
                           method=meta.get("method", r.get("exp_name", "")), script=meta.get("script", "")))
    return rows


def write_csv(rows: list[dict], path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _mean_std(values) -> str:
    import numpy as np

    v = np.array([float(x) for x in values if x not in ("", None)], dtype=float)
    return f"{v.mean():.3f} +- {v.std():.3f}" if len(v) else "-"


def markdown(rows: list[dict]) -> str:
    lines = ["| env id | method | finished | final success | switch success | best success | steps | exp name |",
             "|---|---|---|---|---|---|---|---|"]
    groups = list(dict.fromkeys((r["env_id"], r["method"], r["exp_name"]) for r in rows))  # exp name: same flags
    for env_id, method, name in groups:
        sub = [r for r in rows if (r["env_id"], r["method"], r["exp_name"]) == (env_id, method, name)]
        ok = [r for r in sub if r["status"] == "finished"]
        steps = sorted({str(r["steps"]) for r in ok})
        lines.append(f"| {env_id} | {method} | {len(ok)}/{len(sub)} | {_mean_std(r['final_success'] for r in ok)} | "
                     f"{_mean_std(r['switch_success'] for r in ok)} | {_mean_std(r['best_success'] for r in ok)} | "
                     f"{', '.join(steps) or '-'} | {name} |")
    lines.append("\nmean +- std over seeds (ddof = 0) of the finished runs; success from each run's results.json.")
    return "\n".join(lines)


def write_collection(rows: list[dict], csv_path: str, log=print) -> str:
    write_csv(rows, csv_path)
    table = markdown(rows)
    md_path = os.path.splitext(csv_path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(table + "\n")
    log(table + f"\n\nwrote {csv_path} and {md_path}", flush=True)
    return table


# ----------------------------------------------------------------------------------------------
# The one entry point that benchmarks call
# ----------------------------------------------------------------------------------------------
def check_launch(launch: Launch):
    common.require_positive(launch, "jobs", "threads", "time_min", "array_parallelism")
    common.require(launch.grace_s >= 0, f"--grace-s must be >= 0, not {launch.grace_s}")
    common.require(launch.gpus_per_run >= 0, f"--gpus-per-run must be >= 0, not {launch.gpus_per_run}")
    common.require(os.path.isdir(launch.work_dir), f"--work-dir {launch.work_dir} is not a directory")
    sbatch_extra(launch.sbatch_extra)


def dry_run(cells: list[Cell], launch: Launch, log=print, since: int = 0):
    work_dir = os.path.abspath(launch.work_dir)
    states = [find_run(work_dir, c, since) for c in cells]
    count = {s: sum(st[0] == s for st in states) for s in ("finished", "checkpointed")}
    where = f"{launch.jobs} at a time" if launch.cluster == "local" else "one Slurm job array"
    log(f"# grid {cells[0].grid}: {len(cells)} runs ({count['finished']} finished, {count['checkpointed']} to resume, "
        f"{len(cells) - sum(count.values())} to start), {launch.cluster}, {where}, in {work_dir}:")
    env = f"OMP_NUM_THREADS={launch.threads} MKL_NUM_THREADS={launch.threads} "
    for c, (status, run_dir, ckpt) in zip(cells, states):
        line = env + shlex.join(command(c, launch, ckpt))
        log(f"# finished, skipped: {os.path.relpath(run_dir, work_dir)}" if status == "finished" else line)
    if launch.cluster == "slurm":
        todo = len(cells) - count["finished"]
        log(f"# ---- sbatch script of the {todo}-task array (submitit writes it; task i runs the i-th command) ----")
        log(sbatch_script(launch, cells[0].grid, max(todo, 1)))


def launch_grid(cells: list[Cell], launch: Launch, log=print) -> Optional[list[dict]]:
    """Run (local) or submit (slurm) the grid; the collected rows (see collect) when the runs have ended, else None.
    Local rows also carry the run's "returncode" (None: not started)."""
    check_launch(launch)
    if not cells:
        raise common.UserError("the grid has no cells (check --env-ids, --seeds, --methods)")
    since = int(time.time()) if launch.rerun else 0
    if launch.dry_run:
        dry_run(cells, launch, log, since)
        return None
    if launch.cluster == "local":
        outcomes = run_local(cells, launch, log, since)
        failed = [o for o in outcomes if o["state"] != "finished"]
        if failed:
            log(f"{len(failed)} run(s) did not finish: " + ", ".join(o["cell"].key for o in failed), flush=True)
        rows = collect(launch.work_dir, cells, since)
        for row, o in zip(rows, outcomes):  # the same order
            row["returncode"] = o["returncode"]
        return rows
    else:
        ids = submit_slurm(cells, launch, log, since)
        if not launch.wait:
            log(f"collect later: python {os.path.relpath(__file__)} <grid> --collect out.csv "
                f"--work-dir {os.path.abspath(launch.work_dir)}", flush=True)
            return None
        known = json.load(open(_jobs_file(os.path.abspath(launch.work_dir), cells[0].grid)))
        wait_slurm({known[c.key] for c in cells if c.key in known} | set(ids.values()), log)
    return collect(launch.work_dir, cells, since)


def join_flag_values(argv: list[str], names=("--flags", "--sbatch-extra")) -> list[str]:
    """`--flags "--total-steps 100"` -> `--flags=--total-steps 100`: a value that starts with '-' is still a value."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in names and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv=None):
    args = tyro.cli(Args, args=join_flag_values(sys.argv[1:] if argv is None else list(argv)))
    if args.grid and args.script:
        raise common.UserError("give a grid file or --script, not both")
    if args.grid:
        name, cells = load_grid(args.grid)
        if args.name:
            name, cells = args.name, [dataclasses.replace(c, grid=_check_name(args.name, "grid name")) for c in cells]
        cells = select(cells, args.env_ids, args.seeds, args.methods)
    elif args.script:
        name = args.name or os.path.splitext(os.path.basename(args.script))[0]
        cells = make_cells(name, {"run": {"script": args.script, "flags": args.flags}}, args.env_ids, args.seeds)
    elif args.collect:
        cells, name = None, None
    else:
        raise common.UserError("give a grid file, or --script with --env-ids and --seeds (see --help)")
    if args.collect:
        write_collection(collect(args.launch.work_dir, cells), args.collect)
        return
    if args.launch.dry_run:  # `sweep.py ... --dry-run | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    rows = launch_grid(cells, args.launch)
    if rows is not None:
        write_collection(rows, os.path.join(sweep_dir(args.launch.work_dir, name), "results.csv"))
        if any(r["status"] != "finished" for r in rows):
            sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sweep  # the module itself, not __main__: submitit pickles SlurmRun by reference to `sweep`

    sweep.main()
