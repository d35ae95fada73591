"""DFP: Drifting Field Policy. Offline-to-online RL with an action-chunked critic and top-K drifting.

Paper: "Drifting Field Policy" (arXiv 2605.07727), built on Q-chunking (arXiv 2507.07969) and the
drifting field (arXiv 2602.04770). The actor is a one-step generator chunk = clip(f(s, eps)).
Offline it imitates the data with the drifting loss (L_BC). At the switch a slow copy pi_old is
made; online, the positives of a second drifting loss are the top-K of N chunks of pi_old ranked by
the critic (L_topK), a sample-based step toward pi_old * exp(Q / alpha) with no critic gradient in the
actor. Actor loss: L_BC + lambda * L_topK. Acting: the best of N' chunks under the critic, the whole
chunk executed open-loop.

Shapes
    B   sequences per batch          H   chunk length (5)          S = H * Da   flattened chunk
    G   generated chunks per state   N   pool from pi_old          K   top-K positives kept
    N'  best-of-N' candidates (acting and the critic target)       Do, Da   observation / action dims
"""

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import common  # light: numpy and gymnasium; torch is imported after the arguments are parsed (fast --help)
import environments


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
    """whether to save the checkpoint runs/{run_name}/dfp.pt (resumable)"""
    preset: str = "paper"
    """paper: the paper's settings below; cpu: the measured CPU recipe of --env-id (PRESETS; README)"""
    resume: Optional[str] = None
    """path of a dfp.pt checkpoint to continue exactly; budget and evaluation flags given with it are applied"""
    trust_checkpoint: bool = False
    """load --resume files that are not weights-only (written by old versions): only from a source you trust,
    since unpickling such a file can run code"""
    checkpoint_every_minutes: float = 10.0
    """also write dfp.pt every this many minutes (and on SIGTERM / SIGINT / SIGUSR1, then exit 75)"""

    # Algorithm specific arguments
    env_id: str = "lift"
    """lift, can, square or cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0"""
    dataset_path: Optional[str] = None
    """dataset file; default: the official file if present, else generated scripted / oracle data"""
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
    """Adam learning rate (one optimiser over actor and critic)"""
    discount: float = 0.99
    """discount per env step; the H-step backup uses discount ** H"""
    tau: float = 0.005
    """Polyak rate of the target critic"""
    horizon: int = 5
    """action chunk length H (1: the non-chunked variant)"""
    hidden_dims: tuple[int, ...] = (512, 512, 512, 512)
    """actor and critic MLP sizes (CPU preset: 256 256 256)"""
    num_qs: int = 2
    """critic ensemble size (aggregated by the mean)"""
    gen_per_obs: int = 8
    """generated chunks per state (G, `Ngen`), shared by L_BC and L_topK"""
    pool_size: int = 16
    """N: chunks drawn from pi_old per state and ranked by the critic"""
    k: Optional[int] = None
    """K: top-ranked chunks kept as positives (None: paper Table 5, Robomimic 2, cube 4; released YAML 4)"""
    n_best: Optional[int] = None
    """N': best-of-N' for acting and the critic target (None: paper, Robomimic 4, cube 16; released code 16)"""
    temperatures: Optional[tuple[float, ...]] = None
    """drifting temperatures (None: paper, Robomimic (0.005, 0.05), cube (0.05,); released YAML (0.1,))"""
    actor_init: Literal["xavier", "he"] = "xavier"
    """actor weights: xavier (the paper's lineage) or he (dbp_bc.py's wider start; see the docs' notes)"""
    normalize_obs: bool = False
    """min-max normalise observations to [-1, 1] with the offline data's range, as dbp_bc.py (the paper: raw)"""
    lambda_topk: float = 0.5
    """lambda: weight of L_topK (0: the paper's "w/o L_topK" ablation)"""
    bc_weight: float = 1.0
    """weight of L_BC (`alpha_target`)"""
    old_tau: float = 1e-4
    """Polyak rate of the slow policy copy pi_old (online)"""
    success_timing: str = "pre"
    """OGBench only: 'pre' (ogbench >= 1.2, matches the dataset labels) or 'post' (ogbench 1.1.2, as the paper ran)"""
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


# The measured CPU recipe (README, docs/dfp_offline_to_online.md), one flag away: `--preset cpu`. Explicit flags
# still win. Smaller networks, 15k offline + 10k online steps, normalised observations and He init for the actor
# (the two changes that made the offline phase learn at this budget on lift; see the docs).
_CPU = dict(offline_steps=15_000, online_steps=10_000, hidden_dims=(256, 256, 256), start_training=1_000,
            eval_every=5_000, first_eval=0, eval_episodes=50, final_eval_episodes=100, actor_init="he", normalize_obs=True)
# Square: the drifting models' temperatures (0.02, 0.05, 0.2), as dbp_bc.py. At 15k steps the paper's (0.005, 0.05)
# left the offline actor at 0.10 on square and the wider set reached 0.36-0.52; swapped into dbp_bc.py, the paper's
# pair took it from 0.82 to 0.16 (docs/dfp_offline_to_online.md, "Square").
PRESETS = {"cpu": {"lift": _CPU, "can": _CPU, "square": {**_CPU, "temperatures": (0.02, 0.05, 0.2)}}}
# Flags that may change on --resume (the rest define the run and must not).
RESUMABLE = ("offline_steps", "online_steps", "eval_every", "first_eval", "eval_episodes", "final_eval_episodes",
             "num_eval_envs", "checkpoint_every_minutes", "threads", "cuda", "track", "capture_video", "save_model")

if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, PRESETS, "dfp_offline_to_online", RESUMABLE)

import numpy as np
import torch
import torch.nn as nn


# ALGO LOGIC: the drifting loss (docs/method.md). The same function is copied verbatim from
# dbp_bc.py; tests/test_drift_loss.py keeps the copies identical.
def drift_loss(gen, pos, temperatures=(0.02, 0.05, 0.2), neg=None):
    """Drifting loss with one group per row b. Returns (loss per group [B], info).

    gen [B, G, S] generated samples (carry the gradient); pos [B, P, S] positives (data);
    neg [B, N, S] optional extra negatives. The generated samples are also negatives of each other.
    The target of each sample is itself moved along the drifting field V (a constant, no gradient),
    so the gradient pushes gen along V: toward the positives, away from the other samples.
    The loss value is ~constant by construction (1.0 for one temperature); log info instead.
    """
    B, G, S = gen.shape
    with torch.autocast(gen.device.type, enabled=False), torch.no_grad():
        gen_f, pos = gen.detach().float(), pos.float()
        neg = gen_f.new_zeros(B, 0, S) if neg is None else neg.float()
        targets = torch.cat([gen_f, neg, pos], dim=1)  # [B, M, S], order: generated, negatives, positives
        # Pairwise L2 distances, in the clamped dot-product form of the reference code (self-distance 1e-4).
        sq = (gen_f**2).sum(-1, keepdim=True) + (targets**2).sum(-1)[:, None, :] - 2 * gen_f @ targets.mT
        dist = sq.clamp_min(1e-8).sqrt()  # [B, G, M]
        # Global scale normalisation: one scalar over the whole batch, self-distances included.
        scale = dist.mean()
        coord_scale = (scale / math.sqrt(S)).clamp_min(1e-3)  # rescaled coordinates: typical distance ~ sqrt(S)
        gen_n, targets_n = gen_f / coord_scale, targets / coord_scale
        dist_n = dist / scale.clamp_min(1e-3)  # mean ~ 1, so temperatures are relative
        # Self-mask: a generated sample never repels itself.
        dist_n[:, :, :G] += 100.0 * torch.eye(G, device=gen.device)
        n_neg = G + neg.shape[1]
        # All temperatures at once (a leading axis of size n_R: one set of kernels, which matters on a GPU;
        # stacked from Python floats, so no host-to-device copy and no synchronisation in the training step).
        logits = -torch.stack([dist_n / R for R in temperatures])  # [n_R, B, G, M]
        # Bidirectional normalisation: sqrt(softmax over targets x softmax over generated samples).
        affinity = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(1e-6).sqrt()
        a_neg, a_pos = affinity[..., :n_neg], affinity[..., n_neg:]
        # Cross-weighting: attraction scaled by total repulsion and vice versa, so each row sums to 0
        # and the field vanishes in expectation when generated and data distributions match.
        coef = torch.cat([-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], dim=-1)
        field_R = coef @ targets_n - coef.sum(-1, keepdim=True) * gen_n  # [n_R, B, G, S]
        force = field_R.pow(2).mean(dim=(1, 2, 3))  # per temperature: global mean-square field [n_R]
        field = (field_R / force.clamp_min(1e-8).sqrt().view(-1, 1, 1, 1)).sum(0)  # each at unit RMS, summed
        info = {"scale": scale, **{f"force_mag_R{r}": f for r, f in zip(temperatures, force)}}
        target = gen_n + field  # stop-gradient target
    loss = ((gen.float() / coord_scale - target) ** 2).mean(dim=(1, 2))
    return loss, info


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


class Actor(nn.Module):
    """chunk = clip(f(s, eps), -1, 1), eps ~ N(0, I) of dim S = H * Da. Clamp: zero gradient outside."""

    def __init__(self, obs_dim, chunk_dim, hidden_dims, init="xavier"):
        super().__init__()
        self.net = mlp(obs_dim + chunk_dim, hidden_dims, chunk_dim, init=init)

    def forward(self, obs, eps):
        return self.net(torch.cat([obs, eps], dim=-1)).clamp(-1, 1)


class Critic(nn.Module):
    """Q(s, a_{t:t+H}) on the flattened chunk: an ensemble of MLPs with LayerNorm; returns [E, B]."""

    def __init__(self, obs_dim, chunk_dim, hidden_dims, num_qs=2):
        super().__init__()
        self.qs = nn.ModuleList(mlp(obs_dim + chunk_dim, hidden_dims, 1, layer_norm=True) for _ in range(num_qs))

    def forward(self, obs, chunk):
        x = torch.cat([obs, chunk], dim=-1)
        return torch.stack([q(x).squeeze(-1) for q in self.qs])


# ALGO LOGIC: sample-based selection under the critic (no critic gradient ever reaches the actor).
def sample_chunks(actor, obs, n, eps=None):
    """n chunks per state: obs [B, Do] -> [B, n, S]."""
    B, S = obs.shape[0], actor.net[-1].out_features
    eps = torch.randn(B, n, S, device=obs.device) if eps is None else eps
    return actor(obs.repeat_interleave(n, dim=0), eps.reshape(B * n, S)).view(B, n, S)


def score(critic, obs, chunks):
    """Ensemble-mean Q of each candidate: obs [B, Do], chunks [B, n, S] -> [B, n]."""
    B, n, S = chunks.shape
    return critic(obs.repeat_interleave(n, dim=0), chunks.reshape(B * n, S)).mean(0).view(B, n)


def best_of_n(actor, critic, obs, n, eps=None):
    """The argmax-Q chunk among n samples of the actor: [B, S]."""
    chunks = sample_chunks(actor, obs, n, eps)
    return chunks[torch.arange(obs.shape[0], device=obs.device), score(critic, obs, chunks).argmax(1)]


def top_k(actor_old, critic, obs, n, k):
    """The K highest-Q chunks among N samples of pi_old: the positives of L_topK, [B, K, S]."""
    chunks = sample_chunks(actor_old, obs, n)
    idx = score(critic, obs, chunks).topk(k, dim=1).indices
    return chunks.gather(1, idx[..., None].expand(-1, -1, chunks.shape[-1]))


def compute_losses(b, actor, critic, target_critic, actor_old, args, online):
    """Critic loss + L_BC (+ lambda * L_topK online) on a batch b of H-step sequences. Returns (loss, info)."""
    H = args.horizon
    # Critic loss: H-step backup; the next chunk is the best of N' actor samples under the online critic.
    with torch.no_grad():
        next_chunk = best_of_n(actor, critic, b["next_observations"], args.n_best)
        next_q = target_critic(b["next_observations"], next_chunk).mean(0)
        q_target = b["rewards"] + args.discount**H * b["masks"] * next_q
    q = critic(b["observations"], b["actions"])  # [E, B]
    critic_loss = ((q - q_target) ** 2 * b["valid"]).mean()

    # BC drifting loss: G chunks per state; the positive is the data chunk (masked by valid, like the critic).
    gen = sample_chunks(actor, b["observations"], args.gen_per_obs)  # [B, G, S], with gradient
    bc_loss, bc_info = drift_loss(gen, b["actions"][:, None], args.temperatures)
    actor_loss = args.bc_weight * (bc_loss * b["valid"]).mean()
    info = {"losses/critic": critic_loss, "losses/actor_bc": actor_loss, "critic/q_mean": q.mean(),
            "critic/target_mean": q_target.mean(), **{f"drift/bc_{k}": v for k, v in bc_info.items()}}

    # Top-K drifting loss: the same generated chunks; positives = the top-K of N chunks of pi_old under Q.
    if online and args.lambda_topk > 0:
        with torch.no_grad():
            positives = top_k(actor_old, critic, b["observations"], args.pool_size, args.k)
        topk_loss, topk_info = drift_loss(gen, positives, args.temperatures)
        actor_loss = actor_loss + args.lambda_topk * topk_loss.mean()
        info.update({"losses/actor_topk": topk_loss.mean(), **{f"drift/topk_{k}": v for k, v in topk_info.items()}})

    # Total loss.
    return critic_loss + actor_loss, info


@torch.no_grad()
def polyak_update(target, source, tau):
    """target <- (1 - tau) * target + tau * source, parameter by parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class ObsNorm(nn.Module):
    """obs -> 2 (obs - low) / (high - low) - 1. The defaults (low -1, high 1) are the identity: the paper's raw
    observations. --normalize-obs sets low / high to the offline data's range."""

    def __init__(self, obs_dim):
        super().__init__()
        self.register_buffer("low", -torch.ones(obs_dim))
        self.register_buffer("high", torch.ones(obs_dim))

    def forward(self, obs):
        return 2 * (obs - self.low) / (self.high - self.low).clamp_min(1e-4) - 1


class DFPPolicy(nn.Module, common.ActMixin):
    """Deployable DFP policy: best-of-N' chunks under the saved critic (n_best = 1: the actor alone)."""

    def __init__(self, obs_dim, action_dim, horizon, hidden_dims, num_qs, n_best):
        super().__init__()
        self.obs_dim, self.action_dim, self.n_obs_steps = obs_dim, action_dim, 1
        self.horizon = self.n_action_steps = horizon  # the whole chunk is executed open-loop
        self.n_best, self.noise_shape = n_best, (n_best, horizon * action_dim)
        self.obs_norm = ObsNorm(obs_dim)
        self.actor = Actor(obs_dim, horizon * action_dim, hidden_dims)
        self.critic = Critic(obs_dim, horizon * action_dim, hidden_dims, num_qs)

    def forward(self, obs, z):
        """obs [B, 1, Do] (raw), z [B, N', S] -> chunk [B, H, Da]."""
        obs = self.obs_norm(obs[:, -1])
        if self.n_best == 1:
            chunk = self.actor(obs, z[:, 0])
        else:
            chunk = best_of_n(self.actor, self.critic, obs, self.n_best, z)
        return chunk.view(-1, self.horizon, self.action_dim)


def policy_from_checkpoint(ckpt, device="cpu", best_of_n=True):
    """Used by common.load_policy. best_of_n=False: one actor sample per chunk, no critic."""
    kw = ckpt["policy_kwargs"]
    policy = DFPPolicy(**{**kw, "n_best": kw["n_best"] if best_of_n else 1}).to(device)
    policy.actor.load_state_dict(ckpt["actor"]), policy.critic.load_state_dict(ckpt["critic"])
    if "obs_norm" in ckpt:  # absent from checkpoints written before --normalize-obs existed: raw observations
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
        Returns the values at i = H-1, the chunk a_{t:t+H} and s_{t+H} (next observation at t+H-1)."""
        t = rng.integers(0, self.size - horizon + 1, size=batch_size)
        seq = t[:, None] + np.arange(horizon)
        d = self.data
        reward_sum = np.cumsum(d["rewards"][seq] * discount ** np.arange(horizon), axis=1)
        mask = np.minimum.accumulate(d["masks"][seq], axis=1)
        term = np.maximum.accumulate(d["terminals"][seq], axis=1)
        valid = np.concatenate([np.ones((batch_size, 1), np.float32), 1 - term[:, :-1]], axis=1)
        return dict(observations=d["observations"][t], actions=d["actions"][seq].reshape(batch_size, -1),
                    next_observations=d["next_observations"][seq[:, -1]], rewards=reward_sum[:, -1],
                    masks=mask[:, -1], valid=valid[:, -1])


if __name__ == "__main__":
    if not args.resume and args.lambda_topk == 0 and args.exp_name == "dfp_offline_to_online":
        args.exp_name = "dfp_offline_to_online_lambda0"  # the ablation shows in the run name
    environments.check_env_id(args.env_id)
    robomimic = args.env_id in environments.ROBOMIMIC_TASKS
    # Per-benchmark hyperparameters of the paper's Table 5 (the released YAML uses K 4, N' 16, temps (0.1,)).
    args.k = (2 if robomimic else 4) if args.k is None else args.k
    args.n_best = (4 if robomimic else 16) if args.n_best is None else args.n_best
    args.temperatures = ((0.005, 0.05) if robomimic else (0.05,)) if args.temperatures is None else args.temperatures
    common.require_positive(args, "batch_size", "learning_rate", "horizon", "num_qs", "gen_per_obs", "pool_size", "k",
                            "n_best", "utd", "eval_every", "eval_episodes", "final_eval_episodes", "num_eval_envs",
                            "checkpoint_every_minutes", "threads")
    common.require(args.offline_steps >= 0 and args.online_steps >= 0 and args.offline_steps + args.online_steps > 0,
                   f"--offline-steps and --online-steps must be >= 0 with a positive sum, not {args.offline_steps} and "
                   f"{args.online_steps}")
    common.require(args.start_training >= 0 and args.first_eval >= 0, "--start-training and --first-eval must be >= 0")
    common.require(args.k <= args.pool_size, f"--k {args.k} must not exceed --pool-size {args.pool_size} (K of N)")
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
    actor = Actor(obs_dim, S, args.hidden_dims, args.actor_init).to(device)
    critic = Critic(obs_dim, S, args.hidden_dims, args.num_qs).to(device)
    target_critic = copy.deepcopy(critic).requires_grad_(False)
    actor_old = copy.deepcopy(actor).requires_grad_(False)  # pi_old: re-initialised at the switch to online
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.learning_rate)
    nets = dict(actor=actor, critic=critic, target_critic=target_critic, actor_old=actor_old, optimizer=optimizer)
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
                         num_qs=args.num_qs, n_best=args.n_best)

    def snapshot():
        """Everything a resume needs, as plain data (tensors cloned): the state at this step."""
        return copy.deepcopy(dict(
            **{key: net.state_dict() for key, net in nets.items()}, buffer_size=buffer.size,
            rng=common.numpy_rng_state(rng), rngs=common.rng_state(), step=global_step, episode=episode,
            switch_success=switch_success, wall_time_s=time.time() - t_start))

    def save(state):
        """dfp.pt from a snapshot. Online, the snapshot is the start of the current episode: a resume replays that
        episode exactly (the env is re-seeded per episode), so no chunk in the replay buffer crosses the join."""
        path = os.path.join(run_dir, "dfp.pt")
        common.save_checkpoint(path, dict(
            script="dfp_offline_to_online", policy_module="dfp_offline_to_online", policy_kwargs=policy_kwargs,
            obs_norm=obs_norm.state_dict(), **{k: v for k, v in state.items() if k != "buffer_size"},
            replay_online={k: v[buffer.offline_size: state["buffer_size"]] for k, v in buffer.data.items()},
            args=vars(args), run_name=run_name, env_id=args.env_id, dataset_path=data["dataset_path"]))
        return path

    @torch.no_grad()
    def act_fn(obs_hist):  # raw [n, 1, Do] -> [n, H, Da]: best-of-N' under the critic (offline and online)
        obs = torch.as_tensor(norm(obs_hist[:, -1]), device=device)
        return best_of_n(actor, critic, obs, args.n_best).view(-1, H, action_dim).cpu().numpy()

    def update(online):
        """One gradient step on critic + actor (one Adam optimiser), then the Polyak updates."""
        batch = {k: torch.as_tensor(v, device=device) for k, v in
                 buffer.sample(args.batch_size, H, args.discount, rng).items()}
        loss, info = compute_losses(batch, actor, critic, target_critic, actor_old, args, online)
        if not torch.isfinite(loss):
            bad = [k for k, v in info.items() if not torch.isfinite(v).all()]
            raise common.UserError(f"{', '.join(bad) or 'the loss'} became non-finite at step {global_step}; the last "
                                   f"good checkpoint is {os.path.join(run_dir, 'dfp.pt')}. Lower --learning-rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        polyak_update(target_critic, critic, args.tau)
        if online:  # pi_old slowly tracks the actor
            polyak_update(actor_old, actor, args.old_tau)
        return info

    total = args.offline_steps + args.online_steps
    progress = common.Progress("dfp", total, global_step, hint="For a CPU, try --preset cpu; on a GPU, --cuda.")
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

    # Offline phase: L_BC and the critic on the offline data.
    while global_step < args.offline_steps:
        global_step += 1
        info = update(online=False)
        progress.update()
        if global_step % 100 == 0:
            for key, v in info.items():
                writer.add_scalar(key, v.item(), global_step)
            writer.add_scalar("charts/SPS", progress.rates()[0], global_step)
        success = maybe_evaluate(snapshot)
        switch_success = switch_success if success is None else success  # the last offline one: the switch's

    # Switch: pi_old <- the actor (if not resuming mid-online). Online: collect with best-of-N', update, evaluate.
    if global_step == args.offline_steps:
        actor_old.load_state_dict(actor.state_dict())
    while global_step < total:
        # TRY NOT TO MODIFY: a new episode, seeded by its index; its start is what a checkpoint holds (see save)
        obs, _ = env.reset(seed=args.seed + episode)
        episode_start = snapshot()
        queue, ep_return, ep_len, ep_success, done = [], 0.0, 0, False, False
        while not done and global_step < total:
            global_step += 1
            # ALGO LOGIC: act from the action queue; a new best-of-N' chunk when it is empty
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
                    info = update(online=True)
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
    common.write_results(run_dir, args, "dfp_offline_to_online", steps=global_step, final_success=result["success_rate"],
                         final_episodes=result["episodes"], switch_success=switch_success, wall_time_s=time.time() - t_start)
    if args.capture_video:
        environments.record_video(act_fn, args.env_id, os.path.join(run_dir, "videos", "final.mp4"), 1, H)
    env.close()
    writer.close()
