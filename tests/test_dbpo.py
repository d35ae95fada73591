"""dbpo_online.py: exact Gaussian log-probability, ratio 1 and anchor 0 before an update, the chunk baseline,
GAE, chunk env, smoke runs."""

import copy
import glob
import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import common
import environments
import dbpo_online as dbpo
from dbp_bc import DriftPolicy
from tests.conftest import ROOT


def test_executed_logprob_matches_the_gaussian_density_by_hand():
    torch.manual_seed(0)
    mu, sigma = torch.randn(3, 6, 2), 0.03 + 0.07 * torch.rand(3, 6, 2)
    action = mu + sigma * torch.randn(3, 6, 2)
    got = dbpo.executed_logprob(mu, sigma, action, start=1, n_action_steps=4, logprob_min=-100.0)
    sl = slice(1, 5)  # executed prefix: chunk steps To-1 .. To+Ta-2 with To = 2, Ta = 4
    by_hand = (-0.5 * ((action - mu) / sigma) ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi))[:, sl]
    torch.testing.assert_close(got, by_hand.sum(dim=(1, 2)) / (4 * 2))
    far = dbpo.executed_logprob(mu, sigma, action + 10.0, 1, 4, logprob_min=-2.0)
    assert (far == -2.0).all()  # clamped from below


def test_first_epoch_ratio_is_one_and_anchor_is_zero():
    torch.manual_seed(0)
    args = dbpo.Args()
    policy = DriftPolicy(obs_dim=5, action_dim=2, n_obs_steps=1, horizon=4, n_action_steps=3, hidden_dims=(32, 32))
    anchor = copy.deepcopy(policy).requires_grad_(False)
    head = dbpo.GaussianHead(5, 8, args.sigma_init, args.sigma_min, args.sigma_max)
    critic = dbpo.value_net(5)
    obs, z = torch.randn(64, 1, 5), torch.randn(64, 4, 2)
    with torch.no_grad():  # the rollout: sample, store z, the action and its log-probability
        obs_n = policy.normalize_obs(obs)
        mu, sigma = policy.generate(obs_n, z), head(obs_n).view(64, 4, 2)
        action = (mu + sigma * torch.randn_like(mu)).clamp(-1, 1)
        logp = dbpo.executed_logprob(mu, sigma, action, 0, 3, args.logprob_min)
    loss, info = dbpo.dbpo_loss(policy, head, critic, anchor, obs, z, action, logp, torch.randn(64), torch.randn(64), args)
    assert info["losses/ratio_max_deviation"] < 1e-6
    assert info["losses/anchor"] == 0.0
    assert torch.isfinite(loss)
    torch.testing.assert_close(info["charts/sigma"], torch.tensor(args.sigma_init))  # zero-initialised head


def test_a_ppo_step_moves_the_mean_toward_a_rewarded_action_and_ignores_floored_samples():
    torch.manual_seed(0)
    args = dbpo.Args(anchor_coef=0.0, ent_coef=0.0)
    policy = DriftPolicy(obs_dim=5, action_dim=2, n_obs_steps=1, horizon=4, n_action_steps=4, hidden_dims=(32, 32))
    head = dbpo.GaussianHead(5, 8, args.sigma_init, args.sigma_min, args.sigma_max)
    obs, z = torch.randn(2, 1, 5), torch.randn(2, 4, 2)
    with torch.no_grad():
        mu = policy.generate(policy.normalize_obs(obs), z)
    action = mu + 0.03  # both samples: one sigma above the mean in every dim
    action[1] += 10.0  # sample 1 is far away: its log-prob sits at the floor
    logp = dbpo.executed_logprob(mu, torch.full_like(mu, 0.03), action, 0, 4, args.logprob_min)
    adv = torch.tensor([1.0, -1.0])  # sample 0 was good
    loss, info = dbpo.dbpo_loss(policy, head, dbpo.value_net(5), copy.deepcopy(policy), obs, z, action, logp, adv,
                                torch.zeros(2), args)
    assert info["losses/logprob_clamped"] == 0.5
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    with torch.no_grad():  # a small step down the gradient raises sample 0's mean toward its action
        for p, g in zip(policy.parameters(), grads):
            p -= 1e-3 * g
        new_mu = policy.generate(policy.normalize_obs(obs), z)
    assert (new_mu[0] - mu[0]).mean() > 0
    # Floored samples alone (sample 1, twice) give the actor no gradient at all.
    far = [1, 1]
    loss1, _ = dbpo.dbpo_loss(policy, head, dbpo.value_net(5), copy.deepcopy(policy), obs[far], z[far], action[far],
                              logp[far], torch.tensor([1.0, -1.0]), torch.zeros(2), args)
    assert all(g is None or g.abs().max() == 0 for g in
               torch.autograd.grad(loss1, list(policy.parameters()), allow_unused=True))


def test_chunk_baseline_sees_the_mean_chunk_and_leaves_the_actor_gradient_alone():
    torch.manual_seed(0)
    policy = DriftPolicy(obs_dim=5, action_dim=2, n_obs_steps=1, horizon=4, n_action_steps=4, hidden_dims=(32, 32))
    head = dbpo.GaussianHead(5, 8, 0.1, 0.03, 0.1)
    obs, z = torch.randn(16, 1, 5), torch.randn(16, 4, 2)
    with torch.no_grad():
        obs_n = policy.normalize_obs(obs)
        mu = policy.generate(obs_n, z)
    action, logp, adv, ret = mu + 0.05 * torch.randn_like(mu), torch.full((16,), -1.0), torch.randn(16), torch.randn(16)
    # V(s, f(z, s)): the same observation with two different mean chunks gives two different critic inputs.
    x = dbpo.critic_input(obs_n[[0, 0]], mu[[0, 1]], chunk_baseline=True)
    assert x.shape == (2, 5 + 8) and not torch.equal(x[0], x[1])
    assert dbpo.critic_input(obs_n, mu, chunk_baseline=False).shape == (16, 5)
    # The baseline changes the advantages only: for the same advantages the actor's gradient is the same, and the
    # value loss reaches the critic but not the policy through the stored mean chunk.
    grads = {}
    for chunk_baseline in (False, True):
        args = dbpo.Args(chunk_baseline=chunk_baseline)
        critic = dbpo.value_net(5 + 8 * chunk_baseline)
        loss, _ = dbpo.dbpo_loss(policy, head, critic, copy.deepcopy(policy), obs, z, action, logp, adv, ret, args, mu)
        *grads[chunk_baseline], critic_grad = torch.autograd.grad(loss, [*policy.parameters(), critic[0].weight])
        assert critic_grad.abs().sum() > 0
    for g0, g1 in zip(grads[False], grads[True]):
        torch.testing.assert_close(g0, g1)


def test_gae_with_a_termination_and_a_truncation():
    # One env, 4 decisions: decision 1 terminates (no bootstrap), decision 3 is truncated (bootstraps V(final obs)).
    r = torch.tensor([[1.0], [2.0], [0.5], [1.0]])
    v = torch.tensor([[0.5], [0.4], [0.3], [0.2]])
    next_v = torch.tensor([[0.4], [9.0], [0.2], [0.7]])  # after decision 1 / 3: V(final observation)
    term = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    done = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    g, lam = 0.9, 0.8
    d3 = 1.0 + g * 0.7 - 0.2  # truncated: bootstrap from V(final obs)
    d2 = 0.5 + g * 0.2 - 0.3
    d1 = 2.0 - 0.4  # terminated: no bootstrap
    d0 = 1.0 + g * 0.4 - 0.5
    a3, a2, a1 = d3, d2 + g * lam * d3, d1  # the trace stops at episode ends
    a0 = d0 + g * lam * a1
    adv, ret = dbpo.gae(r, v, next_v, term, done, g, lam)
    torch.testing.assert_close(adv.squeeze(1), torch.tensor([a0, a1, a2, a3]))
    torch.testing.assert_close(ret, adv + v)


def test_split_cosine_is_one_for_agreeing_halves_and_minus_one_for_opposing_ones():
    w = torch.ones(3, requires_grad=True)
    x = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    halves = torch.tensor([True, False, True, False])
    assert dbpo.split_cosine(lambda m: (x[m] @ w).sum(), [w], halves) == pytest.approx(1.0)
    sign = torch.where(halves, 1.0, -1.0)[:, None]
    assert dbpo.split_cosine(lambda m: ((sign * x)[m] @ w).sum(), [w], halves) == pytest.approx(-1.0)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] * 2)
    assert dbpo.split_cosine(lambda m: (y[m] @ w).sum(), [w], halves) == pytest.approx(0.0)


class CountingEnv(gym.Env):
    """Observation = step count; reward 1 per step; terminates after 5 steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(1, self.t, np.float32), 1.0, self.t == 5, False, {"success": self.t == 5}


def test_chunk_env_sums_rewards_and_stops_at_the_episode_end():
    env = dbpo.ChunkEnv(CountingEnv(), n_obs_steps=2, n_action_steps=3)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs[:, 0], [0, 0])
    obs, reward, term, _, _ = env.step(np.zeros((3, 2)))
    assert reward == 3.0 and not term and obs[:, 0].tolist() == [2, 3]
    obs, reward, term, _, info = env.step(np.zeros((3, 2)))
    assert reward == 2.0 and term and info["success"] and obs[:, 0].tolist() == [4, 5]  # stopped after 2 steps


class PotentialEnv(CountingEnv):
    """CountingEnv whose info also carries a potential: 0.05 at reset, then t / 10 (as RobomimicEnv(report_potential=True))."""

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        return obs, {**info, "potential": 0.05}

    def step(self, action):
        obs, reward, term, trunc, info = super().step(action)
        return obs, reward, term, trunc, {**info, "potential": self.t / 10}


def test_potential_shaping_adds_gamma_phi_next_minus_phi_and_telescopes():
    gamma = 0.9
    env = dbpo.ChunkEnv(PotentialEnv(), n_obs_steps=1, n_action_steps=3, shaping_gamma=gamma)
    env.reset()
    _, r1, _, _, _ = env.step(np.zeros((3, 2)))
    assert r1 == pytest.approx(3.0 + gamma * 0.3 - 0.05)
    _, r2, term, _, _ = env.step(np.zeros((3, 2)))
    assert term and r2 == pytest.approx(2.0 + gamma * 0.0 - 0.3)  # Phi = 0 after a termination
    assert (r1 - 3.0) + gamma * (r2 - 2.0) == pytest.approx(-0.05)  # the discounted shaping telescopes to -Phi(s_0)
    env_unshaped = dbpo.ChunkEnv(PotentialEnv(), n_obs_steps=1, n_action_steps=3)
    env_unshaped.reset()
    assert env_unshaped.step(np.zeros((3, 2)))[1] == 3.0


def test_robomimic_potential_is_robosuites_dense_reward_and_the_reward_stays_sparse():
    env = environments.make_env("lift", seed=0, report_potential=True)
    _, info = env.reset(seed=0)
    assert 0.0 < info["potential"] < 1.0
    _, reward, _, _, info = env.step(np.zeros(7))
    assert reward == 0.0 and 0.0 < info["potential"] < 1.0 and not info["success"]
    assert "potential" not in environments.make_env("lift", seed=0).step(np.zeros(7))[-1]


# The second run also stops early: iteration 2 of a 6-iteration learning-rate schedule.
STOPPED = ["--num-iterations", "6", "--stop-iteration", "2"]


@pytest.mark.parametrize("flags", [[], ["--chunk-baseline", "--reward-shaping", *STOPPED]],
                         ids=["value_of_s", "chunk_baseline_shaped_stopped"])
def test_smoke_run_with_pretraining_then_reload(tmp_path, robomimic_lift_file, flags):
    cmd = [sys.executable, os.path.join(ROOT, "dbpo_online.py"), "--env-id", "lift", "--dataset-path",
           robomimic_lift_file, "--pretrain-steps", "30", "--num-envs", "2", "--num-steps", "4", "--num-iterations", "2",
           "--eval-every", "2", "--eval-episodes", "2", "--critic-warmup-iters", "1", "--max-episode-steps", "60",
           *flags]
    subprocess.run(cmd, cwd=tmp_path, check=True, timeout=900)
    path, = glob.glob(str(tmp_path / "runs" / "lift__dbpo_online__1__*" / "dbpo.pt"))
    # The pretraining gets the time limit and does not evaluate: iteration 0 evaluates the same weights.
    pre, = glob.glob(str(tmp_path / "runs" / "lift__dbpo_pretrain__1__*"))
    assert json.load(open(os.path.join(pre, "args.json")))["max_episode_steps"] == 60
    assert not [t for t in EventAccumulator(pre).Reload().Tags()["scalars"] if t.startswith("eval/")]
    assert json.load(open(os.path.join(pre, "results.json")))["final_success"] is None
    events, = glob.glob(str(tmp_path / "runs" / "lift__dbpo_online__1__*"))
    logged = EventAccumulator(events).Reload()
    assert [e.value for e in logged.Scalars("eval/length")] == [60.0, 60.0]  # iterations 0 and 2, at the time limit
    cosines = [e.value for e in logged.Scalars("charts/pg_split_cosine")]
    assert len(cosines) == 2 and all(-1.0 <= c <= 1.0 for c in cosines)  # one per iteration
    if "--stop-iteration" in flags:  # stopped at 2, with the learning rate of a 6-iteration cosine schedule
        actor_lr = logged.Scalars("charts/actor_lr")[-1].value
        lr, lr_min, warm = 1e-5, 3e-6, 2 / 10  # the defaults; iteration 2 of the 10-iteration warm-up
        assert actor_lr == pytest.approx(warm * (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * 1 / 6))))
    policy = common.load_policy(path, env_id="lift")  # the fine-tuned policy loads as a plain DBP policy
    obs = environments.load_dataset("lift", robomimic_lift_file)["observations"][:2]  # in-distribution: no clipping
    z = np.random.randn(2, 4, 7).astype(np.float32)
    np.testing.assert_array_equal(policy.act(obs, z), common.load_policy(path).act(obs, z))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["iteration"] == 2 and os.path.isabs(ckpt["pretrained"])
    assert len(ckpt["actor_opt"]["state"]) > 0  # iteration 2 is past the 1-iteration critic warm-up: actor steps
    assert common.load_policy(ckpt["pretrained"]).n_action_steps == policy.n_action_steps