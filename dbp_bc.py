"""DBP: Drift-Based Policy. Offline imitation with the drifting loss; one network call per action chunk.

Papers: DBP / DBPO (arXiv 2604.03540); the drifting field: "Generative Modeling via Drifting"
(arXiv 2602.04770). A generator chunk = f(z, obs) with z ~ N(0, I) is trained so that its samples
drift onto the demonstration chunks: the target of each generated chunk is the chunk moved along
the drifting field V (attraction to the demo chunk, repulsion from the other generated chunks).
The loss is the only training signal. Acting is ONE forward pass, no iterative sampler.

Shapes
    B   observations (groups) per batch       G   generated chunks per observation
    To  observation history steps             H   predicted chunk length
    Ta  executed actions per chunk            Do, Da   observation / action dims
    S = H * Da   a flattened chunk: one sample of the drifting loss
"""

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
    """whether to save checkpoints (dbp.pt: latest, dbp_best.pt: best periodic evaluation)"""
    preset: str = "paper"
    """paper: the defaults below; cpu: the measured CPU recipe of --env-id (PRESETS; README)"""
    resume: Optional[str] = None
    """path of a dbp.pt checkpoint to continue exactly; budget and evaluation flags given with it are applied"""
    trust_checkpoint: bool = False
    """load --resume files that are not weights-only (written by old versions): only from a source you trust,
    since unpickling such a file can run code"""
    checkpoint_every_minutes: float = 10.0
    """also write dbp.pt every this many minutes (and on SIGTERM / SIGINT / SIGUSR1, then exit 75)"""

    # Algorithm specific arguments
    env_id: str = "lift"
    """lift, can, square or cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0"""
    dataset_path: Optional[str] = None
    """dataset file; default: the official file if present, else generated scripted / oracle data"""
    total_steps: int = 20_000
    """number of gradient steps"""
    batch_size: int = 256
    """observations per batch (B); each one is a group of G generated chunks"""
    gen_per_obs: int = 4
    """generated chunks per observation (G); the other G-1 chunks are the negatives"""
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    """kernel temperatures of the drifting field (relative to the mean pairwise distance)"""
    loss: Literal["drift", "mse"] = "drift"
    """drift: the drifting loss; mse: baseline regression of the demo chunk with z ignored"""
    backbone: Literal["mlp", "unet"] = "mlp"
    """mlp, or unet: Diffusion Policy's 1-D conditional U-Net without the timestep input (needs H % 4 == 0)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """MLP hidden layer sizes"""
    unet_dims: tuple[int, ...] = (64, 128, 256)
    """U-Net channels per level (the paper's (512, 1024, 2048) is far beyond a CPU)"""
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
    """AdamW learning rate (cosine decay after a linear warm-up)"""
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
    """episodes per periodic evaluation (0: none, and no dbp_best.pt)"""
    final_eval_episodes: int = 100
    """episodes for the final evaluation of the final and the best checkpoint (on unseen seeds; 0: none)"""
    num_eval_envs: int = 2
    """parallel evaluation envs (subprocesses)"""
    max_episode_steps: Optional[int] = None
    """evaluation time limit (none: QC / DFP's 300 / 300 / 400 on lift / can / square; DBP's paper uses 400)"""


# The measured CPU recipes (README, docs/dbp_bc.md), one flag away: `--preset cpu`. Explicit flags still win.
# can / square use DART labels (--labels intended) with a larger learning rate; their data is generated on first use.
PRESETS = {"cpu": {
    "lift": dict(total_steps=20_000, eval_every=5_000),
    "can": dict(dataset_path=environments.generated_robomimic_path("can", 500, 0.1, 0.3, "intended", (0.07, 0.4)),
                learning_rate=1e-3, max_episode_steps=400, total_steps=40_000, eval_every=10_000),
    "square": dict(dataset_path=environments.generated_robomimic_path("square", 200, 0.1, 0.3, "intended"),
                   learning_rate=1e-3, total_steps=20_000, eval_every=5_000),
}}
# Flags that may change on --resume (the rest define the run and must not).
RESUMABLE = ("total_steps", "eval_every", "eval_episodes", "final_eval_episodes", "num_eval_envs", "max_episode_steps",
             "checkpoint_every_minutes", "threads", "cuda", "track", "capture_video", "save_model")

if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, PRESETS, "dbp_bc", RESUMABLE)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ALGO LOGIC: the drifting loss (docs/method.md). The same function is copied verbatim into
# dfp_offline_to_online.py; tests/test_drift_loss.py keeps the copies identical.
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


# ALGO LOGIC: the one-step policy chunk = f(z, obs), with min-max normalisation as buffers.
def mlp(in_dim, hidden_dims, out_dim, act=nn.ReLU):
    layers, dims = [], [in_dim, *hidden_dims]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act()]
    net = nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))
    # Variance-preserving (He) init, so the initial chunks spread about as widely as the data. With one
    # positive per group, a generator that starts much tighter than the demos (PyTorch's default init:
    # ~30x tighter) can stay collapsed on the mean of the modes: every positive's affinity sits at the
    # clamp and pulls uniformly. Measured on the two-mode toy of tests/test_dbp.py.
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu"), nn.init.zeros_(m.bias)
    return net


class MLPNet(nn.Module):
    """z [B, H, Da] and condition [B, To*Do] -> chunk [B, H, Da]: an MLP on concat(condition, flat z)."""

    def __init__(self, action_dim, cond_dim, horizon, hidden_dims=(256, 256, 256)):
        super().__init__()
        self.net = mlp(cond_dim + horizon * action_dim, hidden_dims, horizon * action_dim)

    def forward(self, z, cond):
        return self.net(torch.cat([cond, z.flatten(1)], dim=-1)).view(z.shape)


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
    """Diffusion Policy's conditional 1-D U-Net without the diffusion-step input: z [B, H, Da] -> [B, H, Da]."""

    def __init__(self, action_dim, cond_dim, dims=(64, 128, 256)):
        super().__init__()
        chans = [action_dim, *dims]
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

    def forward(self, z, cond):
        x, skips = z.transpose(1, 2), []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = upsample(block2(block1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return self.final(x).transpose(1, 2).contiguous()  # [N, H, Da], viewable as [B, G, H * Da]


class DriftPolicy(nn.Module, common.ActMixin):
    """chunk = f(z, obs): z ~ N(0, I) [H, Da], obs history [To, Do] -> action chunk [H, Da], one call."""

    def __init__(self, obs_dim, action_dim, n_obs_steps, horizon, n_action_steps, backbone="mlp",
                 hidden_dims=(256, 256, 256), unet_dims=(64, 128, 256), zero_noise=False):
        super().__init__()
        self.obs_dim, self.action_dim, self.n_obs_steps = obs_dim, action_dim, n_obs_steps
        self.horizon, self.n_action_steps, self.zero_noise = horizon, n_action_steps, zero_noise
        self.noise_shape = (horizon, action_dim)
        cond_dim = n_obs_steps * obs_dim
        if backbone == "unet":
            self.net = UNet1d(action_dim, cond_dim, unet_dims)
        else:
            self.net = MLPNet(action_dim, cond_dim, horizon, hidden_dims)
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

    def generate(self, obs_n, z):
        """Normalised space: obs_n [B, To, Do], z [B, H, Da] -> normalised chunk [B, H, Da]."""
        if self.zero_noise:  # the --loss mse baseline: a deterministic regressor
            z = torch.zeros_like(z)
        return self.net(z, obs_n.flatten(1))

    def forward(self, obs, z):
        """Raw observation history [B, To, Do] and noise [B, H, Da] -> the actions from the current step on,
        [B, H - To + 1, Da] in [-1, 1] (the chunk starts To - 1 steps in the past); execute the first Ta."""
        chunk = self.unnormalize_action(self.generate(self.normalize_obs(obs), z)).clamp(-1, 1)
        return chunk[:, self.n_obs_steps - 1:]


def policy_from_checkpoint(ckpt, device="cpu", use_ema=True):
    """Used by common.load_policy: rebuild the policy from a dbp.pt checkpoint alone."""
    policy = DriftPolicy(**ckpt["policy_kwargs"]).to(device)
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
    if not args.resume and args.loss == "mse" and args.exp_name == "dbp_bc":
        args.exp_name = "dbp_bc_mse"  # the variant shows in the run name
    environments.check_env_id(args.env_id)
    common.require_positive(args, "total_steps", "batch_size", "gen_per_obs", "learning_rate", "warmup_steps", "eval_every",
                            "num_eval_envs", "n_obs_steps", "horizon",
                            "n_action_steps", "max_episode_steps", "checkpoint_every_minutes", "threads")
    common.require(min(args.eval_episodes, args.final_eval_episodes) >= 0,
                   "--eval-episodes and --final-eval-episodes must be >= 0 (0: no such evaluation)")
    common.require(args.n_obs_steps + args.n_action_steps - 1 <= args.horizon,
                   f"need To + Ta - 1 <= H: --n-obs-steps {args.n_obs_steps} + --n-action-steps {args.n_action_steps} - 1 "
                   f"> --horizon {args.horizon}")
    common.require(args.backbone != "unet" or args.horizon % 4 == 0,
                   f"the U-Net downsamples twice: --horizon must be divisible by 4, not {args.horizon}")

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
                         hidden_dims=args.hidden_dims, unet_dims=args.unet_dims, zero_noise=args.loss == "mse")
    policy = DriftPolicy(**policy_kwargs).to(device)
    policy.set_normalizer(data["observations"], data["actions"])
    ema_policy = DriftPolicy(**policy_kwargs).to(device).requires_grad_(False)
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
            script="dbp_bc", policy_module="dbp_bc", policy_kwargs=policy_kwargs, model=policy.state_dict(),
            ema_model=ema_policy.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            data_rng=data_rng.get_state(), rng=common.rng_state(), args=vars(args), run_name=run_name,
            env_id=args.env_id, step=step, best_success=best_success, dataset_path=data["dataset_path"],
            wall_time_s=time.time() - t_start))

    B, G, H, Da = args.batch_size, args.gen_per_obs, args.horizon, act_all.shape[1]
    progress = common.Progress("dbp_bc", args.total_steps, start_step, hint="For a CPU, try --preset cpu; on a GPU, --cuda.")
    checkpointing = common.Checkpointing(args.checkpoint_every_minutes)
    for step in range(start_step + 1, args.total_steps + 1):
        # ALGO LOGIC: one training step
        idx = torch.randint(len(obs_all), (B,), device=device, generator=data_rng)
        obs_n = policy.normalize_obs(obs_all[obs_idx[idx]])  # [B, To, Do]
        demo_n = policy.normalize_action(act_all[act_idx[idx]])  # [B, H, Da]
        if args.loss == "drift":
            # Drifting loss: G chunks per observation; the positive is that observation's own demo chunk.
            z = torch.randn(B * G, H, Da, device=device)
            gen = policy.generate(obs_n.repeat_interleave(G, dim=0), z).view(B, G, H * Da)
            loss_per_obs, info = drift_loss(gen, demo_n.view(B, 1, H * Da), args.temperatures)
            loss = loss_per_obs.mean()
        else:
            # Baseline: regression of the demo chunk (z is zeroed inside the policy).
            gen = policy.generate(obs_n, torch.zeros_like(demo_n)).view(B, 1, H * Da)
            loss, info = F.mse_loss(gen, demo_n.view(B, 1, H * Da)), {}
        if not torch.isfinite(loss):
            raise common.UserError(f"the training loss became non-finite ({loss.item()}) at step {step}; the last good "
                                   f"checkpoint is {os.path.join(run_dir, 'dbp.pt')}. Lower --learning-rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        decay = min(args.ema_max_decay, 1 - (1 + step) ** -args.ema_power)
        with torch.no_grad():
            torch._foreach_lerp_(list(ema_policy.parameters()), list(policy.parameters()), 1 - decay)
        progress.update()

        # TRY NOT TO MODIFY: logging (the drifting loss is ~constant by construction: watch drift/*)
        if step % 100 == 0:
            with torch.no_grad():
                spread = torch.cdist(gen, gen).sum((1, 2)) / max(G * (G - 1), 1)
                writer.add_scalar("losses/loss", loss.item(), step)
                writer.add_scalar("losses/chunk_mse", F.mse_loss(gen[:, 0], demo_n.flatten(1)).item(), step)
                writer.add_scalar("drift/spread", spread.mean().item(), step)
                for k, v in info.items():
                    writer.add_scalar(f"drift/{k}", v.item(), step)
            writer.add_scalar("losses/grad_norm", grad_norm.item(), step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("charts/SPS", progress.rates()[0], step)  # training steps/s, evaluations excluded
        if args.eval_episodes and (step % args.eval_every == 0 or step == args.total_steps):
            result = environments.evaluate(ema_policy.act, args.env_id, args.eval_episodes, args.n_obs_steps, args.n_action_steps,
                                     num_envs=args.num_eval_envs, max_episode_steps=args.max_episode_steps)
            for k, v in result.items():
                writer.add_scalar(f"eval/{k}", v, step)
            progress.evaluation(f"success {result['success_rate']:.2f} over {result['episodes']} episodes")
            if args.save_model and result["success_rate"] > best_success:
                best_success = result["success_rate"]
                save(os.path.join(run_dir, "dbp_best.pt"), step)
        if args.save_model and (step % args.eval_every == 0 or step == args.total_steps or checkpointing.due()):
            save(os.path.join(run_dir, "dbp.pt"), step)
            checkpointing.saved(os.path.join(run_dir, "dbp.pt"), step, writer)  # exits here after a stop signal
    progress.close()

    # Final evaluation of the final and the best checkpoint, on seeds the periodic evaluation never used.
    final_seed, final = environments.EVAL_SEED_OFFSET + 50_000, {}
    tags = ("final", "best") if args.save_model and args.eval_episodes else ("final",)
    for tag in tags if args.final_eval_episodes else ():
        eval_policy = ema_policy if tag == "final" else common.load_policy(os.path.join(run_dir, "dbp_best.pt"), device)
        final[tag] = environments.evaluate(eval_policy.act, args.env_id, args.final_eval_episodes, args.n_obs_steps,
                                     args.n_action_steps, seed=final_seed, num_envs=args.num_eval_envs,
                                     max_episode_steps=args.max_episode_steps)
        writer.add_scalar(f"eval/{tag}_success_rate", final[tag]["success_rate"], args.total_steps)
        print(f"{tag} checkpoint: success {final[tag]['success_rate']:.3f} over {final[tag]['episodes']} episodes")
    common.write_results(run_dir, args, "dbp_bc", steps=args.total_steps,
                         final_success=final["final"]["success_rate"] if final else None,
                         final_episodes=final["final"]["episodes"] if final else 0,
                         best_success=final["best"]["success_rate"] if "best" in final else None,
                         wall_time_s=time.time() - t_start)
    if args.capture_video:
        environments.record_video(ema_policy.act, args.env_id, os.path.join(run_dir, "videos", "final.mp4"),
                            args.n_obs_steps, args.n_action_steps, max_episode_steps=args.max_episode_steps)
    writer.close()
