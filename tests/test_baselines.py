"""baselines/diffusion_bc.py: noise schedule, DDIM / DDPM steps (exact x_0 recovery, the DDPM posterior), the
explicit-noise contract, a two-mode toy, a smoke run + reload, robot_deploy.py's backends; the two benchmark
scripts (benchmarks/inference_speed.py, benchmarks/quality.py) end to end at a tiny budget."""

import csv
import glob
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import dbp_bc
from baselines import diffusion_bc as dbc
from tests.conftest import ROOT


def run(cmd, cwd=None):
    """Run a script with one torch thread (as the tests); its output is shown if it fails."""
    out = subprocess.run(cmd, cwd=cwd, timeout=600, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_schedule_is_squared_cosine():
    T = 100
    abar = dbc.squared_cosine_alphas_cumprod(T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    closed = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)  # abar_t = f(t + 1) / f(0)
    torch.testing.assert_close(abar[:-1], closed[:-1], rtol=1e-12, atol=0)
    assert abar[-1].item() == pytest.approx(abar[-2].item() * (1 - 0.999), rel=1e-12)  # f(T) = 0: beta capped
    assert (abar[1:] < abar[:-1]).all() and 0.999 < abar[0] < 1


def test_inference_timesteps_trailing():
    assert dbc.inference_timesteps(100, 100) == list(range(99, -1, -1))
    assert dbc.inference_timesteps(100, 10) == list(range(99, 0, -10))
    assert dbc.inference_timesteps(100, 1) == [99]  # one step starts at the noisiest timestep, not at t = 0


class PerfectEps(nn.Module):
    """The noise predictor that knows x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""

    def __init__(self, x0, abar):
        super().__init__()
        self.x0, self.abar = x0, torch.tensor(abar, dtype=x0.dtype)

    def forward(self, x, t, cond):
        a = self.abar[t.long()][:, None, None]
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler,k", [("ddim", 1), ("ddim", 10), ("ddim", 100), ("ddpm", 100), ("ddpm", 7)])
def test_sampler_recovers_x0_with_a_perfect_noise_predictor(sampler, k):
    policy = dbc.DiffusionPolicy(3, 2, 1, 4, 4, hidden_dims=(8,), sampler=sampler, inference_steps=k).double()
    x0 = torch.rand(5, 4, 2, dtype=torch.float64) * 1.8 - 0.9  # inside the clip range
    policy.net = PerfectEps(x0, policy.alphas_cumprod)
    z = torch.randn(5, *policy.noise_shape, dtype=torch.float64)
    torch.testing.assert_close(policy.sample(torch.zeros(5, 1, 3, dtype=torch.float64), z), x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("t,t_prev", [(50, 49), (1, 0), (0, -1), (99, 89), (9, -1)])
def test_denoise_step_is_the_ddpm_posterior_and_the_ddim_update(t, t_prev):
    abar = dbc.squared_cosine_alphas_cumprod(100).tolist()
    a_t, a_prev = abar[t], abar[t_prev] if t_prev >= 0 else 1.0
    g = torch.Generator().manual_seed(t)
    eps, noise = (torch.randn(64, 4, 2, dtype=torch.float64, generator=g) for _ in range(2))
    x0_pred = torch.rand(64, 4, 2, dtype=torch.float64, generator=g) * 3 - 1.5  # partly outside [-1, 1]
    x = math.sqrt(a_t) * x0_pred + math.sqrt(1 - a_t) * eps  # so that eps predicts x0_pred
    x0 = x0_pred.clamp(-1, 1)  # clipped: the posterior uses this x_0
    assert (x0.abs() == 1).any() and (x0.abs() < 1).any()
    # DDPM posterior q(x_prev | x_t, x_0) of the (strided) step: beta = 1 - abar_t / abar_prev.
    beta = 1 - a_t / a_prev
    mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    var = (1 - a_prev) / (1 - a_t) * beta
    torch.testing.assert_close(dbc.denoise_step(x, eps, a_t, a_prev, noise), mean + math.sqrt(var) * noise)
    # DDIM (eta = 0): the point at abar_prev on the line through x_0 and the noise consistent with x_t.
    eps_clipped = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    torch.testing.assert_close(dbc.denoise_step(x, eps, a_t, a_prev),
                               math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps_clipped)


def test_diffusion_covers_both_modes_of_a_toy():
    """One state, two equally likely actions (-0.6, 0) and (+0.6, 0), as tests/test_dbp.py; the script's loss."""
    torch.manual_seed(0)
    modes, state, B = torch.tensor([[-0.6, 0.0], [0.6, 0.0]]), torch.ones(1, 2), 64
    policy = dbc.DiffusionPolicy(2, 2, 1, 1, 1, hidden_dims=(64, 64), time_dim=16)
    policy.set_normalizer(np.array([[0.0, 0.0], [2.0, 2.0]]), np.array([[-1.0, -1.0], [1.0, 1.0]]))
    opt = torch.optim.Adam(policy.parameters(), lr=2e-3)
    abar = torch.tensor(policy.alphas_cumprod, dtype=torch.float32)
    for _ in range(600):
        x0 = policy.normalize_action(modes[torch.randint(2, (B,))] + 0.03 * torch.randn(B, 2)).view(B, 1, 2)
        t, noise = torch.randint(100, (B,)), torch.randn(B, 1, 2)
        a = abar[t][:, None, None]
        eps = policy.net(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, policy.normalize_obs(state.expand(B, 2)))
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for sampler, k in (("ddpm", 100), ("ddim", 10)):
        sampling = dbc.DiffusionPolicy(2, 2, 1, 1, 1, hidden_dims=(64, 64), time_dim=16, sampler=sampler,
                                       inference_steps=k)
        sampling.load_state_dict(policy.state_dict())
        with torch.no_grad():
            z = torch.randn(2000, *sampling.noise_shape)
            samples = sampling(state.expand(2000, 2).view(2000, 1, 2), z).view(2000, 2)
        left = ((samples - torch.tensor([-0.6, 0.0])).norm(dim=1) < 0.2).float().mean()
        right = ((samples - torch.tensor([0.6, 0.0])).norm(dim=1) < 0.2).float().mean()
        gap = (samples[:, 0].abs() < 0.3).float().mean()
        assert left > 0.25 and right > 0.25 and gap < 0.2, (sampler, left, right, gap)


@pytest.mark.parametrize("sampler,k,shape", [("ddim", 10, (4, 7)), ("ddpm", 100, (100, 4, 7)), ("ddpm", 5, (5, 4, 7))])
def test_all_the_noise_is_z(sampler, k, shape):
    torch.manual_seed(0)
    policy = dbc.DiffusionPolicy(19, 7, 1, 4, 4, hidden_dims=(32, 32), sampler=sampler, inference_steps=k)
    assert policy.noise_shape == shape
    obs, z = np.random.rand(3, 19).astype(np.float32), np.random.randn(3, *shape).astype(np.float32)
    a = policy.act(obs, z)
    assert a.shape == (3, 4, 7) and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, policy.act(obs, z))  # no hidden randomness
    assert not np.allclose(a, policy.act(obs, -z))
    if sampler == "ddpm":  # every slice of z is used: x_T and one noise per step t > 0
        for j in (0, k - 1):
            z2 = z.copy()
            z2[:, j] += 1
            assert not np.allclose(a, policy.act(obs, z2)), j


def test_history_and_unet_shapes():
    policy = dbc.DiffusionPolicy(5, 3, 2, 8, 4, backbone="unet", unet_dims=(8, 16), sampler="ddim", inference_steps=3)
    assert policy.act(np.random.rand(4, 2, 5), np.random.randn(4, 8, 3)).shape == (4, 7, 3)  # H - To + 1 steps


def test_sequence_indices_is_dbp_bc_s():
    assert inspect.getsource(dbc.sequence_indices) == inspect.getsource(dbp_bc.sequence_indices)


def test_smoke_run_and_reload(tmp_path, robomimic_lift_file):
    script = os.path.join(ROOT, "baselines", "diffusion_bc.py")
    cmd = [sys.executable, script, "--env-id", "lift", "--dataset-path", robomimic_lift_file, "--total-steps", "30",
           "--eval-every", "30", "--eval-episodes", "2", "--final-eval-episodes", "2", "--batch-size", "16",
           "--hidden-dims", "32", "32", "--sampler", "ddpm", "--inference-steps", "10", "--max-episode-steps", "60"]
    out = run(cmd, cwd=tmp_path)
    assert "final checkpoint: success" in out and "best checkpoint: success" in out, out
    run_dir, = glob.glob(str(tmp_path / "runs" / "lift__diffusion_bc__1__*"))
    path = os.path.join(run_dir, "diffusion.pt")
    policy = common.load_policy(path)
    assert isinstance(policy, dbc.DiffusionPolicy) and policy.noise_shape == (10, 4, 7)
    obs, z = np.random.rand(3, 19).astype(np.float32), np.random.randn(3, 10, 4, 7).astype(np.float32)
    a1 = policy.act(obs, z)
    assert a1.shape == (3, 4, 7) and np.abs(a1).max() <= 1.0
    np.testing.assert_array_equal(a1, common.load_policy(path).act(obs, z))  # the same action from the file alone
    assert policy.act(obs[0]).shape == (4, 7)
    ddim = common.load_policy(path, sampler="ddim", inference_steps=2)  # another sampler, the same weights
    assert ddim.noise_shape == (4, 7) and ddim.act(obs, z[:, 0]).shape == (3, 4, 7)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 30 and ckpt["policy_module"] == "baselines.diffusion_bc" and ckpt["env_id"] == "lift"
    # --resume rebuilds Args from the checkpoint (the rest of the resume path is dbp_bc.py's, tested in test_dbp.py).
    args = dbc.Args(**ckpt["args"])
    assert (args.sampler, args.inference_steps, args.hidden_dims, args.total_steps) == ("ddpm", 10, (32, 32), 30)


def test_inference_speed_benchmark(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "inference_speed.py")
    tiny = ["--repeats", "2", "--warmup", "1", "--results-dir", str(tmp_path)]
    out = run([sys.executable, script, "--hidden-dims", "16", "--batch-sizes", "1", "2", *tiny])
    assert "100-step DDPM / DBP" in out
    run([sys.executable, script, "--backbone", "unet", "--unet-dims", "8", "16", "--batch-sizes", "1", *tiny])
    with open(tmp_path / "inference_speed.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["backbone"] for r in rows} == {"mlp", "unet"}  # the second run kept the first's rows
    assert {r["method"] for r in rows} == {"DBP", "DDPM 100", "DDIM 10", "DDIM 1"}
    assert all(float(r["p50_ms"]) > 0 for r in rows)
    assert (tmp_path / "inference_speed.png").stat().st_size > 0


def test_quality_benchmark(tmp_path, robomimic_lift_file):
    script = os.path.join(ROOT, "benchmarks", "quality.py")
    commands = [line for line in run([sys.executable, script, "--dry-run"]).splitlines() if not line.startswith("#")]
    assert len(commands) == 2 * 4 * 3  # tasks x methods x seeds
    for line in commands:  # the same budget for every method
        assert "--total-steps 20000 --batch-size 256 --backbone mlp --hidden-dims 256 256 256" in line
        assert "--eval-episodes 50 --final-eval-episodes 50" in line
    assert sum("--sampler ddpm --inference-steps 100" in c for c in commands) == 6
    assert sum("--sampler ddim --inference-steps 10" in c for c in commands) == 6
    assert sum("--loss mse" in c for c in commands) == 6
    # One real tiny run (dbp_bc.py: test_smoke_run_and_reload has run diffusion_bc.py; both print the same lines).
    results = tmp_path / "results"
    tiny = [sys.executable, script, "--tasks", "lift", "--methods", "dbp", "--seeds", "1",
            "--total-steps", "20", "--eval-every", "20", "--eval-episodes", "2", "--batch-size", "8",
            "--hidden-dims", "16", "16", "--dataset-path", robomimic_lift_file, "--work-dir", str(tmp_path),
            "--results-dir", str(results)]
    run(tiny)
    with open(results / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    r, = rows
    assert (r["task"], r["method"], r["seed"], r["returncode"], r["episodes"]) == ("lift", "dbp", "1", "0", "2")
    assert 0 <= float(r["final_success"]) <= 1 and 0 <= float(r["best_success"]) <= 1 and float(r["wall_s"]) > 0
    assert glob.glob(str(tmp_path / r["run_dir"] / "dbp.pt"))
    # The same command again resumes: the finished run is kept, not repeated.
    out = run(tiny)
    assert "resuming: 1 finished run(s) kept" in out and "0 to run" in out
    with open(results / "quality.csv") as f:
        assert list(csv.DictReader(f)) == rows
    # Another method's run adds its row and leaves the finished one as it was.
    run([*tiny[:tiny.index("--methods") + 1], "mse", *tiny[tiny.index("--methods") + 2:]])
    with open(results / "quality.csv") as f:
        both = list(csv.DictReader(f))
    assert both[0] == r and [x["method"] for x in both] == ["dbp", "mse"]
    summary = (results / "quality_summary.md").read_text()  # the summary covers the whole CSV, not this call
    assert "| lift | dbp | 1 |" in summary and "| lift | mse | 1 |" in summary
    os.remove(results / "quality.png")
    out = run([sys.executable, script, "--plot-only", "--results-dir", str(results)])
    assert "| lift | dbp | 1 |" in out and (results / "quality.png").exists()


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_robot_deploy_backends_match_eager(tmp_path, backend):
    """robot_deploy.py exports forward(obs, z): the same z gives the same chunk in every backend."""
    import robot_deploy as rd

    torch.manual_seed(0)
    kw = dict(obs_dim=19, action_dim=7, n_obs_steps=2, horizon=8, n_action_steps=4, backbone="unet", unet_dims=(8, 16),
              sampler="ddpm", inference_steps=3)
    policy = dbc.DiffusionPolicy(**kw)
    policy.set_normalizer(np.random.uniform(-1, 2, (100, 19)), np.random.uniform(-0.9, 0.9, (100, 7)))
    path = str(tmp_path / "diffusion.pt")
    common.save_checkpoint(path, dict(policy_module="baselines.diffusion_bc", policy_kwargs=kw, env_id="lift", args={},
                                      run_name="test", step=0, model=policy.state_dict(), ema_model=policy.state_dict()))
    policy = common.load_policy(path)
    assert rd.check_parity(policy, rd.make_backend(policy, backend, str(tmp_path)), tol=1e-5) <= 1e-5
