"""QC-FQL, FQL, QC-BFN and BFN: the flow-policy baselines of DFP's comparison, offline-to-online.

Papers: "Flow Q-Learning" (FQL, arXiv 2502.02538), "Reinforcement Learning with Action Chunking" (QC,
arXiv 2507.07969), and "Drifting Field Policy" (DFP, arXiv 2605.07727), whose Table 1 compares against these four.
Everything but the actor is dfp_offline_to_online.py's: the data, QC's sequence sampler and replay buffer, the
chunked critic ensemble with the H-step backup, the reward conventions, the evaluation and the checkpoints.

    --actor distill-ddpg (default)   QC-FQL (H = 5); FQL with --horizon 1
        a BC flow v(s, x_t, t) trained by flow matching, integrated from x = z with 10 Euler steps;
        a one-step policy mu(s, z) trained with alpha * ||mu(s, z) - flow(s, z)||^2 - Q(s, clip(mu(s, z)))
        (the same noise z on both sides; no gradient into the flow or the critic); acting and the critic
        target use clip(mu(s, z)), one network call per chunk.
    --actor best-of-n                QC-BFN (H = 5); BFN with --horizon 1
        the BC flow alone; acting and the critic target take the best of N flow samples under the critic.

Shapes
    B   sequences per batch          H   chunk length (5; 1 for FQL / BFN)      S = H * Da   flattened chunk
    N   flow samples ranked by the critic (best-of-n)       F   Euler steps of the flow (10)
    E   critic ensemble size (2)      Do, Da   observation / action dims
"""

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for common.py and environments.py
import common  # noqa: E402  light: numpy and gymnasium; torch is imported after the arguments are parsed (fast --help)
import environments  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    threads: int = 1
    """torch CPU threads; 1 is fastest here: a 2nd thread slowed steps 20x when another job held a core"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "drifting-policies"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to render a few final evaluation episodes to runs/{run_name}/videos (MUJOCO_GL=egl)"""
    save_model: bool = True
    """whether to save the checkpoint runs/{run_name}/qc_fql.pt (resumable)"""
    preset: str = "paper"
    """paper: the papers' settings below; cpu: DFP's CPU budgets and sizes for --env-id (PRESETS)"""
    resume: Optional[str] = None
    """path of a qc_fql.pt checkpoint to continue exactly; budget and evaluation flags given with it are applied"""
    trust_checkpoint: bool = False
    """load --resume files that are not weights-only (written by old versions): only from a source you trust,
    since unpickling such a file can run code"""
    checkpoint_every_minutes: float = 10.0
    """also write qc_fql.pt every this many minutes (and on SIGTERM / SIGINT / SIGUSR1, then exit 75)"""

    # Algorithm specific arguments
    env_id: str = "lift"
    """lift, can, square or cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0"""
    dataset_path: Optional[str] = None
    """dataset file; default: the official file if present, else generated scripted / oracle data"""
    actor: Literal["distill-ddpg", "best-of-n"] = "distill-ddpg"
    """distill-ddpg: QC-FQL (FQL with --horizon 1); best-of-n: QC-BFN (BFN with --horizon 1)"""
    offline_steps: int = 1_000_000
    """offline gradient steps (paper: 1M; --preset cpu: 15k)"""
    online_steps: int = 1_000_000
    """online env steps (paper: 1M; --preset cpu: 10k)"""
    start_training: int = 5_000
    """online env steps collected before the online updates start"""
    utd: int = 1
    """gradient updates per online env step"""
    batch_size: int = 256
    """sequences per batch (B)"""
    learning_rate: float = 3e-4
    """Adam learning rate (one optimiser over the flow, the one-step policy and the critic)"""
    discount: float = 0.99
    """discount per env step; the H-step backup uses discount ** H"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    horizon: int = 5
    """action chunk length H (1: FQL / BFN)"""
    hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """flow, one-step policy and critic MLP sizes (CPU preset: 256 256 256)"""
    num_qs: int = 2
    """critic ensemble size (aggregated by the mean)"""
    alpha: float = 100.0
    """weight of the distillation loss (distill-ddpg); QC and DFP ran FQL and QC-FQL with 100"""
    num_samples: Optional[int] = None
    """N of best-of-n, acting and critic target (None: 32 for H > 1 as QC-BFN, 4 for H = 1 as DFP ran BFN)"""
    flow_steps: int = 10
    """Euler steps of the BC flow (F)"""
    normalize_q_loss: bool = False
    """scale the Q loss by stopgrad(1 / mean |Q|) (FQL's option; off in QC and DFP; on in --preset cpu)"""
    normalize_obs: bool = False
    """min-max normalise observations to [-1, 1] with the offline data's range, as dfp_offline_to_online.py"""
    success_timing: str = "pre"
    """OGBench only: 'pre' (ogbench >= 1.2, matches the dataset labels) or 'post' (ogbench 1.1.2, as the papers ran)"""
    eval_every: int = 100_000
    """evaluate (and checkpoint) every this many steps, offline and online"""
    first_eval: int = 2_000
    """also evaluate (and checkpoint) at this early step, so that a long run shows a result soon (0: no)"""
    eval_episodes: int = 50
    """episodes per periodic evaluation (final: final_eval_episodes)"""
    final_eval_episodes: int = 100
    """episodes of the final evaluation and of the one at the switch to online"""
    num_eval_envs: int = 2
    """parallel evaluation envs (subprocesses)"""


# dfp_offline_to_online.py's CPU recipe, one flag away: `--preset cpu`, so that the comparison runs at one budget.
# Explicit flags still win. The same budgets, networks, start of training, evaluation and normalised observations;
# DFP's He init of its drifting actor is DFP's own fix for its generator, not part of these baselines. Our one fix:
# FQL's Q-loss normalisation (lift, 5k steps: one-step policy 0.16 without it, 0.58 with it; docs/qc_fql.md).
_CPU = dict(offline_steps=15_000, online_steps=10_000, hidden_dims=(256, 256, 256), start_training=1_000,
            eval_every=5_000, first_eval=0, eval_episodes=50, final_eval_episodes=100, normalize_obs=True,
            normalize_q_loss=True)
PRESETS = {"cpu": {"lift": _CPU, "can": _CPU, "square": _CPU}}
# Flags that may change on --resume (the rest define the run and must not).
RESUMABLE = ("offline_steps", "online_steps", "eval_every", "first_eval", "eval_episodes", "final_eval_episodes",
             "num_eval_envs", "checkpoint_every_minutes", "threads", "cuda", "track", "capture_video", "save_model")

if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, PRESETS, "baselines.qc_fql", RESUMABLE)

import numpy as np
import torch
import torch.nn as nn


# ALGO LOGIC: networks. mlp and Critic are dfp_offline_to_online.py's.
def mlp(in_dim, hidden_dims, out_dim, layer_norm=False, init="xavier"):
    """GELU MLP, as in QC / FQL / DFP. Critic: LayerNorm after each hidden layer; actor: none."""
    layers, dims = [], [in_dim, *hidden_dims]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), *([nn.LayerNorm(b)] if layer_norm else []), nn.GELU()]
    net = nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))
    for m in net:  # xavier: variance scaling (1, fan_avg, uniform), zero bias (QC / FQL lineage); he: as dbp_bc.py
        if isinstance(m, nn.Linear):
            if init == "he":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class FlowField(nn.Module):
    """The BC flow's velocity v(s, x_t, t) on the flattened chunk: MLP on concat(s, x_t, t) -> [B, S]."""

    def __init__(self, obs_dim, chunk_dim, hidden_dims):
        super().__init__()
        self.net = mlp(obs_dim + chunk_dim + 1, hidden_dims, chunk_dim)

    def forward(self, obs, x, t):
        return self.net(torch.cat([obs, x, t], dim=-1))


class OneStepActor(nn.Module):
    """The one-step policy mu(s, z): MLP on concat(s, z) -> [B, S], unclipped (clip it to act)."""

    def __init__(self, obs_dim, chunk_dim, hidden_dims):
        super().__init__()
        self.net = mlp(obs_dim + chunk_dim, hidden_dims, chunk_dim)

    def forward(self, obs, z):
        return self.net(torch.cat([obs, z], dim=-1))


class Critic(nn.Module):
    """Q(s, a_{t:t+H}) on the flattened chunk: an ensemble of MLPs with LayerNorm; returns [E, B]."""

    def __init__(self, obs_dim, chunk_dim, hidden_dims, num_qs=2):
        super().__init__()
        self.qs = nn.ModuleList(mlp(obs_dim + chunk_dim, hidden_dims, 1, layer_norm=True) for _ in range(num_qs))

    def forward(self, obs, chunk):
        x = torch.cat([obs, chunk], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])


# ALGO LOGIC: the BC flow (flow matching on the straight path from noise to data, Euler integration).
def flow_matching_target(actions, x0, t):
    """x_t = (1 - t) x0 + t a and the velocity target v* = a - x0. actions, x0 [B, S]; t [B, 1]."""
    return (1 - t) * x0 + t * actions, actions - x0


def bc_flow_loss(flow, obs, actions, valid_steps, action_dim, x0=None, t=None):
    """Flow matching, masked per chunk step by valid (QC): mean over [B, H, Da] of valid_i (v - v*)^2."""
    x0 = torch.randn_like(actions) if x0 is None else x0
    t = torch.rand(actions.shape[0], 1, device=actions.device) if t is None else t
    x_t, target = flow_matching_target(actions, x0, t)
    err = (flow(obs, x_t, t) - target) ** 2  # [B, S]
    return (err.view(len(err), -1, action_dim) * valid_steps[..., None]).mean()


def flow_actions(flow, obs, noise, flow_steps):
    """Euler from x = z: x <- x + v(s, x, i / F) / F for i = 0..F-1, then clip to [-1, 1]. [B, S]."""
    x = noise
    for i in range(flow_steps):
        t = torch.full((len(x), 1), i / flow_steps, device=x.device, dtype=x.dtype)
        x = x + flow(obs, x, t) / flow_steps
    return x.clamp(-1, 1)


def onestep_actions(onestep, obs, z):
    """Acting with the one-step policy: clip(mu(s, z), -1, 1). Clamp: zero gradient outside, as the JAX clip."""
    return onestep(obs, z).clamp(-1, 1)


# ALGO LOGIC: best-of-N under the critic (no critic gradient ever reaches a policy through it).
def score(critic, obs, chunks):
    """Ensemble-mean Q of each candidate: obs [B, Do], chunks [B, n, S] -> [B, n]."""
    B, n, S = chunks.shape
    return critic(obs.repeat_interleave(n, dim=0), chunks.reshape(B * n, S)).mean(0).view(B, n)


def best_of_n(flow, critic, obs, n, flow_steps, noise=None):
    """The argmax-Q chunk among n flow samples (noise [B, n, S] or fresh): [B, S]."""
    B, S = obs.shape[0], flow.net[-1].out_features
    noise = torch.randn(B, n, S, device=obs.device) if noise is None else noise
    chunks = flow_actions(flow, obs.repeat_interleave(n, dim=0), noise.reshape(B * n, S), flow_steps).view(B, n, S)
    return chunks[torch.arange(B, device=obs.device), score(critic, obs, chunks).argmax(1)]


def frozen(module):
    """A call of module with its parameters detached: the gradient reaches the inputs only (JAX: params not in grad)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return lambda *inputs: torch.func.functional_call(module, params, inputs)


def compute_losses(b, flow, onestep, critic, target_critic, args):
    """Critic loss + actor loss on a batch b of H-step sequences (the same offline and online). Returns (loss, info).

    Gradients: the critic loss reaches the critic only, the flow loss the flow only, and the distillation and
    Q losses the one-step policy only (the flow target is computed without gradient, the critic is frozen)."""
    H, Da = args.horizon, b["actions"].shape[1] // args.horizon
    obs, next_obs = b["observations"], b["next_observations"]
    distill = args.actor == "distill-ddpg"

    # Critic loss: H-step backup; the next chunk is clip(mu(s', z')) (FQL) or the best of N flow samples (BFN).
    with torch.no_grad():
        if distill:
            next_chunk = onestep_actions(onestep, next_obs, torch.randn_like(b["actions"]))
        else:
            next_chunk = best_of_n(flow, critic, next_obs, args.num_samples, args.flow_steps)
        next_q = target_critic(next_obs, next_chunk).mean(0)
        q_target = b["rewards"] + args.discount**H * b["masks"] * next_q
    q = critic(obs, b["actions"])  # [E, B]
    critic_loss = ((q - q_target) ** 2 * b["valid"]).mean()

    # BC flow loss (both actors).
    flow_loss = bc_flow_loss(flow, obs, b["actions"], b["valid_steps"], Da)
    actor_loss = flow_loss
    info = {"losses/critic": critic_loss, "losses/bc_flow": flow_loss, "critic/q_mean": q.mean(),
            "critic/target_mean": q_target.mean()}

    if distill:
        # Distillation: the one-step policy matches the flow's output from the same noise z (a constant target).
        z = torch.randn_like(b["actions"])
        with torch.no_grad():
            target_chunk = flow_actions(flow, obs, z, args.flow_steps)
        mu = onestep(obs, z)
        distill_loss = ((mu - target_chunk) ** 2).mean()
        # Q loss on the clipped one-step chunk, through a frozen critic.
        q_pi = frozen(critic)(obs, mu.clamp(-1, 1)).mean(0)  # [B]
        q_loss = -q_pi.mean()
        if args.normalize_q_loss:
            q_loss = q_loss / q_pi.abs().mean().detach()
        actor_loss = flow_loss + args.alpha * distill_loss + q_loss
        info.update({"losses/distill": distill_loss, "losses/q": q_loss, "actor/q_mean": q_pi.mean(),
                     "actor/mse": ((mu.detach().clamp(-1, 1) - b["actions"]) ** 2).mean()})
    info["losses/actor"] = actor_loss

    # Total loss.
    return critic_loss + actor_loss, info


@torch.no_grad()
def polyak_update(target, source, tau):
    """target <- (1 - tau) * target + tau * source, parameter by parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class ObsNorm(nn.Module):
    """obs -> 2 (obs - low) / (high - low) - 1. The defaults (low -1, high 1) are the identity: the papers' raw
    observations. --normalize-obs sets low / high to the offline data's range."""

    def __init__(self, obs_dim):
        super().__init__()
        self.register_buffer("low", -torch.ones(obs_dim))
        self.register_buffer("high", torch.ones(obs_dim))

    def forward(self, obs):
        return 2 * (obs - self.low) / (self.high - self.low).clamp_min(1e-4) - 1


class QCFQLPolicy(nn.Module, common.ActMixin):
    """Deployable policy. distill-ddpg: clip(mu(s, z)), z [B, 1, S]; best-of-n: the best of N flow samples under
    the saved critic, z [B, N, S]. forward(obs [B, 1, Do] raw, z) -> chunk [B, H, Da], executed open-loop."""

    def __init__(self, obs_dim, action_dim, horizon, hidden_dims, num_qs, actor, num_samples, flow_steps):
        super().__init__()
        S = horizon * action_dim
        self.obs_dim, self.action_dim, self.n_obs_steps = obs_dim, action_dim, 1
        self.horizon = self.n_action_steps = horizon  # the whole chunk is executed open-loop
        self.actor, self.num_samples, self.flow_steps = actor, num_samples, flow_steps
        self.noise_shape = (1 if actor == "distill-ddpg" else num_samples, S)
        self.obs_norm = ObsNorm(obs_dim)
        if actor == "distill-ddpg":
            self.onestep = OneStepActor(obs_dim, S, hidden_dims)
        else:
            self.flow = FlowField(obs_dim, S, hidden_dims)
            self.critic = Critic(obs_dim, S, hidden_dims, num_qs)

    def forward(self, obs, z):
        obs = self.obs_norm(obs[:, -1])
        if self.actor == "distill-ddpg":
            chunk = onestep_actions(self.onestep, obs, z[:, 0])
        elif self.num_samples == 1:  # the BC flow alone
            chunk = flow_actions(self.flow, obs, z[:, 0], self.flow_steps)
        else:
            chunk = best_of_n(self.flow, self.critic, obs, self.num_samples, self.flow_steps, z)
        return chunk.view(-1, self.horizon, self.action_dim)


def policy_from_checkpoint(ckpt, device="cpu", flow_only=False):
    """Used by common.load_policy: the acting part of a qc_fql.pt checkpoint. flow_only=True: one sample of the BC
    flow per chunk, no critic (a diagnostic: the flow that a distill-ddpg one-step policy is distilled from)."""
    kw = {**ckpt["policy_kwargs"], **({"actor": "best-of-n", "num_samples": 1} if flow_only else {})}
    policy = QCFQLPolicy(**kw).to(device)
    if policy.actor == "distill-ddpg":
        policy.onestep.load_state_dict(ckpt["onestep"])
    else:
        policy.flow.load_state_dict(ckpt["flow"]), policy.critic.load_state_dict(ckpt["critic"])
    policy.obs_norm.load_state_dict(ckpt["obs_norm"])
    return policy


class ReplayBuffer:
    """Transitions in arrival order: the offline data first, then online steps. Chunks of H steps are
    assembled at sampling time (QC's sequence sampler), so crossing an episode end is marked by `valid`."""

    KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")

    def __init__(self, data, capacity):
        n = len(data["observations"])
        self.data = {k: np.zeros((capacity, *np.shape(data[k])[1:]), np.float32) for k in self.KEYS}
        for k in self.KEYS:
            self.data[k][:n] = data[k]
        self.size, self.offline_size = n, n

    def add(self, **transition):
        for k in self.KEYS:
            self.data[k][self.size] = transition[k]
        self.size += 1

    def sample(self, batch_size, horizon, discount, rng):
        """Start indices t uniform; per chunk step i: reward sum R_i = sum_{j<=i} gamma^j r_{t+j},
        mask_i = min(masks), term_i = max(terminals), valid_i = 1 - term_{i-1} (valid_0 = 1).
        Returns the values at i = H-1, the chunk a_{t:t+H}, s_{t+H} (next observation at t+H-1) and, for the
        flow loss, valid at every chunk step (valid_steps [B, H])."""
        t = rng.integers(0, self.size - horizon + 1, size=batch_size)
        seq = t[:, None] + np.arange(horizon)
        d = self.data
        reward_sum = np.cumsum(d["rewards"][seq] * discount ** np.arange(horizon), axis=1)
        mask = np.minimum.accumulate(d["masks"][seq], axis=1)
        term = np.maximum.accumulate(d["terminals"][seq], axis=1)
        valid = np.concatenate([np.ones((batch_size, 1), np.float32), 1 - term[:, :-1]], axis=1)
        return dict(observations=d["observations"][t], actions=d["actions"][seq].reshape(batch_size, -1),
                    next_observations=d["next_observations"][seq[:, -1]], rewards=reward_sum[:, -1],
                    masks=mask[:, -1], valid=valid[:, -1], valid_steps=valid)


if __name__ == "__main__":
    distill = args.actor == "distill-ddpg"
    variant = ("qc_" if args.horizon > 1 else "") + ("fql" if distill else "bfn")  # qc_fql, fql, qc_bfn or bfn
    if not args.resume and args.exp_name == "qc_fql":  # the member shows in the run name
        args.exp_name = variant
    environments.check_env_id(args.env_id)
    robomimic = args.env_id in environments.ROBOMIMIC_TASKS
    # N of best-of-n: QC-BFN 32 (QC, DFP), BFN 4 (DFP's BFN command); unused by distill-ddpg.
    if args.num_samples is None:
        args.num_samples = 32 if args.horizon > 1 else 4
    common.require_positive(args, "batch_size", "learning_rate", "horizon", "num_qs", "num_samples", "flow_steps",
                            "utd", "eval_every", "eval_episodes", "final_eval_episodes", "num_eval_envs",
                            "checkpoint_every_minutes", "threads")
    common.require(args.offline_steps >= 0 and args.online_steps >= 0 and args.offline_steps + args.online_steps > 0,
                   f"--offline-steps and --online-steps must be >= 0 with a positive sum, not {args.offline_steps} and "
                   f"{args.online_steps}")
    common.require(args.start_training >= 0 and args.first_eval >= 0, "--start-training and --first-eval must be >= 0")
    common.require(args.alpha >= 0, f"--alpha must be >= 0, not {args.alpha}")
    common.require(len(args.hidden_dims) > 0 and min(args.hidden_dims) > 0, "--hidden-dims needs positive layer sizes")
    common.require(args.success_timing in ("pre", "post"), f"--success-timing must be pre or post, not {args.success_timing!r}")

    # TRY NOT TO MODIFY: seeding and CPU threads
    common.set_seed(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env_kwargs = {} if robomimic else {"success_timing": args.success_timing}

    # Data. Robomimic: reward r - 1 in {-1, 0}, episodes end at success (QC / DFP); OGBench: the env's reward.
    data = environments.load_dataset(args.env_id, args.dataset_path)
    args.dataset_path = data["dataset_path"]  # args.json records the file actually used
    common.require(len(data["observations"]) >= args.horizon, f"the dataset has fewer transitions than --horizon {args.horizon}")
    if robomimic:
        data["rewards"] = data["rewards"] - 1.0
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    obs_norm = ObsNorm(data["observations"].shape[1])  # the identity unless --normalize-obs
    if args.normalize_obs:
        obs_norm.low.copy_(torch.as_tensor(data["observations"].min(0)))
        obs_norm.high.copy_(torch.as_tensor(data["observations"].max(0)))

    def norm(obs):  # raw numpy observations -> what the networks see; the buffer stores normalised ones
        with torch.no_grad():
            return obs_norm(torch.as_tensor(obs)).numpy()

    data["observations"], data["next_observations"] = norm(data["observations"]), norm(data["next_observations"])
    buffer = ReplayBuffer(data, capacity=len(data["observations"]) + args.online_steps)
    print(f"{args.env_id}: {buffer.size} offline transitions from {data['dataset_path']}")

    env = environments.make_env(args.env_id, args.seed, **env_kwargs)
    obs_dim, action_dim, H = env.observation_space.shape[0], env.action_space.shape[0], args.horizon
    S = H * action_dim
    flow = FlowField(obs_dim, S, args.hidden_dims).to(device)
    onestep = OneStepActor(obs_dim, S, args.hidden_dims).to(device) if distill else None
    critic = Critic(obs_dim, S, args.hidden_dims, args.num_qs).to(device)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    actor_params = [*flow.parameters(), *(onestep.parameters() if distill else [])]
    optimizer = torch.optim.Adam([*actor_params, *critic.parameters()], lr=args.learning_rate)
    nets = dict(flow=flow, **({"onestep": onestep} if distill else {}), critic=critic, target_critic=target_critic,
                optimizer=optimizer)
    global_step, episode, switch_success, wall_time = 0, 0, None, 0.0
    if ckpt:
        for key, net in nets.items():
            net.load_state_dict(ckpt[key])
        online = {k: v.numpy() for k, v in ckpt["replay_online"].items()}
        for k, v in online.items():
            buffer.data[k][buffer.size: buffer.size + len(v)] = v
        buffer.size += len(online["rewards"])
        rng = common.numpy_rng_from_state(ckpt["rng"])
        common.set_rng_state(ckpt["rngs"])
        global_step, episode, switch_success, wall_time = ckpt["step"], ckpt["episode"], ckpt["switch_success"], ckpt["wall_time_s"]
        print(f"resuming {ckpt['run_name']} from step {global_step}")
    run_name, run_dir, writer = common.make_run(args, ckpt and ckpt["run_name"], ckpt and ckpt["step"] + 1)
    t_start = time.time() - wall_time
    policy_kwargs = dict(obs_dim=obs_dim, action_dim=action_dim, horizon=H, hidden_dims=args.hidden_dims,
                         num_qs=args.num_qs, actor=args.actor, num_samples=args.num_samples, flow_steps=args.flow_steps)

    def snapshot():
        """Everything a resume needs, as plain data (tensors cloned): the state at this step."""
        return copy.deepcopy(dict(
            **{key: net.state_dict() for key, net in nets.items()}, buffer_size=buffer.size,
            rng=common.numpy_rng_state(rng), rngs=common.rng_state(), step=global_step, episode=episode,
            switch_success=switch_success, wall_time_s=time.time() - t_start))

    def save(state):
        """qc_fql.pt from a snapshot. Online, the snapshot is the start of the current episode: a resume replays that
        episode exactly (the env is re-seeded per episode), so no chunk in the replay buffer crosses the join."""
        path = os.path.join(run_dir, "qc_fql.pt")
        common.save_checkpoint(path, dict(
            script="baselines.qc_fql", policy_module="baselines.qc_fql", policy_kwargs=policy_kwargs,
            obs_norm=obs_norm.state_dict(), **{k: v for k, v in state.items() if k != "buffer_size"},
            replay_online={k: v[buffer.offline_size: state["buffer_size"]] for k, v in buffer.data.items()},
            args=vars(args), run_name=run_name, env_id=args.env_id, dataset_path=data["dataset_path"]))
        return path

    @torch.no_grad()
    def act_fn(obs_hist):  # raw [n, 1, Do] -> [n, H, Da]: clip(mu(s, z)), or best-of-N flow samples under the critic
        obs = torch.as_tensor(norm(obs_hist[:, -1]), device=device)
        if distill:
            chunk = onestep_actions(onestep, obs, torch.randn(len(obs), S, device=device))
        else:
            chunk = best_of_n(flow, critic, obs, args.num_samples, args.flow_steps)
        return chunk.view(-1, H, action_dim).cpu().numpy()

    def update():
        """One gradient step on critic + actor (one Adam optimiser), then the Polyak update (offline = online)."""
        batch = {k: torch.as_tensor(v, device=device) for k, v in
                 buffer.sample(args.batch_size, H, args.discount, rng).items()}
        loss, info = compute_losses(batch, flow, onestep, critic, target_critic, args)
        if not torch.isfinite(loss):
            bad = [k for k, v in info.items() if not torch.isfinite(v).all()]
            raise common.UserError(f"{', '.join(bad) or 'the loss'} became non-finite at step {global_step}; the last "
                                   f"good checkpoint is {os.path.join(run_dir, 'qc_fql.pt')}. Lower --learning-rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        polyak_update(target_critic, critic, args.tau)
        return info

    total = args.offline_steps + args.online_steps
    progress = common.Progress(variant, total, global_step, hint="For a CPU, try --preset cpu; on a GPU, --cuda.")
    checkpointing = common.Checkpointing(args.checkpoint_every_minutes)

    def maybe_evaluate(state):
        """Evaluate and checkpoint at every --eval-every steps, at --first-eval, at the switch and at the end;
        checkpoint also every --checkpoint-every-minutes and on a stop signal (then exit 75). Returns an offline
        evaluation's success."""
        offline_success = None
        at_switch = global_step == args.offline_steps and args.online_steps > 0  # as many episodes as the final one
        evaluate_now = global_step % args.eval_every == 0 or global_step == args.first_eval or at_switch
        if evaluate_now:
            episodes = args.final_eval_episodes if at_switch else args.eval_episodes
            result = environments.evaluate(act_fn, args.env_id, episodes, 1, H, num_envs=args.num_eval_envs, **env_kwargs)
            for key, v in result.items():
                writer.add_scalar(f"eval/{key}", v, global_step)
            phase = "offline" if global_step <= args.offline_steps else "online"
            progress.evaluation(f"success {result['success_rate']:.2f} over {result['episodes']} episodes ({phase})")
            offline_success = result["success_rate"] if phase == "offline" else None
        if args.save_model and (evaluate_now or checkpointing.due()):
            checkpointing.saved(save(state() if callable(state) else state), global_step, writer)
        return offline_success

    # Offline phase: the BC flow (and the one-step policy) and the critic on the offline data.
    while global_step < args.offline_steps:
        global_step += 1
        info = update()
        progress.update()
        if global_step % 100 == 0:
            for key, v in info.items():
                writer.add_scalar(key, v.item(), global_step)
            writer.add_scalar("charts/SPS", progress.rates()[0], global_step)
        success = maybe_evaluate(snapshot)
        switch_success = switch_success if success is None else success  # the last offline one: the switch's

    # Online: collect with the one-step policy (or best-of-N), the same updates, evaluate.
    while global_step < total:
        # TRY NOT TO MODIFY: a new episode, seeded by its index; its start is what a checkpoint holds (see save)
        obs, _ = env.reset(seed=args.seed + episode)
        episode_start = snapshot()
        queue, ep_return, ep_len, ep_success, done = [], 0.0, 0, False, False
        while not done and global_step < total:
            global_step += 1
            # ALGO LOGIC: act from the action queue; a new chunk when it is empty
            if not queue:
                queue = list(act_fn(obs[None, None])[0])
            action = queue.pop(0)
            next_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated or global_step == total  # the run's end also ends the episode
            buffer.add(observations=norm(obs), actions=action, rewards=reward - 1.0 if robomimic else reward,
                       masks=1.0 - terminated, terminals=float(done), next_observations=norm(next_obs))
            ep_return, ep_len, ep_success = ep_return + reward, ep_len + 1, ep_success or info["success"]
            obs = next_obs
            if global_step - args.offline_steps >= args.start_training:
                for _ in range(args.utd):
                    info = update()
                if global_step % 100 == 0:
                    for key, v in info.items():
                        writer.add_scalar(key, v.item(), global_step)
                    writer.add_scalar("charts/SPS", progress.rates()[0], global_step)
            progress.update()
            maybe_evaluate(episode_start)
        episode += 1
        # TRY NOT TO MODIFY: episode bookkeeping
        writer.add_scalar("charts/episodic_return", ep_return, global_step)
        writer.add_scalar("charts/episodic_length", ep_len, global_step)
        writer.add_scalar("charts/success", float(ep_success), global_step)
    progress.close()

    result = environments.evaluate(act_fn, args.env_id, args.final_eval_episodes, 1, H, num_envs=args.num_eval_envs, **env_kwargs)
    for key, v in result.items():
        writer.add_scalar(f"eval/final_{key}", v, global_step)
    print(f"final: success {result['success_rate']:.3f} over {result['episodes']} episodes")
    if args.save_model:
        save(snapshot())
    common.write_results(run_dir, args, "baselines.qc_fql", steps=global_step, final_success=result["success_rate"],
                         final_episodes=result["episodes"], switch_success=switch_success, wall_time_s=time.time() - t_start,
                         variant=variant)
    if args.capture_video:
        environments.record_video(act_fn, args.env_id, os.path.join(run_dir, "videos", "final.mp4"), 1, H)
    env.close()
    writer.close()
