"""Diffusion Policy baseline: offline imitation with a DDPM over action chunks; K network calls per chunk.

The baseline DBP (dbp_bc.py) is compared against: the same data, chunking, normalisation, backbones,
optimiser, EMA, evaluation and checkpoint format; only the generative model differs. A network
eps(x_t, t, obs) is trained to predict the noise mixed into a demo chunk x_0 (DDPM, epsilon prediction):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),   t ~ U{0, ..., T-1},   T = 100
    loss = || eps(x_t, t, obs) - eps ||^2,    abar_t from the squared-cosine schedule (squaredcos_cap_v2)
Acting starts from pure noise and denoises in K steps (K network calls per chunk):
    --sampler ddpm   ancestral sampling with the posterior variance ("fixed_small"); K = T is the DDPM chain
    --sampler ddim   deterministic DDIM (eta = 0)
Each step predicts x_0, clips it to [-1, 1] (as Diffusion Policy does) and moves to the next timestep.

Shapes
    B   observations per batch                T   diffusion training steps      K   inference steps
    To  observation history steps             H   predicted chunk length        Ta  executed actions per chunk
    Do, Da   observation / action dims        z   all the sampling noise: [B, H, Da] for DDIM,
                                                  [B, K, H, Da] for DDPM (x_T, then one noise per step t > 0)

References: DDPM (Ho et al., arXiv 2006.11239); DDIM (Song et al., arXiv 2010.02502); the squared-cosine
schedule (Nichol & Dhariwal, arXiv 2102.09672); Diffusion Policy (Chi et al., arXiv 2303.04137), whose
low-dim settings (T = 100, squaredcos_cap_v2, epsilon prediction, clipped x_0, 1-D U-Net with FiLM) we follow.
Deviations: (1) inference timesteps are spaced "trailing" (99, 89, ..., 9 for K = 10; Lin et al., arXiv 2305.08891),
not diffusers' old "leading" default (90, ..., 0), which for K = 1 would denoise pure noise at t = 0. (2) DDIM moves
along the noise re-derived from the clipped x_0 (diffusers' use_clipped_model_output=True); Diffusion Policy's DDIM
keeps the raw prediction, which differs only while the clip is active. DDPM matches diffusers' DDPMScheduler.
(3) dbp_bc.py's chunking (To = 1, H = Ta = 4; Diffusion Policy low-dim: 2, 16, 8), learning rate and smaller nets,
for an equal budget with DBP.
"""

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for common.py and environments.py
import common  # noqa: E402  (light: numpy and gymnasium; torch is imported after the arguments are parsed)
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
    """whether to save checkpoints (diffusion.pt: latest, diffusion_best.pt: best periodic evaluation)"""
    preset: str = "paper"
    """paper: the defaults below; cpu: the CPU recipe of --env-id, dbp_bc.py's budget (PRESETS)"""
    resume: Optional[str] = None
    """path of a diffusion.pt checkpoint to continue exactly; budget and evaluation flags given with it are applied"""
    trust_checkpoint: bool = False
    """load --resume files that are not weights-only (written by old versions): only from a source you trust,
    since unpickling such a file can run code"""
    checkpoint_every_minutes: float = 10.0
    """also write diffusion.pt every this many minutes (and on SIGTERM / SIGINT / SIGUSR1, then exit 75)"""

    # Algorithm specific arguments
    env_id: str = "lift"
    """lift, can, square or cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0"""
    dataset_path: Optional[str] = None
    """dataset file; default: the official file if present, else generated scripted / oracle data"""
    total_steps: int = 20_000
    """number of gradient steps"""
    batch_size: int = 256
    """observations per batch (B); one noised demo chunk each"""
    num_diffusion_steps: int = 100
    """DDPM training timesteps T (squared-cosine schedule), as Diffusion Policy"""
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """ddpm: ancestral sampling (Diffusion Policy's sim setting with K = T); ddim: deterministic, eta = 0"""
    inference_steps: int = 100
    """denoising steps K = network calls per chunk (1 <= K <= T); e.g. --sampler ddim --inference-steps 10"""
    backbone: Literal["mlp", "unet"] = "mlp"
    """mlp, or unet: Diffusion Policy's 1-D conditional U-Net (needs H % 4 == 0)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """MLP hidden layer sizes"""
    unet_dims: tuple[int, ...] = (64, 128, 256)
    """U-Net channels per level (Diffusion Policy low-dim: (256, 512, 1024), far beyond a CPU)"""
    time_dim: int = 64
    """diffusion-step embedding size (sinusoidal, then Linear-Mish-Linear)"""
    # Horizons (To = 2, H = 6, Ta = 4 drawn; the defaults are To = 1, H = Ta = 4 as in DBP's low-dim configs):
    #   observations  |o(t-1)|o(t) |
    #   predicted     |a(t-1)|a(t) |a(t+1)|a(t+2)|a(t+3)|a(t+4)|
    #   executed             |a(t) |a(t+1)|a(t+2)|a(t+3)|          chunk steps To-1 ... To+Ta-2
    n_obs_steps: int = 1
    """observation history To"""
    horizon: int = 4
    """predicted chunk length H"""
    n_action_steps: int = 4
    """actions executed per chunk Ta before re-planning"""
    learning_rate: float = 3e-4
    """AdamW learning rate (cosine decay after a linear warm-up); dbp_bc.py's, for an equal budget (DP: 1e-4)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    warmup_steps: int = 500
    """linear learning-rate warm-up steps"""
    max_grad_norm: float = 10.0
    """gradient clipping norm"""
    ema_power: float = 0.75
    """EMA decay schedule 1 - (1 + step)^-power, as in Diffusion Policy"""
    ema_max_decay: float = 0.9999
    """cap of the EMA decay"""
    eval_every: int = 5_000
    """evaluate (and checkpoint) every this many steps"""
    eval_episodes: int = 50
    """episodes per periodic evaluation"""
    final_eval_episodes: int = 100
    """episodes for the final evaluation of the final and the best checkpoint (on unseen seeds)"""
    num_eval_envs: int = 2
    """parallel evaluation envs (subprocesses)"""
    max_episode_steps: Optional[int] = None
    """evaluation time limit (none: QC / DFP's 300 / 300 / 400 on lift / can / square; DBP's paper uses 400)"""


# `--preset cpu`: dbp_bc.py's CPU budget on lift (the equal-budget comparison of docs/diffusion_bc.md).
PRESETS = {"cpu": {"lift": dict(total_steps=20_000, eval_every=5_000)}}
# Flags that may change on --resume (the rest define the run and must not).
RESUMABLE = ("total_steps", "eval_every", "eval_episodes", "final_eval_episodes", "num_eval_envs", "max_episode_steps",
             "checkpoint_every_minutes", "threads", "cuda", "track", "capture_video", "save_model")

if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, PRESETS, "baselines.diffusion_bc", RESUMABLE)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ALGO LOGIC: the noise schedule and one denoising step.
def squared_cosine_alphas_cumprod(T, max_beta=0.999):
    """abar_t for t = 0..T-1 (float64), diffusers' squaredcos_cap_v2: beta_t = min(1 - f(t+1) / f(t), 0.999),
    f(t) = cos^2((t / T + 0.008) / 1.008 * pi / 2), abar_t = prod_{s <= t} (1 - beta_s). Only beta_{T-1} is capped."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(t + 1) / f(t), max_beta) for t in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def inference_timesteps(T, K):
    """K timesteps from T-1 down, evenly spaced ("trailing"): K = T gives T-1, ..., 0; T = 100, K = 10: 99, ..., 9."""
    return [round(T - k * T / K) - 1 for k in range(K)]


def denoise_step(x, eps, abar_t, abar_prev, noise=None):
    """x_t -> x_prev with predicted noise eps; abar_prev = 1 at the end of the chain (the output is then x_0).

    The generalised DDIM step with eta = 0 (noise None: deterministic) or eta = 1 (noise given). With eta = 1 it
    is exactly the DDPM posterior q(x_prev | x_t, x_0) with variance (1 - abar_prev) / (1 - abar_t) * beta, beta =
    1 - abar_t / abar_prev, for consecutive or strided timesteps (tests/test_baselines.py checks the identity).
    """
    x0 = ((x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1, 1)  # clipped, as Diffusion Policy
    eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)  # the noise consistent with the clipped x_0
    sigma = 0.0 if noise is None else math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    return x + sigma * noise if sigma > 0 else x


# ALGO LOGIC: time-conditioned networks eps(x_t, t, obs), with min-max normalisation as buffers.
class TimeEmbedding(nn.Module):
    """Diffusion step t [B] -> [B, dim]: sinusoidal features, then Linear-Mish-Linear (Diffusion Policy's encoder)."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / (half - 1)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


def mlp(in_dim, hidden_dims, out_dim, act=nn.ReLU):
    layers, dims = [], [in_dim, *hidden_dims]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act()]
    net = nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))
    for m in net:  # He init, as dbp_bc.py, so the two MLP backbones are the same network
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu"), nn.init.zeros_(m.bias)
    return net


class MLPNet(nn.Module):
    """x_t [B, H, Da], t [B], condition [B, To*Do] -> eps [B, H, Da]: an MLP on concat(condition, emb(t), flat x_t)."""

    def __init__(self, action_dim, cond_dim, horizon, hidden_dims=(256, 256, 256), time_dim=64):
        super().__init__()
        self.time_emb = TimeEmbedding(time_dim)
        self.net = mlp(cond_dim + time_dim + horizon * action_dim, hidden_dims, horizon * action_dim)

    def forward(self, x, t, cond):
        return self.net(torch.cat([cond, self.time_emb(t), x.flatten(1)], dim=-1)).view(x.shape)


class ResBlock1d(nn.Module):
    """Two (Conv1d k5, GroupNorm 8, Mish), FiLM of the global condition after the first; 1x1 skip."""

    def __init__(self, c_in, c_out, cond_dim):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv1d(c_in, c_out, 5, padding=2), nn.GroupNorm(8, c_out), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(c_out, c_out, 5, padding=2), nn.GroupNorm(8, c_out), nn.Mish())
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cond):
        scale, bias = self.film(cond)[..., None].chunk(2, dim=1)
        return self.conv2(scale * self.conv1(x) + bias) + self.skip(x)


class UNet1d(nn.Module):
    """Diffusion Policy's conditional 1-D U-Net: x_t [B, H, Da], t [B], condition -> eps [B, H, Da]. The step
    embedding is concatenated to the observation condition, and the result drives every block's FiLM."""

    def __init__(self, action_dim, cond_dim, dims=(64, 128, 256), time_dim=64):
        super().__init__()
        self.time_emb = TimeEmbedding(time_dim)
        chans, cond_dim = [action_dim, *dims], cond_dim + time_dim
        self.down = nn.ModuleList(
            nn.ModuleList([ResBlock1d(a, b, cond_dim), ResBlock1d(b, b, cond_dim),
                           nn.Conv1d(b, b, 3, stride=2, padding=1) if i < len(dims) - 1 else nn.Identity()])
            for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])))
        self.mid = nn.ModuleList([ResBlock1d(dims[-1], dims[-1], cond_dim) for _ in range(2)])
        self.up = nn.ModuleList(
            nn.ModuleList([ResBlock1d(2 * b, a, cond_dim), ResBlock1d(a, a, cond_dim), nn.ConvTranspose1d(a, a, 4, 2, 1)])
            for a, b in reversed(list(zip(dims[:-1], dims[1:]))))
        self.final = nn.Sequential(nn.Conv1d(dims[0], dims[0], 5, padding=2), nn.GroupNorm(8, dims[0]), nn.Mish(),
                                   nn.Conv1d(dims[0], action_dim, 1))

    def forward(self, x, t, cond):
        cond, x, skips = torch.cat([self.time_emb(t), cond], dim=-1), x.transpose(1, 2), []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = upsample(block2(block1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final(x).transpose(1, 2)


class DiffusionPolicy(nn.Module, common.ActMixin):
    """chunk = K denoising steps from z: obs history [To, Do] -> action chunk [H, Da]; all the noise is in z."""

    def __init__(self, obs_dim, action_dim, n_obs_steps, horizon, n_action_steps, backbone="mlp",
                 hidden_dims=(256, 256, 256), unet_dims=(64, 128, 256), time_dim=64, num_diffusion_steps=100,
                 sampler="ddpm", inference_steps=100):
        super().__init__()
        assert 1 <= inference_steps <= num_diffusion_steps, "need 1 <= inference_steps <= num_diffusion_steps"
        self.obs_dim, self.action_dim, self.n_obs_steps = obs_dim, action_dim, n_obs_steps
        self.horizon, self.n_action_steps, self.sampler = horizon, n_action_steps, sampler
        self.noise_shape = (inference_steps, horizon, action_dim) if sampler == "ddpm" else (horizon, action_dim)
        self.alphas_cumprod = squared_cosine_alphas_cumprod(num_diffusion_steps).tolist()  # python floats, float64
        self.timesteps = inference_timesteps(num_diffusion_steps, inference_steps)
        cond_dim = n_obs_steps * obs_dim
        if backbone == "unet":
            self.net = UNet1d(action_dim, cond_dim, unet_dims, time_dim)
        else:
            self.net = MLPNet(action_dim, cond_dim, horizon, hidden_dims, time_dim)
        for name, dim in (("obs", obs_dim), ("act", action_dim)):  # min-max normalisers, filled from the data
            self.register_buffer(f"{name}_min", -torch.ones(dim))
            self.register_buffer(f"{name}_max", torch.ones(dim))

    def set_normalizer(self, obs, actions):
        for name, x in (("obs", obs), ("act", actions)):
            getattr(self, f"{name}_min").copy_(torch.as_tensor(x.min(0)))
            getattr(self, f"{name}_max").copy_(torch.as_tensor(x.max(0)))

    def normalize_obs(self, obs):  # -> [-1, 1]
        return 2 * (obs - self.obs_min) / (self.obs_max - self.obs_min).clamp_min(1e-4) - 1

    def normalize_action(self, a):
        return 2 * (a - self.act_min) / (self.act_max - self.act_min).clamp_min(1e-4) - 1

    def unnormalize_action(self, a):
        return (a + 1) / 2 * (self.act_max - self.act_min).clamp_min(1e-4) + self.act_min

    def sample(self, obs_n, z):
        """Normalised space: obs_n [B, To, Do], z [B, *noise_shape] -> chunk [B, H, Da] after K network calls."""
        cond, x = obs_n.flatten(1), z[:, 0] if self.sampler == "ddpm" else z
        for k, t in enumerate(self.timesteps):
            t_prev = self.timesteps[k + 1] if k + 1 < len(self.timesteps) else -1  # -1: the clean chunk
            eps = self.net(x, torch.full_like(x[:, 0, 0], t), cond)  # t as [B] (full_like: a batch-general trace)
            noise = z[:, k + 1] if self.sampler == "ddpm" and t_prev >= 0 else None
            x = denoise_step(x, eps, self.alphas_cumprod[t], self.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0, noise)
        return x

    def forward(self, obs, z):
        """Raw observation history [B, To, Do] and noise [B, *noise_shape] -> the actions from the current step on,
        [B, H - To + 1, Da] in [-1, 1] (the chunk starts To - 1 steps in the past); execute the first Ta."""
        chunk = self.unnormalize_action(self.sample(self.normalize_obs(obs), z)).clamp(-1, 1)
        return chunk[:, self.n_obs_steps - 1:]


def policy_from_checkpoint(ckpt, device="cpu", use_ema=True, sampler=None, inference_steps=None):
    """Used by common.load_policy: rebuild the policy from a diffusion.pt checkpoint alone. sampler and
    inference_steps override the trained setting (the weights do not depend on them)."""
    overrides = {k: v for k, v in dict(sampler=sampler, inference_steps=inference_steps).items() if v is not None}
    policy = DiffusionPolicy(**{**ckpt["policy_kwargs"], **overrides}).to(device)
    policy.load_state_dict(ckpt["ema_model" if use_ema else "model"])
    return policy


def sequence_indices(terminals, n_obs_steps, horizon):
    """Per dataset index t: observation indices t-To+1..t and action indices t-To+1..t-To+H, clamped to
    t's episode (repeating the first observation / last action at the edges, as Diffusion Policy pads)."""
    ends = np.flatnonzero(terminals)
    starts = np.concatenate([[0], ends[:-1] + 1])
    ep = np.repeat(np.arange(len(ends)), ends - starts + 1)
    t = np.arange(len(terminals))[:, None]
    obs_idx = np.clip(t + np.arange(-n_obs_steps + 1, 1), starts[ep][:, None], ends[ep][:, None])
    act_idx = np.clip(t + np.arange(-n_obs_steps + 1, horizon - n_obs_steps + 1), starts[ep][:, None], ends[ep][:, None])
    return obs_idx, act_idx


if __name__ == "__main__":
    environments.check_env_id(args.env_id)
    common.require_positive(args, "total_steps", "batch_size", "learning_rate", "warmup_steps", "eval_every",
                            "eval_episodes", "final_eval_episodes", "num_eval_envs", "n_obs_steps", "horizon",
                            "n_action_steps", "max_episode_steps", "num_diffusion_steps", "checkpoint_every_minutes")
    common.require(args.n_obs_steps + args.n_action_steps - 1 <= args.horizon, "need To + Ta - 1 <= H "
                   f"(--n-obs-steps {args.n_obs_steps}, --n-action-steps {args.n_action_steps}, --horizon {args.horizon})")
    common.require(args.backbone != "unet" or args.horizon % 4 == 0,
                   f"the U-Net downsamples twice: --horizon must be divisible by 4, not {args.horizon}")
    common.require(1 <= args.inference_steps <= args.num_diffusion_steps,
                   "need 1 <= --inference-steps <= --num-diffusion-steps")

    # TRY NOT TO MODIFY: seeding and CPU threads
    common.set_seed(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # Data: (observation history, demo chunk) pairs, indexed once, sampled on the device.
    data = environments.load_dataset(args.env_id, args.dataset_path)
    args.dataset_path = data["dataset_path"]  # args.json records the file actually used
    obs_idx, act_idx = sequence_indices(data["terminals"], args.n_obs_steps, args.horizon)
    obs_all = torch.as_tensor(data["observations"], device=device)
    act_all = torch.as_tensor(data["actions"], device=device)
    obs_idx, act_idx = torch.as_tensor(obs_idx, device=device), torch.as_tensor(act_idx, device=device)
    print(f"{args.env_id}: {len(obs_all)} transitions from {data['dataset_path']}")

    policy_kwargs = dict(obs_dim=obs_all.shape[1], action_dim=act_all.shape[1], n_obs_steps=args.n_obs_steps,
                         horizon=args.horizon, n_action_steps=args.n_action_steps, backbone=args.backbone,
                         hidden_dims=args.hidden_dims, unet_dims=args.unet_dims, time_dim=args.time_dim,
                         num_diffusion_steps=args.num_diffusion_steps, sampler=args.sampler,
                         inference_steps=args.inference_steps)
    policy = DiffusionPolicy(**policy_kwargs).to(device)
    policy.set_normalizer(data["observations"], data["actions"])
    ema_policy = DiffusionPolicy(**policy_kwargs).to(device).requires_grad_(False)
    ema_policy.load_state_dict(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_lambda = lambda s: min(1.0, (s + 1) / args.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / args.total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    data_rng = torch.Generator(device=device).manual_seed(args.seed)
    start_step, best_success, wall_time = 0, -1.0, 0.0
    if ckpt:
        policy.load_state_dict(ckpt["model"]), ema_policy.load_state_dict(ckpt["ema_model"])
        optimizer.load_state_dict(ckpt["optimizer"]), scheduler.load_state_dict(ckpt["scheduler"])
        data_rng.set_state(ckpt["data_rng"].to(data_rng.get_state().device))
        common.set_rng_state(ckpt["rng"])
        start_step, best_success, wall_time = ckpt["step"], ckpt["best_success"], ckpt["wall_time_s"]
        print(f"resuming {ckpt['run_name']} from step {start_step}")
    run_name, run_dir, writer = common.make_run(args, ckpt and ckpt["run_name"], ckpt and ckpt["step"] + 1)
    t_start = time.time() - wall_time

    def save(path, step):
        common.save_checkpoint(path, dict(
            script="baselines.diffusion_bc", policy_module="baselines.diffusion_bc", policy_kwargs=policy_kwargs,
            model=policy.state_dict(), ema_model=ema_policy.state_dict(), optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), data_rng=data_rng.get_state(), rng=common.rng_state(), args=vars(args),
            run_name=run_name, env_id=args.env_id, step=step, best_success=best_success,
            dataset_path=data["dataset_path"], wall_time_s=time.time() - t_start))

    B, T = args.batch_size, args.num_diffusion_steps
    abar = torch.tensor(policy.alphas_cumprod, dtype=torch.float32, device=device)
    progress = common.Progress("diffusion_bc", args.total_steps, start_step, hint="On a GPU, use --cuda.")
    checkpointing = common.Checkpointing(args.checkpoint_every_minutes)
    for step in range(start_step + 1, args.total_steps + 1):
        # ALGO LOGIC: one training step
        idx = torch.randint(len(obs_all), (B,), device=device, generator=data_rng)
        obs_n = policy.normalize_obs(obs_all[obs_idx[idx]])  # [B, To, Do]
        demo_n = policy.normalize_action(act_all[act_idx[idx]])  # [B, H, Da]: x_0
        # Forward process: a random timestep per chunk, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
        t = torch.randint(T, (B,), device=device)
        noise = torch.randn_like(demo_n)
        abar_t = abar[t][:, None, None]
        x_t = abar_t.sqrt() * demo_n + (1 - abar_t).sqrt() * noise
        # Epsilon-prediction loss.
        loss = F.mse_loss(policy.net(x_t, t, obs_n.flatten(1)), noise)
        if not torch.isfinite(loss):
            raise common.UserError(f"the training loss became non-finite ({loss.item()}) at step {step}; the last good "
                                   f"checkpoint is {os.path.join(run_dir, 'diffusion.pt')}. Lower --learning-rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        decay = min(args.ema_max_decay, 1 - (1 + step) ** -args.ema_power)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_policy.parameters()), list(policy.parameters()), 1 - decay)
        progress.update()

        # TRY NOT TO MODIFY: logging
        if step % 100 == 0:
            writer.add_scalar("losses/loss", loss.item(), step)
            writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("charts/SPS", progress.rates()[0], step)  # training steps/s, evaluations excluded
        if step % args.eval_every == 0 or step == args.total_steps:
            result = environments.evaluate(ema_policy.act, args.env_id, args.eval_episodes, args.n_obs_steps, args.n_action_steps,
                                     num_envs=args.num_eval_envs, max_episode_steps=args.max_episode_steps)
            for k, v in result.items():
                writer.add_scalar(f"eval/{k}", v, step)
            progress.evaluation(f"success {result['success_rate']:.2f} over {result['episodes']} episodes")
            if args.save_model and result["success_rate"] > best_success:
                best_success = result["success_rate"]
                save(os.path.join(run_dir, "diffusion_best.pt"), step)
        if args.save_model and (step % args.eval_every == 0 or step == args.total_steps or checkpointing.due()):
            save(os.path.join(run_dir, "diffusion.pt"), step)
            checkpointing.saved(os.path.join(run_dir, "diffusion.pt"), step, writer)  # exits here after a stop signal
    progress.close()

    # Final evaluation of the final and the best checkpoint, on seeds the periodic evaluation never used.
    final_seed, final = environments.EVAL_SEED_OFFSET + 50_000, {}
    for tag in ("final", "best") if args.save_model else ("final",):
        best_path = os.path.join(run_dir, "diffusion_best.pt")
        eval_policy = ema_policy if tag == "final" else common.load_policy(best_path, device)
        final[tag] = environments.evaluate(eval_policy.act, args.env_id, args.final_eval_episodes, args.n_obs_steps,
                                     args.n_action_steps, seed=final_seed, num_envs=args.num_eval_envs,
                                     max_episode_steps=args.max_episode_steps)
        writer.add_scalar(f"eval/{tag}_success_rate", final[tag]["success_rate"], args.total_steps)
        print(f"{tag} checkpoint: success {final[tag]['success_rate']:.3f} over {final[tag]['episodes']} episodes")
    common.write_results(run_dir, args, "baselines.diffusion_bc", steps=args.total_steps,
                         final_success=final["final"]["success_rate"], final_episodes=final["final"]["episodes"],
                         best_success=final["best"]["success_rate"] if "best" in final else None,
                         wall_time_s=time.time() - t_start)
    if args.capture_video:
        environments.record_video(ema_policy.act, args.env_id, os.path.join(run_dir, "videos", "final.mp4"),
                            args.n_obs_steps, args.n_action_steps, max_episode_steps=args.max_episode_steps)
    writer.close()
