"""Every benchmark script runs end to end at a tiny budget and prints its figures, so none of them rots.
(benchmarks/inference_speed.py and benchmarks/quality.py are covered in test_baselines.py.)"""

import csv
import os
import subprocess
import sys

from tests.conftest import ROOT


def run(script, *args, cwd=None):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, check=True, capture_output=True, text=True, timeout=600).stdout


def test_dbp_speed_prints_steps_per_second_and_the_loss_share():
    out = run("dbp_speed.py", "--steps", 3, "--threads", 1)
    assert "steps/s" in out and "drifting loss" in out, out


def test_dfp_speed_prints_ms_per_offline_and_online_update():
    out = run("dfp_speed.py", "--steps", 1, "--hidden-dims", 32, 32, "--batch-size", 16, "--threads", 1)
    assert "offline" in out and "online" in out and "ms" in out, out


def test_deploy_latency_writes_its_table(tmp_path):
    out_csv = tmp_path / "latency.csv"
    run("deploy_latency.py", "--backends", "eager", "--calls", 20, "--loop-seconds", 0.3, "--server-requests", 20,
        "--out", out_csv)
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 1 and rows[0]["backend"] == "eager" and float(rows[0]["call_p50_us"]) > 0
    assert float(rows[0]["floor_p99_us"]) > 0  # the no-network floor, measured once and written with each row


def test_dfp_paper_commands_cover_the_12_tasks_times_seeds():
    lines = [l for l in run("dfp_paper_commands.py", "--seeds", 2).splitlines() if "dfp_offline_to_online.py" in l]
    assert len(lines) == 24 and all("--seed" in l for l in lines)


def test_plot_runs_reads_tensorboard_and_regenerates_from_csv(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    runs = []
    for name, values in (("a", [0.1, 0.5]), ("b", [0.2, 0.3])):
        writer = SummaryWriter(str(tmp_path / name))
        for step, v in zip((100, 200), values):
            writer.add_scalar("eval/success_rate", v, step)
        writer.close()
        runs.append(tmp_path / name)
    png = tmp_path / "curves.png"
    run("plot_runs.py", "--runs", *runs, "--labels", "A", "B", "--switch", 150, "--out", png)
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [(r["label"], int(r["step"]), round(float(r["value"]), 6)) for r in rows] == \
        [("A", 100, 0.1), ("A", 200, 0.5), ("B", 100, 0.2), ("B", 200, 0.3)]
    os.remove(png)
    run("plot_runs.py", "--from-csv", "--out", png)
    assert png.stat().st_size > 1000
