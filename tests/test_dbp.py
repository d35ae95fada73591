"""dbp_bc.py: multimodal toy (DBP covers both modes, MSE collapses), sequence indexing, smoke run + reload."""

import glob
import os
import subprocess
import sys

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common
from dbp_bc import DriftPolicy, drift_loss, sequence_indices
from tests.conftest import ROOT


def train_toy(loss_type, steps=600, seed=0):
    """One state, two equally likely actions (-0.6, 0) and (+0.6, 0). Returns 2000 policy samples."""
    torch.manual_seed(seed)
    modes = torch.tensor([[-0.6, 0.0], [0.6, 0.0]])
    state = torch.ones(1, 2)
    policy = DriftPolicy(obs_dim=2, action_dim=2, n_obs_steps=1, horizon=1, n_action_steps=1,
                         hidden_dims=(64, 64), zero_noise=loss_type == "mse")
    policy.set_normalizer(np.array([[0.0, 0.0], [2.0, 2.0]]), np.array([[-1.0, -1.0], [1.0, 1.0]]))
    opt = torch.optim.Adam(policy.parameters(), lr=2e-3)
    B, G = 64, 8
    for _ in range(steps):
        demo = modes[torch.randint(2, (B,))] + 0.03 * torch.randn(B, 2)  # [B, Da]: each group's own demo
        obs_n = policy.normalize_obs(state.expand(B, 2)).view(B, 1, 2)
        if loss_type == "drift":
            gen = policy.generate(obs_n.repeat_interleave(G, 0), torch.randn(B * G, 1, 2)).view(B, G, 2)
            loss = drift_loss(gen, policy.normalize_action(demo).view(B, 1, 2), temperatures=(0.02, 0.05, 0.2))[0].mean()
        else:
            loss = ((policy.generate(obs_n, torch.zeros(B, 1, 2)).view(B, 2) - policy.normalize_action(demo)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return policy(state.expand(2000, 2).view(2000, 1, 2), torch.randn(2000, 1, 2)).view(2000, 2)


def test_dbp_covers_both_modes_and_mse_collapses_to_the_gap():
    samples = train_toy("drift")
    left = ((samples - torch.tensor([-0.6, 0.0])).norm(dim=1) < 0.2).float().mean()
    right = ((samples - torch.tensor([0.6, 0.0])).norm(dim=1) < 0.2).float().mean()
    gap = (samples[:, 0].abs() < 0.3).float().mean()
    assert left > 0.3 and right > 0.3, (left, right)
    assert gap < 0.1, gap
    mse = train_toy("mse")
    assert (mse[:, 0].abs() < 0.15).all(), mse[:3]  # the conditional mean: between the modes, where no demo is


def test_sequence_indices_clamp_to_episode():
    terminals = np.array([0, 0, 1, 0, 1])  # episodes [0, 1, 2] and [3, 4]
    obs_idx, act_idx = sequence_indices(terminals, n_obs_steps=2, horizon=3)
    np.testing.assert_array_equal(obs_idx, [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4]])
    np.testing.assert_array_equal(act_idx, [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 4], [3, 4, 4]])


def test_unet_chunks_take_the_training_steps_grouped_view():
    """dbp_bc.py views the B*G generated chunks as [B, G, H*Da]; the U-Net's channel transpose must not break that."""
    B, G, H, Da = 3, 4, 8, 7
    policy = DriftPolicy(19, Da, 2, H, 4, backbone="unet", unet_dims=(8, 16))
    gen = policy.generate(torch.randn(B * G, 2, 19), torch.randn(B * G, H, Da)).view(B, G, H * Da)
    drift_loss(gen, torch.randn(B, 1, H * Da))[0].mean().backward()
    assert all(p.grad is not None for p in policy.parameters())


def test_smoke_run_resume_and_reload(tmp_path, robomimic_lift_file):
    cmd = [sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--env-id", "lift", "--dataset-path", robomimic_lift_file,
           "--total-steps", "40", "--eval-every", "20", "--eval-episodes", "2", "--final-eval-episodes", "2",
           "--batch-size", "16", "--hidden-dims", "32", "32", "--max-episode-steps", "60"]
    subprocess.run(cmd, cwd=tmp_path, check=True, timeout=600)
    run_dir, = glob.glob(str(tmp_path / "runs" / "lift__dbp_bc__1__*"))
    events = EventAccumulator(run_dir).Reload()  # the untrained policy's episodes run to the 60-step limit
    assert [e.value for e in events.Scalars("eval/length")] == [60.0, 60.0]
    policy = common.load_policy(os.path.join(run_dir, "dbp.pt"))
    obs, z = np.random.rand(3, 19).astype(np.float32), np.random.randn(3, 4, 7).astype(np.float32)
    a1, a2 = policy.act(obs, z), common.load_policy(os.path.join(run_dir, "dbp.pt")).act(obs, z)
    assert a1.shape == (3, 4, 7) and np.abs(a1).max() <= 1.0
    np.testing.assert_array_equal(a1, a2)  # same observation and z -> the same action, from the file alone
    assert policy.act(obs[0]).shape == (4, 7)  # a single observation
    assert not np.allclose(policy.act(obs, z), policy.act(obs, -z))  # the noise matters: a generative policy
    ckpt = torch.load(os.path.join(run_dir, "dbp.pt"), weights_only=True)
    assert ckpt["step"] == 40 and ckpt["env_id"] == "lift"
    # Resume: continue the same run to 60 steps (a longer budget given with --resume is applied).
    subprocess.run([sys.executable, os.path.join(ROOT, "dbp_bc.py"), "--resume", os.path.join(run_dir, "dbp.pt"),
                    "--total-steps", "60"], cwd=tmp_path, check=True, timeout=600)
    assert torch.load(os.path.join(run_dir, "dbp.pt"), weights_only=True)["step"] == 60
