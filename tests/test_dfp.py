"""dfp_offline_to_online.py: sequence sampler at episode ends, top-K, best-of-N, Polyak/EMA, smoke run + reload."""

import glob
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn

import common
import environments
import dfp_offline_to_online as dfp
from tests.conftest import ROOT


class FixedStarts:
    """An rng whose integers() returns chosen start indices."""

    def __init__(self, starts):
        self.starts = np.array(starts)

    def integers(self, low, high, size):
        assert (self.starts >= low).all() and (self.starts < high).all()
        return self.starts


def test_sequence_sampler_rewards_masks_and_valid_at_episode_ends():
    # Episode A: t = 0, 1, 2 (solved at 2: mask 0, terminal 1). Episode B: t = 3 .. 6 (timed out at 6).
    n = 7
    data = dict(observations=np.arange(n)[:, None] * np.ones((1, 2)), actions=np.arange(n)[:, None] * np.ones((1, 3)),
                rewards=np.arange(n, dtype=float), masks=np.array([1, 1, 0, 1, 1, 1, 1.0]),
                terminals=np.array([0, 0, 1, 0, 0, 0, 1.0]), next_observations=(np.arange(n)[:, None] + 1) * np.ones((1, 2)))
    buffer = dfp.ReplayBuffer(data, capacity=10)
    b = buffer.sample(4, horizon=3, discount=0.5, rng=FixedStarts([0, 1, 2, 3]))
    np.testing.assert_allclose(b["rewards"], [0 + 0.5 * 1 + 0.25 * 2, 1 + 0.5 * 2 + 0.25 * 3, 2 + 1.5 + 1, 3 + 2 + 1.25])
    np.testing.assert_array_equal(b["masks"], [0, 0, 0, 1])  # running min: solved inside the chunk -> no bootstrap
    np.testing.assert_array_equal(b["valid"], [1, 0, 0, 1])  # the episode ended before the chunk's last step
    np.testing.assert_array_equal(b["next_observations"][:, 0], [3, 4, 5, 6])  # s_{t+H}
    np.testing.assert_array_equal(b["actions"][1], [1, 1, 1, 2, 2, 2, 3, 3, 3])  # flattened chunk a_{t:t+H}
    buffer.add(observations=np.zeros(2), actions=np.zeros(3), rewards=-1.0, masks=1.0, terminals=0.0,
               next_observations=np.zeros(2))
    assert buffer.size == 8 and buffer.offline_size == 7


class IdentityActor(nn.Module):
    """chunk = eps, so the candidates are known."""

    def __init__(self, chunk_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, chunk_dim))

    def forward(self, obs, eps):
        return eps


class DistanceCritic(nn.Module):
    """Q(s, chunk) = -|chunk - 0.3|^2 for both ensemble members."""

    def forward(self, obs, chunk):
        q = -((chunk - 0.3) ** 2).sum(-1)
        return torch.stack([q, q])


def test_top_k_keeps_the_k_highest_q_chunks():
    actor, obs = IdentityActor(3), torch.zeros(5, 4)
    torch.manual_seed(0)
    eps = torch.randn(5, 16, 3)
    torch.manual_seed(0)
    got = dfp.top_k(actor, DistanceCritic(), obs, n=16, k=4)  # draws the same eps
    q = -((eps - 0.3) ** 2).sum(-1)
    want = torch.stack([eps[b, q[b].argsort(descending=True)[:4]] for b in range(5)])
    torch.testing.assert_close(got, want)


def test_best_of_n_picks_the_argmax_of_the_critic():
    obs, eps = torch.zeros(6, 4), torch.randn(6, 8, 3)
    got = dfp.best_of_n(IdentityActor(3), DistanceCritic(), obs, n=8, eps=eps)
    q = -((eps - 0.3) ** 2).sum(-1)
    torch.testing.assert_close(got, eps[torch.arange(6), q.argmax(1)])


def test_polyak_update_is_an_exponential_moving_average():
    target, source = nn.Linear(3, 2), nn.Linear(3, 2)
    before = target.weight.detach().clone()
    dfp.polyak_update(target, source, tau=0.25)
    torch.testing.assert_close(target.weight, 0.75 * before + 0.25 * source.weight)
    for _ in range(200):  # repeated updates converge to the source
        dfp.polyak_update(target, source, tau=0.1)
    torch.testing.assert_close(target.weight, source.weight, atol=1e-6, rtol=0)


def test_actor_init_sets_the_weight_scale():
    torch.manual_seed(0)
    for init, std in (("xavier", lambda fi, fo: (2 / (fi + fo)) ** 0.5), ("he", lambda fi, fo: (2 / fi) ** 0.5)):
        actor = dfp.Actor(obs_dim=40, chunk_dim=35, hidden_dims=(512, 512), init=init)
        for layer in (m for m in actor.net if isinstance(m, nn.Linear)):
            fan_out, fan_in = layer.weight.shape
            assert abs(layer.weight.std().item() / std(fan_in, fan_out) - 1) < 0.05, (init, layer)
            assert (layer.bias == 0).all()


def test_smoke_run_both_phases_then_reload(tmp_path, robomimic_lift_file):
    cmd = [sys.executable, os.path.join(ROOT, "dfp_offline_to_online.py"), "--env-id", "lift",
           "--dataset-path", robomimic_lift_file, "--offline-steps", "30", "--online-steps", "40", "--start-training",
           "10", "--eval-every", "20", "--eval-episodes", "1", "--final-eval-episodes", "2", "--batch-size", "16",
           "--hidden-dims", "32", "32", "--gen-per-obs", "4", "--pool-size", "4", "--normalize-obs"]
    subprocess.run(cmd, cwd=tmp_path, check=True, timeout=600)
    path, = glob.glob(str(tmp_path / "runs" / "lift__dfp_offline_to_online__1__*" / "dfp.pt"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 70 and len(ckpt["replay_online"]["rewards"]) == 40
    from test_resume import scalars  # evaluations every 20 steps, and at the switch (30) with the final one's episodes
    assert scalars(os.path.dirname(path))["eval/episodes"] == [(20, 1), (30, 2), (40, 1), (60, 1)]
    obs, z = np.random.rand(2, 19).astype(np.float32), np.random.randn(2, 4, 35).astype(np.float32)
    policy = common.load_policy(path)  # best-of-N' (N' = 4 on Robomimic) with the saved critic
    a = policy.act(obs, z)
    assert a.shape == (2, 5, 7) and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, common.load_policy(path).act(obs, z))
    plain = common.load_policy(path, best_of_n=False)
    assert plain.noise_shape == (1, 35) and plain.act(obs).shape == (2, 5, 7)
    # --normalize-obs: the checkpoint carries the data's range, and the actor sees normalised observations
    data = environments.load_dataset("lift", robomimic_lift_file)
    np.testing.assert_array_equal(plain.obs_norm.low.numpy(), data["observations"].min(0))
    np.testing.assert_array_equal(plain.obs_norm.high.numpy(), data["observations"].max(0))
    with torch.no_grad():
        expected = plain.actor(plain.obs_norm(torch.as_tensor(obs)), torch.as_tensor(z[:, 0])).view(2, 5, 7)
    np.testing.assert_allclose(plain.act(obs, z[:, :1]), expected.numpy(), atol=1e-6)


def test_obs_norm_is_the_identity_by_default_and_maps_the_data_range_to_unit_box():
    obs = torch.tensor([[0.8, -0.1, 3.0], [1.0, 0.3, 3.0], [0.9, 0.1, 3.0]])
    norm = dfp.ObsNorm(3)
    torch.testing.assert_close(norm(obs), obs)  # the paper's raw observations
    norm.low.copy_(obs.min(0).values), norm.high.copy_(obs.max(0).values)
    out = norm(obs)
    torch.testing.assert_close(out.min(0).values[:2], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(out.max(0).values[:2], torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out).all() and (out[:, 2] == -1).all()  # a constant dimension stays finite
