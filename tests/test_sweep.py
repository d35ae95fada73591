"""benchmarks/sweep.py: grid files and names, the resume states, collection, the dry run (commands and the sbatch
script); a tiny grid (dbp_bc.py and dfp_offline_to_online.py x 2 seeds) run locally; killing the local runner
ends every run it started; the same grid on a real single-node Slurm (tests/slurm/start_slurm.sh), with one job
preempted by `scancel --signal=USR1` mid-run that resumes from its checkpoint and ends at the same step count."""

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

import common
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import sweep  # noqa: E402

SWEEP = os.path.join(ROOT, "benchmarks", "sweep.py")
DBP_STEPS = 3000  # long enough (10-30 s of training here) to preempt the run mid-way


def run_sweep(*args, env=None, timeout=600, check=True):
    out = subprocess.run([sys.executable, SWEEP, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "DRIFT_PROGRESS_SECONDS": "1", **(env or {})})
    if check:
        assert out.returncode == 0, f"{args}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def tiny_grid(path, dataset, name="tiny", dbp_steps=DBP_STEPS):
    """2 scripts x 2 seeds on lift, tiny networks, 1 evaluation episode of at most 10 steps for DBP."""
    path.write_text(f"""
name = "{name}"
env_ids = ["lift"]
seeds = [1, 2]
flags = "--dataset-path {dataset} --eval-episodes 1 --final-eval-episodes 1 --num-eval-envs 1"
[methods.dbp]
script = "dbp_bc.py"
flags = "--total-steps {dbp_steps} --eval-every {dbp_steps} --batch-size 8 --hidden-dims 16 16 --max-episode-steps 10"
[methods.dfp]
script = "dfp_offline_to_online.py"
flags = "--offline-steps 30 --online-steps 40 --start-training 10 --eval-every 30 --batch-size 16 --hidden-dims 32 32 --gen-per-obs 4 --pool-size 4"
""")
    return str(path)


def read_csv(path):
    with open(path) as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def check_collected(work_dir, rows, dbp_steps=DBP_STEPS):
    """Every cell finished, left its resumable checkpoint, and has its row."""
    assert [(r["method"], r["seed"]) for r in rows] == [("dbp", "1"), ("dfp", "1"), ("dbp", "2"), ("dfp", "2")]
    for r in rows:
        assert r["status"] == "finished" and r["env_id"] == "lift", r
        assert int(r["steps"]) == (dbp_steps if r["method"] == "dbp" else 70), r
        assert 0 <= float(r["final_success"]) <= 1 and int(r["final_episodes"]) == 1
        run_dir = os.path.join(work_dir, r["run_dir"])
        assert os.path.exists(os.path.join(run_dir, "dbp.pt" if r["method"] == "dbp" else "dfp.pt")), run_dir
        assert json.load(open(os.path.join(run_dir, "sweep.json")))["method"] == r["method"]
    assert [r["switch_success"] != "" for r in rows] == [False, True, False, True]  # only DFP has a switch


# ----------------------------------------------------------------------------------------------
# Grids, names, states, collection: no runs
# ----------------------------------------------------------------------------------------------
def test_grid_file_cells_names_and_filters(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text("""
name = "g"
env_ids = ["lift", "cube-double-play-singletask-task2-v0"]
seeds = [1, 2]
flags = ["--preset", "cpu"]
[env_flags]
"cube-*" = "--success-timing post"
[methods.a]
script = "dbp_bc.py"
flags = "--total-steps 10"
[methods.b]
script = "dfp_offline_to_online.py"
seeds = [2]
""")
    name, cells = sweep.load_grid(str(grid))
    assert name == "g"
    assert [(c.seed, c.env_id[:4], c.method) for c in cells] == [  # seed-major, then env id, then method
        (1, "lift", "a"), (1, "cube", "a"), (2, "lift", "a"), (2, "lift", "b"), (2, "cube", "a"), (2, "cube", "b")]
    lift_a, cube_a = cells[0], cells[1]
    assert lift_a.flags == ("--preset", "cpu", "--total-steps", "10")
    assert cube_a.flags == ("--preset", "cpu", "--total-steps", "10", "--success-timing", "post")
    assert lift_a.exp_name.startswith("g_a_") and lift_a.exp_name != cube_a.exp_name  # the flags differ
    assert sweep.load_grid(str(grid))[1] == cells  # deterministic
    grid.write_text(grid.read_text().replace("--total-steps 10", "--total-steps 20"))
    assert sweep.load_grid(str(grid))[1][0].exp_name != lift_a.exp_name  # another budget, another run
    assert lift_a.checkpoint == "dbp.pt" and cells[3].checkpoint == "dfp.pt"
    cmd = sweep.command(lift_a, sweep.Launch(threads=2))
    assert cmd[1:] == [os.path.join(ROOT, "dbp_bc.py"), "--env-id", "lift", "--seed", "1", "--exp-name",
                       lift_a.exp_name, "--threads", "2", "--preset", "cpu", "--total-steps", "10"]
    assert [c.method for c in sweep.select(cells, seeds=[2], methods=["b"])] == ["b", "b"]
    with pytest.raises(common.UserError, match="seed"):
        sweep.select(cells, seeds=[3])


@pytest.mark.parametrize("text, message", [
    ('name = "g"\nseeds = [1]\nenv_ids = ["lift"]\n[methods.a]\nscript = "nope.py"\n', "not a file"),
    ('name = "g"\nseeds = [1]\nenv_ids = ["lift"]\n[methods.a]\nscript = "dbp_bc.py"\nflagz = "x"\n', "unknown key"),
    ('name = "g"\nseeds = [1]\nenv_ids = ["lifft"]\n[methods.a]\nscript = "dbp_bc.py"\n', "unknown env id"),
    ('name = "g"\nseeds = [1]\nenv_ids = ["lift"]\n[methods.a__b]\nscript = "dbp_bc.py"\n', "no '__'"),
    ('name = "g"\nseeds = []\nenv_ids = ["lift"]\n[methods.a]\nscript = "dbp_bc.py"\n', "no seeds"),
    ('name = "g"\nseeds = [1\n', "not valid TOML"),
    ('name = "g"\nseeds = [1]\nenv_ids = ["lift"]\nflags = "--seed 3"\n[methods.a]\nscript = "dbp_bc.py"\n', "runner's"),
])
def test_bad_grid_is_one_clear_error(tmp_path, text, message):
    grid = tmp_path / "bad.toml"
    grid.write_text(text)
    out = run_sweep(grid, "--dry-run", check=False)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def fake_run(work_dir, cell, t, files=(), results=None):
    d = os.path.join(work_dir, "runs", f"{cell.key}__{t}")
    os.makedirs(d)
    for f in files:
        open(os.path.join(d, f), "w").close()
    if results is not None:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(results, f)
    return d


def test_run_states_resume_command_and_collection(tmp_path):
    cells = sweep.make_cells("s", {"dbp": {"script": "dbp_bc.py"}, "dfp": {"script": "dfp_offline_to_online.py"}},
                             ["lift"], [1, 2])
    a, b, c, d = cells  # dbp 1, dfp 1, dbp 2, dfp 2
    w = str(tmp_path)
    res = dict(script="dbp_bc", env_id="lift", exp_name=a.exp_name, seed=1, preset="cpu", steps=100,
               final_success=0.5, final_episodes=10, best_success=0.7, switch_success=None, wall_time_s=3.0)
    fake_run(w, a, 100, ["dbp.pt"])
    done = fake_run(w, a, 200, ["dbp.pt"], results=res)  # finished wins over a newer unfinished dir
    fake_run(w, a, 300, ["dbp.pt"])
    older = fake_run(w, b, 100, ["dfp.pt"])
    fake_run(w, b, 200, [])  # started, no checkpoint yet: the checkpointed one is resumed
    fake_run(w, c, 100, [])
    assert sweep.find_run(w, a) == ("finished", done, None)
    assert sweep.find_run(w, b) == ("checkpointed", older, os.path.join(older, "dfp.pt"))
    assert sweep.find_run(w, c)[0] == "started" and sweep.find_run(w, d) == ("missing", None, None)
    assert sweep.command(b, sweep.Launch(), sweep.find_run(w, b)[2])[2:] == ["--resume", os.path.join(older, "dfp.pt")]
    rows = sweep.collect(w, cells)
    assert [r["status"] for r in rows] == ["finished", "checkpointed", "started", "missing"]
    assert rows[0]["final_success"] == 0.5 and rows[0]["best_success"] == 0.7 and rows[0]["switch_success"] == ""
    assert rows[0]["run_dir"] == os.path.relpath(done, w)  # relative: the CSV does not depend on where it ran
    out = tmp_path / "out.csv"
    sweep.write_collection(rows, str(out), log=lambda *a, **k: None)
    header, back = read_csv(out)
    assert header == sweep.FIELDS and len(back) == 4
    table = (tmp_path / "out.md").read_text()
    assert f"| lift | dbp | 1/2 | 0.500 +- 0.000 | - | 0.700 +- 0.000 | 100 | {a.exp_name} |" in table
    assert f"| lift | dfp | 0/2 | - | - | - | - | {b.exp_name} |" in table
    # Without the grid: every finished run under the work dir, its method from sweep.json (or its exp name).
    loose = sweep.collect(w)
    assert len(loose) == 1 and loose[0]["method"] == a.exp_name and loose[0]["steps"] == 100


def test_sbatch_extra_parsing():
    assert sweep.sbatch_extra("--qos=high --exclusive -A lab --constraint a100") == \
        dict(qos="high", exclusive=True, A="lab", constraint="a100")
    with pytest.raises(common.UserError):
        sweep.sbatch_extra("qos")


def test_dry_run_prints_commands_and_the_sbatch_script_and_runs_nothing(tmp_path):
    grid = tiny_grid(tmp_path / "tiny.toml", "/nonexistent/data.hdf5")
    out = run_sweep(grid, "--dry-run", "--cluster", "slurm", "--partition", "gpu", "--gpus-per-run", 1,
                    "--time-min", 600, "--array-parallelism", 2, "--sbatch-extra", "--qos=high --exclusive",
                    "--setup", "source .venv/bin/activate", "--work-dir", tmp_path).stdout
    commands = [l for l in out.splitlines() if "OMP_NUM_THREADS=1" in l]
    assert len(commands) == 4 and sum("dbp_bc.py" in l for l in commands) == 2
    assert all("--threads 1" in l and "--exp-name tiny_" in l for l in commands)
    for flag in ("#SBATCH --array=0-3%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=600", "#SBATCH --signal=USR1@120", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "export SUBMITIT_PREEMPT_SIGNAL=USR1", "source .venv/bin/activate", "submitit.core._submit"):
        assert flag in out, flag
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written
    flags_grid = run_sweep("--script", "dbp_bc.py", "--env-ids", "lift", "can", "--seeds", 1, 2, "--flags",
                           "--total-steps 100", "--dry-run", "--work-dir", tmp_path).stdout
    lines = [l for l in flags_grid.splitlines() if not l.startswith("#")]
    assert len(lines) == 4 and all(l.endswith("--threads 1 --total-steps 100") for l in lines)


# ----------------------------------------------------------------------------------------------
# Local runs
# ----------------------------------------------------------------------------------------------
def test_local_tiny_grid_runs_collects_and_skips_finished(tmp_path, robomimic_lift_file):
    grid = tiny_grid(tmp_path / "tiny.toml", robomimic_lift_file)  # the Slurm test's grid
    t0 = time.time()
    out = run_sweep(grid, "--jobs", 2, "--work-dir", tmp_path).stdout
    print(f"local tiny grid: {time.time() - t0:.0f} s")
    header, rows = read_csv(tmp_path / "runs" / "sweeps" / "tiny" / "results.csv")
    assert header == sweep.FIELDS
    check_collected(str(tmp_path), rows)
    assert "| lift | dbp | 2/2 |" in out and "| lift | dfp | 2/2 |" in out
    again = run_sweep(grid, "--jobs", 2, "--work-dir", tmp_path)  # finished runs are skipped, not repeated
    assert again.stdout.count(": finished (0 s)") == 4
    assert read_csv(tmp_path / "runs" / "sweeps" / "tiny" / "results.csv")[1] == rows
    run_sweep(grid, "--collect", tmp_path / "c.csv", "--work-dir", tmp_path)
    assert read_csv(tmp_path / "c.csv") == (header, rows)


def marked_processes(marker):
    """pids of live processes whose environment holds marker (every descendant of the runner inherits it)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as s:
                        if s.read().split(")")[-1].split()[0] != "Z":
                            pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_killing_the_local_runner_ends_its_runs(tmp_path, robomimic_lift_file):
    marker = f"SWEEP_TEST_{uuid.uuid4().hex}"
    flags = (f"--dataset-path {robomimic_lift_file} --total-steps 100000 --eval-every 100000 --eval-episodes 1 "
             f"--final-eval-episodes 1 --num-eval-envs 1 --batch-size 8 --hidden-dims 16 16")
    cmd = [sys.executable, SWEEP, "--script", "dbp_bc.py", "--env-ids", "lift", "--seeds", "1", "2", "--flags", flags,
           "--name", "kill", "--jobs", "2", "--work-dir", str(tmp_path)]
    runner = subprocess.Popen(cmd, env={**os.environ, marker: "1", "DRIFT_PROGRESS_SECONDS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = tmp_path / "runs" / "sweeps" / "kill" / "logs"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # both runs are training
            if logs.exists() and len([f for f in logs.iterdir() if "steps/s (training)" in f.read_text()]) == 2:
                break
            assert runner.poll() is None, runner.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the runs did not start training within 120 s")
        assert len(marked_processes(marker)) >= 3  # the runner and its two runs (and their env workers)
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=150)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM: stopping 2 run(s)" in out
    time.sleep(0.5)
    assert marked_processes(marker) == [], "a run outlived the runner"
    for log in logs.iterdir():  # each run wrote its checkpoint on the way out ...
        assert "SIGTERM: checkpoint written at step" in log.read_text(), log.read_text()[-2000:]
    dry = run_sweep("--script", "dbp_bc.py", "--env-ids", "lift", "--seeds", 1, 2, "--flags", flags, "--name", "kill",
                    "--work-dir", tmp_path, "--dry-run").stdout
    assert "2 to resume" in dry and dry.count("dbp_bc.py --resume ") == 2  # ... and the next call resumes it


# ----------------------------------------------------------------------------------------------
# A real Slurm: slurmctld + slurmd on this machine
# ----------------------------------------------------------------------------------------------
def _free_port_pair():
    for _ in range(50):
        port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
        socks = []
        try:
            for p in (port, port + 1):
                s = socket.socket()
                s.bind(("", p))
                socks.append(s)
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """SLURM_CONF of a running single-node cluster: the one .ci/run started (SLURM_CONF set and sinfo answers),
    else one started here from tests/slurm/start_slurm.sh and stopped afterwards. Fails, naming what is missing,
    if Slurm cannot start: this test never passes without a real Slurm."""
    conf = os.environ.get("SLURM_CONF")
    if conf and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
        yield conf
        return
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm is not installed: {', '.join(missing)} not found. Install it with "
                    f"`apt-get update && apt-get install -y slurm-wlm munge` (as .ci/run does).")
    folder = str(tmp_path_factory.mktemp("slurm"))
    start = subprocess.run([os.path.join(ROOT, "tests", "slurm", "start_slurm.sh"), folder], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "SLURM_TEST_PORT": str(_free_port_pair())})
    if start.returncode != 0:
        subprocess.run([os.path.join(ROOT, "tests", "slurm", "stop_slurm.sh"), folder])
        pytest.fail(f"Slurm did not start: {start.stderr.strip() or start.stdout.strip()}")
    try:
        yield os.path.join(folder, "slurm.conf")
    finally:
        subprocess.run([os.path.join(ROOT, "tests", "slurm", "stop_slurm.sh"), folder], timeout=60)


def squeue(env, array):
    out = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i %t %r"], capture_output=True, text=True, env=env)
    return [line.split() for line in out.stdout.splitlines()] if out.returncode == 0 else []


def test_slurm_tiny_grid_with_a_preempted_job(tmp_path, robomimic_lift_file, slurm):
    env = {**os.environ, "SLURM_CONF": slurm, "DRIFT_PROGRESS_SECONDS": "1"}
    grid = tiny_grid(tmp_path / "tiny.toml", robomimic_lift_file)
    t0 = time.time()
    out = run_sweep(grid, "--cluster", "slurm", "--cpus-per-run", 1, "--time-min", 30, "--work-dir", tmp_path,
                    env=env).stdout
    assert "4 to submit" in out and "submitted array" in out, out
    jobs = json.load(open(tmp_path / "runs" / "sweeps" / "tiny" / "jobs.json"))
    cells = {(c.method, c.seed): c for c in sweep.load_grid(grid)[1]}
    victim = cells[("dbp", 1)]
    array = jobs[victim.key].split("_")[0]
    log = tmp_path / "runs" / "sweeps" / "tiny" / "logs" / f"{victim.key}.log"
    deadline = time.time() + 240
    while not (log.exists() and "steps/s (training)" in log.read_text()):  # the victim is training: preempt it
        assert time.time() < deadline, f"{victim.key} did not start training: {squeue(env, array)}"
        time.sleep(0.5)
    # (scancel may exit non-zero here although the signal arrived, as the job is requeued meanwhile: the
    # checks below are on what the job did.)
    cancel = subprocess.run(["scancel", "--signal=USR1", jobs[victim.key]], capture_output=True, text=True, env=env)
    requeued = False
    while squeue(env, array):  # Slurm holds a requeued job for ~2 minutes (BeginTime): release it at once
        assert time.time() < deadline + 120, f"the array did not end: {squeue(env, array)}"
        for job_id, state, reason in squeue(env, array):
            if state == "PD" and reason == "BeginTime":
                requeued = True
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env)
        time.sleep(1)
    wall = time.time() - t0
    assert requeued, f"the preempted job was not requeued (scancel: {cancel.returncode} {cancel.stderr})"
    collected = tmp_path / "slurm.csv"
    run_sweep(grid, "--collect", collected, "--work-dir", tmp_path, env=env)
    header, rows = read_csv(collected)
    assert header == sweep.FIELDS  # the local runner's layout
    check_collected(str(tmp_path), rows)
    text = log.read_text()
    assert "checkpoint written at step" in text, text[-3000:]
    at = int(text.split("checkpoint written at step ")[1].split(";")[0])
    assert 0 < at < DBP_STEPS and f"from step {at}\n" in text and "restart 1" in text, text[-3000:]
    assert text.count("--resume ") >= 2  # the printed hint, and the requeued task's command
    dirs = [d for d in os.listdir(tmp_path / "runs") if d.startswith(victim.key + "__")]
    assert len(dirs) == 1  # it continued in its own run dir
    steps = {(r["method"], r["seed"]): int(r["steps"]) for r in rows}
    assert steps[("dbp", "1")] == steps[("dbp", "2")] == DBP_STEPS  # the same step count as the uninterrupted run
    again = run_sweep(grid, "--cluster", "slurm", "--cpus-per-run", 1, "--work-dir", tmp_path, env=env).stdout
    assert "4 finished, 0 still queued or running, 0 to submit" in again, again
    print(f"slurm grid with one preemption: {wall:.0f} s")


# ----------------------------------------------------------------------------------------------
# benchmarks/offline_to_online.py: the DFP comparison grid, through the runner (DFP only: no baseline needed)
# ----------------------------------------------------------------------------------------------
def table_row(table, data, method, runs):
    """Whether the benchmark's table has a line for this data and method with this many finished runs."""
    return any(l.startswith(f"| lift | {data} |") and f"| {method} | {runs} |" in l for l in table.splitlines())


def test_offline_to_online_table_never_pools_other_data_or_flags():
    import offline_to_online as o2o

    base = dict(task="square", data="200 demos", method="dfp", seed="1", switch_success="0.4", final_success="0.2",
                gain="-0.2", final_episodes="100", steps="25000", returncode="0")  # a CSV row written before flags
    old = [base, {**base, "extra_flags": "", "seed": "2", "switch_success": "0.5", "final_success": "0.4"}]
    longer = {**base, "extra_flags": "--online-steps 20000", "steps": "35000", "final_success": "0.6"}
    rows = o2o.merge(old, [longer])
    assert rows == old + [longer]  # the same method and seed with other flags: beside seed 1's row, not instead
    rows = o2o.merge(rows, [{**longer, "final_success": "0.7"}])  # the same setting, method and seed: replaced
    assert len(rows) == 3 and rows[-1]["final_success"] == "0.7"
    rows = o2o.merge(rows, [{**base, "data": "50 demos"}])  # other data: beside
    assert len(rows) == 4
    table = o2o.summarize(rows)
    assert "| square | 200 demos | - | dfp | 2 | 0.450 +- 0.050 | 0.300 +- 0.100 |" in table
    assert "| square | 200 demos | --online-steps 20000 | dfp | 1 | 0.400 +- 0.000 | 0.700 +- 0.000 |" in table
    assert "| square | 50 demos | - | dfp | 1 | 0.400 +- 0.000 | 0.200 +- 0.000 |" in table
    # methods in a fixed order within a setting, whatever order their runs finished in
    mixed = [{**base, "method": m} for m in ("fql", "my-method", "qc-fql", "dfp-no-topk", "dfp")]
    assert o2o.methods_of(mixed, o2o.setting(base)) == ["dfp", "dfp-no-topk", "qc-fql", "fql", "my-method"]
    lines = [line for line in o2o.summarize(mixed).splitlines() if line.startswith("| square")]
    assert [line.split(" | ")[3] for line in lines] == ["dfp", "dfp-no-topk", "qc-fql", "fql", "my-method"]
    # final, pooled: the final evaluation (100 episodes) and the periodic one at the last step (50), the same weights
    ends = [{**base, "curve": "20000:0.5 25000:0.6", "last_eval_episodes": "50", "final_success": f}
            for f in ("0.48", "0.54")]
    assert o2o.pooled(ends[0]) == pytest.approx((50 * 0.6 + 100 * 0.48) / 150)
    assert "| dfp | 2 | 0.400 +- 0.000 | 0.510 +- 0.030 | 0.540 +- 0.020 |" in o2o.summarize(ends)
    no_last = {**ends[1], "curve": "20000:0.5"}  # no evaluation at the last step: no pooled estimate for the method
    assert math.isnan(o2o.pooled(no_last)) and "| 0.510 +- 0.030 | - |" in o2o.summarize([ends[0], no_last])


def test_offline_to_online_benchmark_writes_csv_table_curves_and_resumes(tmp_path, robomimic_lift_file):
    script = os.path.join(ROOT, "benchmarks", "offline_to_online.py")
    results = tmp_path / "results"
    tiny = [sys.executable, script, "--tasks", "lift", "--methods", "dfp", "--seeds", "1", "2", "--dataset-path",
            robomimic_lift_file, "--extra-flags", "--offline-steps 30 --online-steps 40 --start-training 10 "
            "--eval-every 20 --eval-episodes 1 --final-eval-episodes 1 --num-eval-envs 1 --batch-size 16 "
            "--hidden-dims 32 32 --gen-per-obs 4 --pool-size 4", "--work-dir", str(tmp_path), "--results-dir",
            str(results), "--jobs", "2"]

    def run(cmd):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    dry = run([*tiny, "--dry-run"])
    assert dry.count("dfp_offline_to_online.py --env-id lift") == 2 and "--preset cpu" in dry
    run(tiny)
    header, rows = read_csv(results / "offline_to_online.csv")
    assert [(r["task"], r["method"], r["seed"], r["returncode"]) for r in rows] == [("lift", "dfp", "1", "0"),
                                                                                   ("lift", "dfp", "2", "0")]
    for r in rows:
        assert 0 <= float(r["switch_success"]) <= 1 and 0 <= float(r["final_success"]) <= 1
        assert (r["steps"], r["offline_steps"], r["final_episodes"], r["last_eval_episodes"]) == ("70", "30", "1", "1")
        assert float(r["gain"]) == pytest.approx(float(r["final_success"]) - float(r["switch_success"]))
    table = (results / "offline_to_online.md").read_text()
    assert table_row(table, robomimic_lift_file, "dfp", 2)  # the data is named in the table
    assert (results / "offline_to_online.png").stat().st_size > 1000
    again = run(tiny)  # resumes: nothing to run, the same rows
    assert again.count(": finished (0 s)") == 2 and read_csv(results / "offline_to_online.csv")[1] == rows
    for r in rows:  # the CSV keeps each run's curve: the periodic evaluations (--eval-every 20), and the switch at 30
        assert [int(p.split(":")[0]) for p in r["curve"].split()] == [20, 30, 40, 60]
    other_data = str(tmp_path / "other_lift.hdf5")  # the same method and seed on other data: a row beside, not instead
    shutil.copy(robomimic_lift_file, other_data)
    seeds = tiny.index("--seeds")
    run([*tiny[:seeds], "--seeds", "1", *[other_data if a == robomimic_lift_file else a for a in tiny[seeds + 3:]]])
    rows = read_csv(results / "offline_to_online.csv")[1]
    assert [(r["seed"], r["data"]) for r in rows] == [("1", robomimic_lift_file), ("2", robomimic_lift_file),
                                                      ("1", other_data)]
    table = (results / "offline_to_online.md").read_text()
    assert table_row(table, robomimic_lift_file, "dfp", 2) and table_row(table, other_data, "dfp", 1)
    os.remove(results / "offline_to_online.png")
    shutil.rmtree(tmp_path / "runs")  # runs of another machine: the table and the curves come from the CSV alone
    out = run([sys.executable, script, "--plot-only", "--results-dir", str(results), "--work-dir", str(tmp_path)])
    assert table_row(out, other_data, "dfp", 1) and (results / "offline_to_online.png").stat().st_size > 1000
    assert read_csv(results / "offline_to_online.csv")[1] == rows


def test_offline_to_online_csv_merge_waits_for_a_writer_in_another_call(tmp_path):
    import fcntl
    import threading
    import types

    import offline_to_online as o2o

    results = tmp_path / "results"
    results.mkdir()
    args = types.SimpleNamespace(results_dir=str(results), launch=types.SimpleNamespace(work_dir=str(tmp_path)))
    row = lambda seed: dict(task="lift", data="d", method="dfp", seed=str(seed), switch_success="0.1",
                            final_success="0.2", gain="0.1", final_episodes="100", steps="70", returncode="0")
    other = os.open(results, os.O_RDONLY)  # another call of the benchmark, between its read and its write
    fcntl.flock(other, fcntl.LOCK_EX)
    this = threading.Thread(target=o2o.merge_into_csv, args=([row(2)], args))
    this.start()
    time.sleep(0.5)
    o2o.write_csv([row(1)], str(results / "offline_to_online.csv"))  # the other call's write
    os.close(other)
    this.join(120)
    assert [r["seed"] for r in read_csv(results / "offline_to_online.csv")[1]] == ["1", "2"]  # neither row lost
