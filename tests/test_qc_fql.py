"""baselines/qc_fql.py: the flow-matching target and its valid mask, Euler integration of a known linear flow,
distillation at zero for a one-step policy equal to the flow, best-of-N under the critic, the critic target's next
chunk, gradient isolation between flow, one-step policy and critic, the deployable policy."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from baselines import qc_fql
from tests.conftest import ROOT


def make_args(**kw):
    args = qc_fql.Args(hidden_dims=(16, 16), batch_size=8, **kw)
    if args.num_samples is None:
        args.num_samples = 4
    return args


def test_flow_matching_target_is_the_straight_path_from_noise_to_data():
    g = torch.Generator().manual_seed(0)
    a, x0 = torch.rand(6, 10, generator=g) * 2 - 1, torch.randn(6, 10, generator=g)
    t = torch.tensor([[0.0], [1.0], [0.5], [0.25], [0.9], [0.1]])
    x_t, v = qc_fql.flow_matching_target(a, x0, t)
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0: pure noise
    torch.testing.assert_close(x_t[1], a[1])  # t = 1: the data
    torch.testing.assert_close(x_t, (1 - t) * x0 + t * a)
    torch.testing.assert_close(v, a - x0)  # d x_t / dt, the same at every t
    # Moving along v from x_t for the remaining time 1 - t lands on the data.
    torch.testing.assert_close(x_t + (1 - t) * v, a)


class ZeroField(nn.Module):
    def __init__(self, chunk_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, chunk_dim))

    def forward(self, obs, x, t):
        return torch.zeros_like(x)


def test_bc_flow_loss_is_masked_per_chunk_step_by_valid():
    g = torch.Generator().manual_seed(1)
    H, Da = 3, 2
    a, x0 = torch.rand(4, H * Da, generator=g), torch.randn(4, H * Da, generator=g)
    t = torch.rand(4, 1, generator=g)
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1.0]])
    loss = qc_fql.bc_flow_loss(ZeroField(H * Da), torch.zeros(4, 5), a, valid, Da, x0=x0, t=t)
    per_step = ((a - x0) ** 2).view(4, H, Da)  # a zero field's error is the target itself
    want = (per_step * valid[..., None]).sum() / (4 * H * Da)  # QC: a plain mean over [B, H, Da] of masked errors
    torch.testing.assert_close(loss, want)
    assert loss < qc_fql.bc_flow_loss(ZeroField(H * Da), torch.zeros(4, 5), a, torch.ones(4, H), Da, x0=x0, t=t)


class PointMassField(nn.Module):
    """The exact flow-matching field of a data distribution that is a point mass at c: v = (c - x) / (1 - t).
    Records the times it is called at."""

    def __init__(self, c):
        super().__init__()
        self.c, self.times = c, []
        self.net = nn.Sequential(nn.Linear(1, c.shape[-1]))

    def forward(self, obs, x, t):
        self.times.append(t[0, 0].item())
        return (self.c - x) / (1 - t)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_reproduces_a_known_linear_flow(steps):
    # Each Euler step from t_i = i / F moves x a fraction 1 / (F - i) of the way to c: the last lands on c exactly.
    c = torch.tensor([[0.3, -0.7, 0.9, 0.0]]).repeat(5, 1)
    z = torch.randn(5, 4, dtype=torch.float64)
    field = PointMassField(c.double())
    out = qc_fql.flow_actions(field, torch.zeros(5, 2), z, steps)
    torch.testing.assert_close(out, c.double(), rtol=0, atol=1e-12)
    assert field.times == pytest.approx([i / steps for i in range(steps)])
    # A constant field v = d moves z by exactly d over [0, 1]; the result is clipped to [-1, 1].
    d = torch.tensor([0.5, -3.0, 0.25, 0.0])
    const = ConstField(d)
    z = torch.full((2, 4), 0.1)
    torch.testing.assert_close(qc_fql.flow_actions(const, torch.zeros(2, 2), z, steps),
                               (z + d).clamp(-1, 1).expand(2, 4))


class ConstField(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, obs, x, t):
        return self.d.expand_as(x)


class FlowAsOneStep(nn.Module):
    """A one-step policy that is the flow: mu(s, z) = flow(s, z), the distillation's fixed point."""

    def __init__(self, flow, steps):
        super().__init__()
        self.flow, self.steps = flow, steps

    def forward(self, obs, z):
        return qc_fql.flow_actions(self.flow, obs, z, self.steps)


def batch(B=8, Do=5, H=2, Da=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(observations=torch.randn(B, Do, generator=g), next_observations=torch.randn(B, Do, generator=g),
                actions=torch.rand(B, H * Da, generator=g) * 2 - 1, rewards=-torch.ones(B), masks=torch.ones(B),
                valid=torch.ones(B), valid_steps=torch.ones(B, H))


def nets(args, Do=5, Da=3):
    S = args.horizon * Da
    torch.manual_seed(0)
    flow = qc_fql.FlowField(Do, S, args.hidden_dims)
    onestep = qc_fql.OneStepActor(Do, S, args.hidden_dims)
    critic = qc_fql.Critic(Do, S, args.hidden_dims, args.num_qs)
    return flow, onestep, critic, qc_fql.Critic(Do, S, args.hidden_dims, args.num_qs)


def test_distillation_loss_is_zero_when_the_one_step_policy_equals_the_flow():
    args = make_args(horizon=2)
    flow, onestep, critic, target = nets(args)
    _, info = qc_fql.compute_losses(batch(), flow, FlowAsOneStep(flow, args.flow_steps), critic, target, args)
    assert info["losses/distill"].item() == 0.0  # the same noise z on both sides
    _, info = qc_fql.compute_losses(batch(), flow, onestep, critic, target, args)
    assert info["losses/distill"].item() > 1e-4  # an untrained one-step policy is not the flow


class IdentityField(nn.Module):
    """Zero velocity: the flow's samples are clip(z), so the candidates are known."""

    def __init__(self, chunk_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, chunk_dim))

    def forward(self, obs, x, t):
        return torch.zeros_like(x)


class DistanceCritic(nn.Module):
    """Q(s, chunk) = -|chunk - 0.3|^2 + (member index) (the ensemble mean ranks as each member)."""

    def forward(self, obs, chunk):
        q = -((chunk - 0.3) ** 2).sum(-1)
        return torch.stack([q, q + 1])


def test_best_of_n_picks_the_argmax_of_the_critic():
    obs, z = torch.zeros(6, 4), torch.randn(6, 32, 3) * 0.5
    got = qc_fql.best_of_n(IdentityField(3), DistanceCritic(), obs, 32, 10, noise=z)
    cand = z.clamp(-1, 1)
    q = -((cand - 0.3) ** 2).sum(-1)
    torch.testing.assert_close(got, cand[torch.arange(6), q.argmax(1)])
    assert (q.argmax(1) != 0).any()  # not trivially the first candidate


class ConstOneStep(nn.Module):
    def __init__(self, value, chunk_dim):
        super().__init__()
        self.value, self.net = value, nn.Sequential(nn.Linear(1, chunk_dim))

    def forward(self, obs, z):
        return torch.full_like(z, self.value)


class SumCritic(nn.Module):
    """Q(s, chunk) = sum(chunk) for two members (a target critic whose values are known)."""

    def forward(self, obs, chunk):
        return torch.stack([chunk.sum(-1), chunk.sum(-1) + 2])


def test_critic_target_uses_the_clipped_one_step_chunk_or_the_best_flow_sample():
    args = make_args(horizon=2, discount=0.9)
    flow, _, critic, _ = nets(args)
    b = batch()
    b["masks"][0], b["valid"][1] = 0.0, 0.0
    # distill-ddpg: a' = clip(mu(s', z')) = 1 everywhere (mu = 2), so Qbar(s', a') = mean(6, 8) = 7.
    _, info = qc_fql.compute_losses(b, flow, ConstOneStep(2.0, 6), critic, SumCritic(), args)
    want = b["rewards"] + 0.9**2 * b["masks"] * 7.0
    torch.testing.assert_close(info["critic/target_mean"], want.mean())
    q = critic(b["observations"], b["actions"]).detach()
    torch.testing.assert_close(info["losses/critic"], ((q - want) ** 2 * b["valid"]).mean())
    # The Q loss also scores the clipped chunk: -mean_e Q_e(s, clip(mu)) = -(6 + 8) / 2.
    _, info = qc_fql.compute_losses(b, flow, ConstOneStep(2.0, 6), SumCritic(), SumCritic(), args)
    assert info["losses/q"].item() == pytest.approx(-7.0)
    # best-of-n with a zero flow field: the candidates are clip(z); the chosen one maximises the online critic.
    args = make_args(horizon=2, discount=0.9, actor="best-of-n", num_samples=16)
    field = IdentityField(6)
    torch.manual_seed(3)
    z = torch.randn(8, 16, 6)  # the first draw of compute_losses: the candidates' noise
    torch.manual_seed(3)
    _, info = qc_fql.compute_losses(b, field, None, DistanceCritic(), SumCritic(), args)
    cand = z.clamp(-1, 1)
    best = cand[torch.arange(8), (-((cand - 0.3) ** 2).sum(-1)).argmax(1)]
    want = b["rewards"] + 0.9**2 * b["masks"] * (best.sum(-1) + 1)
    torch.testing.assert_close(info["critic/target_mean"], want.mean())
    assert "losses/distill" not in info and info["losses/actor"] is info["losses/bc_flow"]  # BFN: the flow loss only


def grads(loss, *modules):
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return [any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in modules]


def test_each_loss_reaches_only_its_own_network():
    args = make_args(horizon=2)
    flow, onestep, critic, target = nets(args)
    loss, info = qc_fql.compute_losses(batch(), flow, onestep, critic, target, args)
    # flow, one-step policy, critic
    assert grads(info["losses/critic"], flow, onestep, critic) == [False, False, True]
    assert grads(info["losses/bc_flow"], flow, onestep, critic) == [True, False, False]
    assert grads(info["losses/distill"], flow, onestep, critic) == [False, True, False]  # the flow target is constant
    assert grads(info["losses/q"], flow, onestep, critic) == [False, True, False]  # no Q gradient into the critic
    assert grads(loss, flow, onestep, critic) == [True, True, True]
    assert not any(p.grad is not None for p in target.parameters())
    # The actor loss is flow + alpha * distill + Q.
    torch.testing.assert_close(info["losses/actor"],
                               info["losses/bc_flow"] + 100.0 * info["losses/distill"] + info["losses/q"])


class NegativeCritic(nn.Module):
    """Q(s, chunk) = -(1 + |chunk|^2) < 0 for both members, so mean |Q| = -mean Q."""

    def forward(self, obs, chunk):
        q = -(1 + (chunk**2).sum(-1))
        return torch.stack([q, 2 * q])


def test_normalize_q_loss_divides_by_the_mean_absolute_q():
    flow, onestep, _, _ = nets(make_args(horizon=2))
    _, plain = qc_fql.compute_losses(batch(), flow, onestep, NegativeCritic(), NegativeCritic(), make_args(horizon=2))
    assert plain["losses/q"].item() == pytest.approx(-plain["actor/q_mean"].item()) and plain["losses/q"] > 1.5
    args = make_args(horizon=2, normalize_q_loss=True)
    _, normed = qc_fql.compute_losses(batch(), flow, onestep, NegativeCritic(), NegativeCritic(), args)
    assert normed["losses/q"].item() == pytest.approx(1.0)  # -mean Q / mean |Q| with Q < 0


@pytest.mark.parametrize("actor,H", [("distill-ddpg", 5), ("distill-ddpg", 1), ("best-of-n", 5), ("best-of-n", 1)])
def test_policy_from_checkpoint_acts_as_the_training_networks(actor, H):
    Do, Da, N = 19, 7, 6
    kw = dict(obs_dim=Do, action_dim=Da, horizon=H, hidden_dims=(16,), num_qs=2, actor=actor, num_samples=N,
              flow_steps=3)
    torch.manual_seed(0)
    flow, onestep = qc_fql.FlowField(Do, H * Da, (16,)), qc_fql.OneStepActor(Do, H * Da, (16,))
    critic, norm = qc_fql.Critic(Do, H * Da, (16,)), qc_fql.ObsNorm(Do)
    norm.low.uniform_(-2, -1), norm.high.uniform_(1, 2)
    ckpt = dict(policy_kwargs=kw, flow=flow.state_dict(), onestep=onestep.state_dict(), critic=critic.state_dict(),
                obs_norm=norm.state_dict())
    policy = qc_fql.policy_from_checkpoint(ckpt)
    assert (policy.n_obs_steps, policy.horizon, policy.n_action_steps) == (1, H, H)
    assert policy.noise_shape == ((1 if actor == "distill-ddpg" else N), H * Da)
    obs = np.random.rand(3, Do).astype(np.float32)
    z = np.random.randn(3, *policy.noise_shape).astype(np.float32)
    a = policy.act(obs, z)
    assert a.shape == (3, H, Da) and np.abs(a).max() <= 1.0
    with torch.no_grad():
        s = norm(torch.as_tensor(obs))
        if actor == "distill-ddpg":
            want = onestep(s, torch.as_tensor(z[:, 0])).clamp(-1, 1)
        else:
            want = qc_fql.best_of_n(flow, critic, s, N, 3, torch.as_tensor(z))
    np.testing.assert_allclose(a, want.view(3, H, Da).numpy(), atol=1e-6)
    assert policy.act(obs[0]).shape == (H, Da)
    flow_only = qc_fql.policy_from_checkpoint(ckpt, flow_only=True)  # the BC flow alone, one sample
    assert flow_only.noise_shape == (1, H * Da)
    with torch.no_grad():
        want = qc_fql.flow_actions(flow, norm(torch.as_tensor(obs)), torch.as_tensor(z[:, 0]), 3)
    np.testing.assert_allclose(flow_only.act(obs, z[:, :1]), want.view(3, H, Da).numpy(), atol=1e-6)


def test_sampler_returns_valid_at_every_chunk_step():
    n = 7  # episode A: t = 0..2 (solved at 2); episode B: t = 3..6
    data = dict(observations=np.arange(n)[:, None] * np.ones((1, 2)), actions=np.arange(n)[:, None] * np.ones((1, 3)),
                rewards=np.arange(n, dtype=float), masks=np.array([1, 1, 0, 1, 1, 1, 1.0]),
                terminals=np.array([0, 0, 1, 0, 0, 0, 1.0]), next_observations=(np.arange(n)[:, None] + 1) * np.ones((1, 2)))

    class Starts:
        def integers(self, low, high, size):
            return np.array([0, 1, 2, 3])

    b = qc_fql.ReplayBuffer(data, 10).sample(4, 3, 0.5, Starts())
    np.testing.assert_array_equal(b["valid_steps"], [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(b["valid"], b["valid_steps"][:, -1])
    np.testing.assert_array_equal(b["masks"], [0, 0, 0, 1])


@pytest.mark.parametrize("env_id", ["lift", "can", "square"])
def test_cpu_preset_is_dfps_budget_and_sizes(env_id):
    import common
    import dfp_offline_to_online as dfp

    argv = ["--preset", "cpu", "--env-id", env_id]
    ours, _ = common.parse_args(qc_fql.Args, qc_fql.PRESETS, "baselines.qc_fql", qc_fql.RESUMABLE, argv=argv)
    theirs, _ = common.parse_args(dfp.Args, dfp.PRESETS, "dfp_offline_to_online", dfp.RESUMABLE, argv=argv)
    shared = ("offline_steps", "online_steps", "hidden_dims", "batch_size", "learning_rate", "start_training", "utd",
              "discount", "tau", "horizon", "num_qs", "normalize_obs", "eval_every", "first_eval", "eval_episodes",
              "final_eval_episodes", "num_eval_envs", "dataset_path")
    assert {k: getattr(ours, k) for k in shared} == {k: getattr(theirs, k) for k in shared}
    assert ours.offline_steps > 0 and ours.normalize_obs and ours.normalize_q_loss and ours.alpha == 100
    assert set(qc_fql.RESUMABLE) == set(dfp.RESUMABLE)


# End to end: tiny budgets (seconds of training; the evaluations dominate).
TINY = ["--env-id", "lift", "--offline-steps", "20", "--online-steps", "100", "--start-training", "5", "--eval-every",
        "60", "--eval-episodes", "1", "--final-eval-episodes", "1", "--batch-size", "16", "--hidden-dims", "32", "32",
        "--normalize-obs", "--num-eval-envs", "1", "--flow-steps", "3"]


def check_reload(path, data_file, tmp_path, actor, H, N):
    """The checkpoint loads weights-only through common.load_policy, acts as its networks, and runs under
    robot_deploy.py's ONNX backend with the same outputs."""
    import common
    import environments
    import robot_deploy as rd

    policy = common.load_policy(path, env_id="lift")
    assert policy.noise_shape == ((1 if actor == "distill-ddpg" else N), H * 7)
    assert (policy.n_obs_steps, policy.horizon, policy.n_action_steps) == (1, H, H)
    obs = np.random.rand(2, 19).astype(np.float32)
    z = np.random.randn(2, *policy.noise_shape).astype(np.float32)
    a = policy.act(obs, z)
    assert a.shape == (2, H, 7) and np.abs(a).max() <= 1.0
    np.testing.assert_array_equal(a, common.load_policy(path).act(obs, z))
    data = environments.load_dataset("lift", data_file)  # --normalize-obs: the data's range travels in the checkpoint
    np.testing.assert_array_equal(policy.obs_norm.low.numpy(), data["observations"].min(0))
    infer = rd.make_backend(policy, "onnx", str(tmp_path))
    assert rd.check_parity(policy, infer, tol=1e-5, n=2) <= 1e-5


@pytest.mark.parametrize("actor,H,name", [("best-of-n", 5, "qc_bfn"), ("distill-ddpg", 1, "fql")])
def test_smoke_run_both_phases_then_reload(tmp_path, robomimic_lift_file, actor, H, name):
    from test_resume import run_script

    args = [*TINY, "--dataset-path", robomimic_lift_file, "--actor", actor, "--horizon", str(H), "--num-samples", "4"]
    run_script("baselines/qc_fql.py", args, tmp_path)
    run_dir, = glob.glob(str(tmp_path / "runs" / f"lift__{name}__1__*"))  # the member names the run
    ckpt = torch.load(os.path.join(run_dir, "qc_fql.pt"), weights_only=True)
    assert ckpt["step"] == 120 and len(ckpt["replay_online"]["rewards"]) == 100
    assert ("onestep" in ckpt) == (actor == "distill-ddpg") and ckpt["policy_kwargs"]["actor"] == actor
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert results["steps"] == 120 and results["final_episodes"] == 1 and results["variant"] == name
    tags = scalars(run_dir)
    assert "losses/bc_flow" in tags and ("losses/distill" in tags) == (actor == "distill-ddpg")
    assert [s for s, _ in tags["eval/success_rate"]] == [20, 60, 120] and "eval/final_success_rate" in tags  # 20: the switch
    check_reload(os.path.join(run_dir, "qc_fql.pt"), robomimic_lift_file, tmp_path, actor, H, 4)


def test_qc_fql_killed_in_the_online_phase_resumes_bit_for_bit(tmp_path, robomimic_lift_file):
    import common
    from test_resume import assert_same_scalars, assert_same_state, kill_at, one_run_dir, run_script

    script, args = "baselines/qc_fql.py", [*TINY, "--dataset-path", robomimic_lift_file]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run_script(script, args, tmp_path / "a")
    # The untrained policy's episodes run to lift's 300-step limit, so step 75 is mid-episode, in the online phase.
    status, out = kill_at(script, args, tmp_path / "b", lambda line: "step 75/" in line)
    assert status == common.Checkpointing.PREEMPTED, out
    run_b = one_run_dir(tmp_path / "b")
    stopped = torch.load(os.path.join(run_b, "qc_fql.pt"), weights_only=True)
    online = stopped["replay_online"]
    # The checkpoint holds the start of the interrupted episode: the buffer ends at an episode boundary.
    assert stopped["step"] == 20 + len(online["rewards"]) and stopped["step"] <= 75
    assert len(online["rewards"]) == 0 or online["terminals"][-1] == 1
    assert not os.path.exists(os.path.join(run_b, "results.json"))
    run_script(script, ["--resume", os.path.join(run_b, "qc_fql.pt")], tmp_path / "b")
    a = torch.load(os.path.join(one_run_dir(tmp_path / "a"), "qc_fql.pt"), weights_only=True)
    b = torch.load(os.path.join(run_b, "qc_fql.pt"), weights_only=True)
    assert a["step"] == b["step"] == 120
    assert_same_state(a, b, ["flow", "onestep", "critic", "target_critic", "optimizer"])
    for k in a["replay_online"]:
        assert torch.equal(a["replay_online"][k], b["replay_online"][k]), k
    assert_same_scalars(scalars(one_run_dir(tmp_path / "a")), scalars(run_b))
    assert os.path.exists(os.path.join(run_b, "results.json"))
    check_reload(os.path.join(run_b, "qc_fql.pt"), robomimic_lift_file, tmp_path, "distill-ddpg", 5, 32)


def scalars(run_dir):
    from test_resume import scalars as read

    return read(run_dir)


def test_help_is_fast_and_bad_flags_get_one_line(tmp_path):
    from test_resume import run_script

    out = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "baselines", "qc_fql.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--actor" in out.stdout and "--alpha" in out.stdout and "--num-samples" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "tyro" in imported and "torch" not in imported  # --help answers before torch loads
    out = run_script("baselines/qc_fql.py", ["--num-samples", "0"], tmp_path, check=False)
    assert out.returncode == 1 and out.stderr.strip() == "error: --num-samples must be > 0, not 0." and not os.listdir(tmp_path)
    out = run_script("baselines/qc_fql.py", ["--preset", "cpu", "--env-id", "cube-double-play-singletask-task2-v0"],
                     tmp_path, check=False)
    assert out.returncode == 1 and "has no recipe" in out.stderr and "Traceback" not in out.stderr
