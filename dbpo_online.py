"""DBPO: online PPO fine-tuning of a pretrained DBP policy that still deploys in one network call.

Paper: DBP / DBPO (arXiv 2604.03540). The one-step generator mu = f(z, s) of dbp_bc.py becomes the
mean of a Gaussian whose noise z is an observed input: z ~ N(0, I), a = mu + sigma(s) * xi. Storing z
in the rollout buffer makes the likelihood an exact diagonal Gaussian, so plain clipped PPO applies.
An anchor loss keeps f close to the frozen pretrained policy at the same z. Deployment drops sigma:
a = f(z, s), one call, loadable by common.load_policy and robot_deploy.py unchanged.

Shapes
    N   parallel envs          T   chunk decisions per env per iteration     To  observation history
    H   predicted chunk        Ta  executed actions per decision (rewards summed over them)
    Do, Da   observation / action dims; the Gaussian lives in the normalised action space [-1, 1]
"""

import copy
import glob
import math
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional

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
    """whether to save runs/{run_name}/dbpo.pt (a dbp_bc-format policy plus the PPO state, resumable)"""
    preset: str = "paper"
    """paper: the paper's settings below; cpu: the measured CPU recipe of --env-id (PRESETS; README)"""
    resume: Optional[str] = None
    """path of a dbpo.pt checkpoint to continue; budget and evaluation flags given with it are applied"""
    trust_checkpoint: bool = False
    """load --checkpoint / --resume files that are not weights-only (written by old versions): only from a source
    you trust, since unpickling such a file can run code"""
    checkpoint_every_minutes: float = 10.0
    """also write dbpo.pt at the first iteration end after this many minutes (and on SIGTERM / SIGINT / SIGUSR1:
    the last finished iteration, then exit 75)"""

    # Algorithm specific arguments
    env_id: str = "lift"
    """lift, can, square or cube-{double,triple,quadruple}-play-singletask-task{1..5}-v0"""
    checkpoint: Optional[str] = None
    """dbp.pt from dbp_bc.py to fine-tune; if None, a short DBP pretraining runs first"""
    pretrain_steps: int = 3_000
    """gradient steps of that short pretraining (when no --checkpoint is given)"""
    dataset_path: Optional[str] = None
    """dataset of that short pretraining (default: dbp_bc.py's default data)"""
    num_iterations: int = 1_500
    """PPO iterations (the length of the cosine learning-rate schedule)"""
    stop_iteration: Optional[int] = None
    """end the run after this iteration, evaluating and saving there (default: --num-iterations); the learning
    rates still follow the schedule over --num-iterations"""
    num_envs: int = 40
    """parallel envs (subprocesses; CPU preset: 16)"""
    num_steps: int = 500
    """chunk decisions per env per iteration (CPU preset: 64)"""
    update_epochs: int = 5
    """PPO epochs per iteration"""
    minibatch_size: int = 50_000
    """samples per minibatch (>= the batch: one full-batch step per epoch, as DBPO)"""
    gamma: float = 0.99
    """discount per chunk decision"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.02
    """PPO ratio clip"""
    target_kl: float = 0.02
    """stop the epoch loop when the approximate KL exceeds this"""
    ent_coef: float = 0.01
    """entropy coefficient"""
    vf_coef: float = 0.5
    """value-loss coefficient"""
    anchor_coef: float = 1.0
    """anchor coefficient: MSE to the frozen pretrained policy at the same z"""
    actor_lr: float = 1e-5
    """actor learning rate (cosine to actor_lr_min)"""
    actor_lr_min: float = 3e-6
    """final actor learning rate"""
    critic_lr: float = 1e-4
    """critic learning rate (cosine to critic_lr_min)"""
    critic_lr_min: float = 3e-5
    """final critic learning rate"""
    lr_warmup_iters: int = 10
    """linear learning-rate warm-up iterations"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    max_grad_norm: float = 0.5
    """gradient clipping, applied to actor and critic separately"""
    critic_warmup_iters: int = 5
    """iterations that train only the critic"""
    sigma_init: float = 0.03
    """initial exploration std (normalised action units)"""
    sigma_min: float = 0.03
    """lower clamp of the std (also the minimum sampling std)"""
    sigma_max: float = 0.10
    """upper clamp of the std"""
    logprob_min: float = -2.0
    """per-dimension log-probabilities are clamped from below here"""
    chunk_baseline: bool = False
    """value baseline V(s, f(z, s)) instead of V(s): it also sees the mean chunk that z picked (not in the paper).
    z is drawn before the Gaussian perturbation, so the policy gradient stays unbiased, and the return variance
    that z explains (which mode the chunk commits to) leaves the advantage (docs/dbpo_online.md)"""
    clip_logprob_action: bool = True
    """the paper: the log-prob is of the action clipped to [-1, 1]. --no-clip-logprob-action: of the unclipped
    Gaussian sample (the env still gets the clipped one), so a mean saturated past +-1 keeps its gradient"""
    eval_every: int = 10
    """evaluate (deterministic: sigma off) and checkpoint every this many iterations"""
    eval_episodes: int = 50
    """episodes per evaluation (also before the first update)"""
    num_eval_envs: int = 2
    """parallel evaluation envs"""
    reward_shaping: bool = False
    """add potential-based shaping to the sparse training reward (not in the paper; Robomimic tasks only):
    gamma * Phi(s') - Phi(s) per decision, Phi = robosuite's dense staged reward (reaching, grasping, ...).
    It leaves the optimal policy unchanged and gives credit before the first success (see ChunkEnv)"""
    max_episode_steps: Optional[int] = None
    """time limit of the training and evaluation episodes (none: QC / DFP's 300 / 300 / 400 on lift / can /
    square; DBPO's Robomimic online config uses 400)"""


# The measured CPU recipe (README, docs/dbpo_online.md), one flag away: `--preset cpu`. Explicit flags still win.
# A deliberately short DBP pretraining (6k steps: 30-70% success, room to improve), then 80 iterations of 16 envs x
# 64 decisions with the learning rates of a 200-iteration schedule. Deviations from the paper's settings, each
# measured (docs/dbpo_online.md): PPO clip 0.1, exploration std 0.2, actor lr 3e-5 -> 1e-5, the log-prob of the
# unclipped sample, and the chunk baseline V(s, f(z, s)).
PRESETS = {"cpu": {"lift": dict(
    pretrain_steps=6_000, num_envs=16, num_steps=64, num_iterations=200, stop_iteration=80, critic_warmup_iters=10,
    update_epochs=5, minibatch_size=256, clip_coef=0.1, sigma_init=0.2, sigma_max=0.2, actor_lr=3e-5,
    actor_lr_min=1e-5, clip_logprob_action=False, anchor_coef=1.0, chunk_baseline=True, eval_every=80,
    eval_episodes=100, num_eval_envs=4)}}
# Flags that may change on --resume (the rest define the run and must not).
RESUMABLE = ("num_iterations", "stop_iteration", "eval_every", "eval_episodes", "num_eval_envs",
             "checkpoint_every_minutes", "threads", "cuda", "track", "capture_video", "save_model")

if __name__ == "__main__":
    args, ckpt = common.parse_args(Args, PRESETS, "dbpo_online", RESUMABLE)

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ChunkEnv(gym.Wrapper):
    """One decision = one chunk: executes Ta actions (stopping at an episode end), sums their rewards,
    and observes the last To observations. Runs inside each subprocess of the vector env.

    shaping_gamma: if set, adds potential-based shaping gamma * Phi(s') - Phi(s) per decision (Ng et al. 1999),
    Phi = info["potential"] and Phi = 0 after a termination. Over an episode the terms telescope to -Phi(s_0)
    plus a bootstrapped tail, so the optimal policy is unchanged; only the credit arrives earlier."""

    def __init__(self, env, n_obs_steps, n_action_steps, shaping_gamma=None):
        super().__init__(env)
        self.To, self.Ta, self.shaping_gamma = n_obs_steps, n_action_steps, shaping_gamma
        box = env.observation_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.To, *box.shape), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.Ta, *env.action_space.shape), np.float32)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.history = deque([obs] * self.To, maxlen=self.To)
        self.potential = info.get("potential", 0.0)
        return np.stack(self.history), info

    def step(self, chunk):
        total = 0.0
        for action in chunk:
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.history.append(obs)
            total += reward
            if terminated or truncated:
                break
        if self.shaping_gamma is not None:
            potential = 0.0 if terminated else info["potential"]
            total += self.shaping_gamma * potential - self.potential
            self.potential = potential
        return np.stack(self.history), total, terminated, truncated, info


class GaussianHead(nn.Module):
    """log sigma(s) = Linear(normalised obs history), zero weights and bias log(sigma_init): sigma starts
    state-independent; clamped to [sigma_min, sigma_max]."""

    def __init__(self, cond_dim, chunk_dim, sigma_init, sigma_min, sigma_max):
        super().__init__()
        self.proj = nn.Linear(cond_dim, chunk_dim)
        nn.init.zeros_(self.proj.weight), nn.init.constant_(self.proj.bias, math.log(sigma_init))
        self.log_min, self.log_max = math.log(sigma_min), math.log(sigma_max)

    def forward(self, obs_n):
        return self.proj(obs_n.flatten(1)).clamp(self.log_min, self.log_max).exp()


def value_net(cond_dim, hidden=256):
    return nn.Sequential(nn.Linear(cond_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(),
                         nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, 1))


# ALGO LOGIC: the exact Gaussian likelihood over the executed prefix of the chunk.
def executed_logprob(mu, sigma, action, start, n_action_steps, logprob_min):
    """log N(action; mu, sigma^2) summed over the executed steps [start, start + Ta) and all Da dims, divided
    by Ta * Da (a per-dimension mean, so the PPO ratio is a per-dimension geometric mean), clamped below."""
    sl = slice(start, start + n_action_steps)
    logp = torch.distributions.Normal(mu[:, sl], sigma[:, sl]).log_prob(action[:, sl])
    return logp.mean(dim=(1, 2)).clamp_min(logprob_min)


def critic_input(obs_n, mu, chunk_baseline):
    """V(s) sees the flattened normalised observation history; V(s, f(z, s)) the mean chunk too."""
    return torch.cat([obs_n.flatten(1), mu.flatten(1)], 1) if chunk_baseline else obs_n.flatten(1)


def dbpo_loss(policy, sigma_head, critic, anchor, obs, z, action, old_logp, adv, returns, args, old_mu=None):
    """PPO loss on a minibatch: clipped surrogate - entropy + value loss + anchor. mu is recomputed with the
    stored z, so the ratio is an exact Gaussian likelihood ratio. old_mu (the rollout's mean chunk) is the
    critic's second input with --chunk-baseline. Returns (loss, info)."""
    To, Ta = policy.n_obs_steps, policy.n_action_steps
    obs_n = policy.normalize_obs(obs)
    mu, sigma = policy.generate(obs_n, z), sigma_head(obs_n).view(z.shape)
    new_logp = executed_logprob(mu, sigma, action, To - 1, Ta, args.logprob_min)
    logratio = new_logp - old_logp.clamp_min(args.logprob_min)
    ratio = logratio.exp()
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    # Clipped surrogate.
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
    # Entropy of the Gaussian head (per dimension, over the executed prefix).
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + sigma[:, To - 1: To - 1 + Ta].log()).mean()
    # Value loss.
    v_loss = 0.5 * ((critic(critic_input(obs_n, old_mu, args.chunk_baseline)).squeeze(-1) - returns) ** 2).mean()
    # Anchor loss: stay close to the frozen pretrained policy at the same z.
    with torch.no_grad():
        anchor_mu = anchor.generate(obs_n, z)
    anchor_loss = F.mse_loss(mu, anchor_mu)
    # Total loss.
    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss + args.anchor_coef * anchor_loss
    with torch.no_grad():
        info = {"losses/policy": pg_loss, "losses/value": v_loss, "losses/entropy": entropy,
                "losses/anchor": anchor_loss, "losses/approx_kl": ((ratio - 1) - logratio).mean(),
                "losses/clipfrac": ((ratio - 1).abs() > args.clip_coef).float().mean(), "charts/sigma": sigma.mean(),
                "losses/ratio_max_deviation": (ratio - 1).abs().max(),
                # share of samples at the log-prob floor: they give the actor no gradient (a saturated mu)
                "losses/logprob_clamped": (new_logp <= args.logprob_min).float().mean()}
    return loss, info


def split_cosine(loss_fn, params, mask):
    """Cosine between the gradients of loss_fn(mask) and loss_fn(~mask), two disjoint halves of a batch. If each
    sample's gradient is a signal s plus independent noise n, two halves of B/2 samples give about
    1 / (1 + |n|^2 / (|s|^2 B / 2)): 0 when the noise swamps the signal, near 1 when the batch averages it out."""
    g1, g2 = (torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(m), params)]) for m in (mask, ~mask))
    return F.cosine_similarity(g1, g2, dim=0).item()


def gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Generalised advantage estimation over [T, N] arrays. next_values[t] is V of the observation after
    decision t; at an episode end it is V(final observation) (the reset observation follows). A termination
    zeroes the bootstrap; a truncation (time limit) keeps it. Any episode end stops the trace."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] * (1 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def pretrain_dbp(args):
    """No --checkpoint: train a short DBP policy with dbp_bc.py and return its checkpoint path."""
    print(f"[dbpo] no --checkpoint given: pretraining DBP on {args.env_id} for {args.pretrain_steps} steps first "
          f"(python dbp_bc.py); pass --checkpoint runs/.../dbp.pt to fine-tune your own policy")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dbp_bc.py")
    started = time.time()
    done = subprocess.run([sys.executable, script, "--env-id", args.env_id, "--seed", str(args.seed), "--exp-name",
                           "dbpo_pretrain", "--total-steps", str(args.pretrain_steps), "--eval-every", str(args.pretrain_steps),
                           # no evaluation there: iteration 0 below evaluates these weights
                           "--eval-episodes", "0", "--final-eval-episodes", "0",
                           "--threads", str(args.threads), "--cuda" if args.cuda else "--no-cuda",
                           *(["--dataset-path", args.dataset_path] if args.dataset_path else []),
                           *(["--max-episode-steps", str(args.max_episode_steps)] if args.max_episode_steps else [])])
    found = [p for p in glob.glob(f"runs/{args.env_id}__dbpo_pretrain__{args.seed}__*/dbp.pt") if os.path.getmtime(p) >= started]
    if done.returncode != 0 or not found:
        raise common.UserError(f"the DBP pretraining failed (its message is above; exit status {done.returncode}). "
                               f"Fix that, or pass --checkpoint runs/.../dbp.pt.")
    return os.path.abspath(max(found, key=os.path.getmtime))


if __name__ == "__main__":
    environments.check_env_id(args.env_id)
    common.require_positive(args, "num_iterations", "stop_iteration", "num_envs", "num_steps", "update_epochs",
                            "minibatch_size", "pretrain_steps", "clip_coef", "lr_warmup_iters", "eval_every",
                            "eval_episodes", "num_eval_envs", "sigma_init", "sigma_min", "sigma_max", "max_episode_steps",
                            "checkpoint_every_minutes", "threads")
    common.require(args.stop_iteration is None or args.stop_iteration <= args.num_iterations,
                   f"--stop-iteration {args.stop_iteration} is past --num-iterations {args.num_iterations}")
    common.require(args.sigma_min <= args.sigma_init <= args.sigma_max,
                   f"need --sigma-min <= --sigma-init <= --sigma-max, not {args.sigma_min}, {args.sigma_init}, {args.sigma_max}")
    common.require(not args.reward_shaping or args.env_id in environments.ROBOMIMIC_TASKS,
                   "--reward-shaping needs a Robomimic task (lift, can, square): it uses robosuite's dense reward")
    if args.checkpoint:
        base = common.load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        common.require(base["policy_module"] == "dbp_bc", f"{args.checkpoint} is a {base['policy_module']} checkpoint; "
                                                          f"DBPO fine-tunes dbp_bc.py policies (dbp.pt)")
    else:
        args.checkpoint = pretrain_dbp(args)

    # TRY NOT TO MODIFY: seeding and CPU threads
    common.set_seed(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # The pretrained DBP policy (EMA weights): the actor mean, and a frozen copy for the anchor loss.
    base = common.load_checkpoint(args.checkpoint, device, trust=args.trust_checkpoint)
    policy = common.load_policy(args.checkpoint, device, env_id=args.env_id, trust=args.trust_checkpoint)
    policy = policy.train().requires_grad_(True)
    anchor = copy.deepcopy(policy).requires_grad_(False)
    To, H, Ta, Da = policy.n_obs_steps, policy.horizon, policy.n_action_steps, policy.action_dim
    cond_dim = To * policy.obs_dim
    sigma_head = GaussianHead(cond_dim, H * Da, args.sigma_init, args.sigma_min, args.sigma_max).to(device)
    critic = value_net(cond_dim + H * Da * args.chunk_baseline).to(device)
    actor_params = [*policy.parameters(), *sigma_head.parameters()]
    actor_opt = torch.optim.AdamW(actor_params, lr=args.actor_lr, weight_decay=args.weight_decay)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    nets = dict(model=policy, anchor=anchor, sigma_head=sigma_head, critic=critic, actor_opt=actor_opt, critic_opt=critic_opt)
    start_iter, pretrained_success, last_success, wall_time = 0, None, None, 0.0
    if ckpt:
        for key, net in nets.items():
            net.load_state_dict(ckpt[key])
        common.set_rng_state(ckpt["rng"])
        start_iter, wall_time = ckpt["iteration"], ckpt["wall_time_s"]
        pretrained_success, last_success = ckpt["pretrained_success"], ckpt["last_success"]
        print(f"resuming {ckpt['run_name']} from iteration {start_iter}")
    run_name, run_dir, writer = common.make_run(args, ckpt and ckpt["run_name"], ckpt and ckpt["iteration"] + 1)
    t_start = time.time() - wall_time

    def lr_at(it, lr, lr_min):  # linear warm-up, then cosine to lr_min over all iterations
        warm = min(1.0, (it + 1) / args.lr_warmup_iters)
        return warm * (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * it / args.num_iterations)))

    def snapshot(iteration):
        """Everything a resume needs, as plain data (tensors cloned), at the end of an iteration."""
        return copy.deepcopy(dict(**{key: net.state_dict() for key, net in nets.items()}, rng=common.rng_state(),
                                  iteration=iteration, pretrained_success=pretrained_success, last_success=last_success,
                                  wall_time_s=time.time() - t_start))

    def save(state):  # dbp_bc format (load_policy, robot_deploy) plus the PPO state
        path = os.path.join(run_dir, "dbpo.pt")
        common.save_checkpoint(path, {**{k: base[k] for k in ("policy_module", "policy_kwargs", "dataset_path")}, **state,
                                      "script": "dbpo_online", "ema_model": state["model"], "step": state["iteration"],
                                      "args": vars(args), "run_name": run_name, "env_id": args.env_id,
                                      "pretrained": args.checkpoint})
        return path

    def evaluate(iteration):  # deterministic: a = f(z, s) with a fresh z and sigma off, one call
        result = environments.evaluate(policy.act, args.env_id, args.eval_episodes, To, Ta, num_envs=args.num_eval_envs,
                                 max_episode_steps=args.max_episode_steps)
        for k, v in result.items():
            writer.add_scalar(f"eval/{k}", v, iteration)
        return result

    last_iteration = args.stop_iteration or args.num_iterations
    progress = common.Progress("dbpo", last_iteration, start_iter, unit="iteration",
                               hint="For a CPU, try --preset cpu; on a GPU, --cuda.")
    if start_iter == 0:
        pretrained_success = last_success = evaluate(0)["success_rate"]
        progress.evaluation(f"pretrained policy: deterministic success {pretrained_success:.2f} over {args.eval_episodes} episodes")
    checkpointing = common.Checkpointing(args.checkpoint_every_minutes)
    state = snapshot(start_iter)
    shaping_kw = dict(report_potential=True) if args.reward_shaping else {}
    shaping_gamma = args.gamma if args.reward_shaping else None
    # A resume starts fresh episodes: robosuite's controller state cannot be restored, so the interrupted episodes
    # end at the checkpoint (the rollout buffer holds one iteration, so nothing is spliced; docs/dbpo_online.md).
    envs = environments.make_vec_env(args.env_id, args.num_envs, args.seed + 1000 * start_iter, max_episode_steps=args.max_episode_steps,
                               wrapper=lambda env: ChunkEnv(env, To, Ta, shaping_gamma), **shaping_kw)
    N, T = args.num_envs, args.num_steps
    obs_buf = torch.zeros(T, N, To, policy.obs_dim, device=device)
    z_buf, mu_buf, act_buf = (torch.zeros(T, N, H, Da, device=device) for _ in range(3))
    logp_buf, value_buf, next_value_buf, reward_buf, term_buf, done_buf = (torch.zeros(T, N, device=device) for _ in range(6))
    next_obs, _ = envs.reset(seed=[args.seed + 1000 * start_iter + i for i in range(N)])
    next_obs, next_z = torch.as_tensor(next_obs, device=device), torch.randn(N, H, Da, device=device)
    ep_return, ep_len = np.zeros(N), np.zeros(N, int)

    def check_finite(name, x, iteration):
        if not torch.isfinite(x).all():
            raise common.UserError(f"{name} became non-finite at iteration {iteration}; the last good checkpoint is "
                                   f"{os.path.join(run_dir, 'dbpo.pt')}. Lower the learning rates, or check the env.")

    for iteration in range(start_iter + 1, last_iteration + 1):
        for opt, lr, lr_min in ((actor_opt, args.actor_lr, args.actor_lr_min), (critic_opt, args.critic_lr, args.critic_lr_min)):
            opt.param_groups[0]["lr"] = lr_at(iteration - 1, lr, lr_min)

        # Rollout: a = clip(mu + sigma * xi, mu +- 3 sigma, [-1, 1]) in normalised action space; store z and a.
        # Each decision's z is drawn one step ahead, so that the bootstrap value can see it (--chunk-baseline).
        for t in range(T):
            if checkpointing.signal and args.save_model:  # a stop signal mid-rollout: keep the last finished iteration
                checkpointing.saved(save(state), state["iteration"], writer)
            with torch.no_grad():
                obs_n, z = policy.normalize_obs(next_obs), next_z
                mu, sigma = policy.generate(obs_n, z), sigma_head(obs_n).view(N, H, Da)
                action = torch.min(torch.max(mu + sigma * torch.randn_like(mu), mu - 3 * sigma), mu + 3 * sigma)
                if args.clip_logprob_action:  # the paper: the log-prob of the action clipped to [-1, 1]
                    action = action.clamp(-1, 1)
                logp = executed_logprob(mu, sigma, action, To - 1, Ta, args.logprob_min)
                value = critic(critic_input(obs_n, mu, args.chunk_baseline)).squeeze(-1)
            check_finite("the policy's mean action", mu, iteration)
            env_chunk = policy.unnormalize_action(action.clamp(-1, 1))[:, To - 1: To - 1 + Ta].clamp(-1, 1)
            obs_np, reward, terminated, truncated, info = envs.step(env_chunk.cpu().numpy())
            obs_buf[t], z_buf[t], mu_buf[t], act_buf[t], logp_buf[t], value_buf[t] = next_obs, z, mu, action, logp, value
            reward_buf[t] = torch.as_tensor(reward, device=device)
            term_buf[t] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
            done = terminated | truncated
            done_buf[t] = torch.as_tensor(done, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(obs_np, device=device)
            check_finite("an observation from the env", next_obs, iteration)
            check_finite("a reward from the env", reward_buf[t], iteration)
            bootstrap_obs = next_obs.clone()
            for i in np.flatnonzero(done):  # V(final observation), not of the reset one
                bootstrap_obs[i] = torch.as_tensor(info["final_obs"][i], device=device)
            with torch.no_grad():  # (after an episode end: V(final obs, f(z', final obs)) with the next z')
                next_z, bootstrap_n = torch.randn(N, H, Da, device=device), policy.normalize_obs(bootstrap_obs)
                next_mu = policy.generate(bootstrap_n, next_z) if args.chunk_baseline else None
                next_value_buf[t] = critic(critic_input(bootstrap_n, next_mu, args.chunk_baseline)).squeeze(-1)
            # TRY NOT TO MODIFY: episode bookkeeping
            ep_return += reward
            ep_len += 1
            for i in np.flatnonzero(done):
                writer.add_scalar("charts/episodic_return", ep_return[i], iteration)
                writer.add_scalar("charts/success", float(info["final_info"]["success"][i]), iteration)
                ep_return[i], ep_len[i] = 0.0, 0

        # Rewards divided by their std within the iteration; GAE per chunk decision.
        rewards = reward_buf / (reward_buf.std() + 1e-8)
        advantages, returns = gae(rewards, value_buf, next_value_buf, term_buf, done_buf, args.gamma, args.gae_lambda)

        # ALGO LOGIC: PPO on the one-step policy, with the anchor to the pretrained policy at the same z.
        b_obs, b_z, b_mu, b_act = obs_buf.flatten(0, 1), z_buf.flatten(0, 1), mu_buf.flatten(0, 1), act_buf.flatten(0, 1)
        b_logp, b_adv, b_ret = logp_buf.flatten(), advantages.flatten(), returns.flatten()
        batch, mb_size = N * T, min(args.minibatch_size, N * T)
        # Diagnostic (not in the paper): the cosine between the policy-gradient estimates of the two halves of
        # the envs; near 0 when the batch is too small for its noise (see split_cosine).
        if N >= 2:
            pg_only = replace(args, ent_coef=0.0, vf_coef=0.0, anchor_coef=0.0)
            pg_loss = lambda m: dbpo_loss(policy, sigma_head, critic, anchor, b_obs[m], b_z[m], b_act[m], b_logp[m],
                                          b_adv[m], b_ret[m], pg_only, b_mu[m])[0]
            halves = torch.arange(batch, device=device) % N < N // 2
            writer.add_scalar("charts/pg_split_cosine", split_cosine(pg_loss, list(policy.parameters()), halves), iteration)
        for epoch in range(args.update_epochs):
            perm = torch.randperm(batch, device=device)
            for start in range(0, batch, mb_size):
                mb = perm[start: start + mb_size]
                loss, info = dbpo_loss(policy, sigma_head, critic, anchor, b_obs[mb], b_z[mb], b_act[mb], b_logp[mb],
                                       b_adv[mb], b_ret[mb], args, b_mu[mb])
                for k, v in info.items():
                    check_finite(k, v, iteration)
                actor_opt.zero_grad(set_to_none=True), critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_opt.step()
                if iteration > args.critic_warmup_iters:  # critic warm-up: no actor step yet
                    nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
                    actor_opt.step()
            if info["losses/approx_kl"] > args.target_kl:
                break
        progress.update()

        # TRY NOT TO MODIFY: logging
        for k, v in {**info, "charts/reward_std": reward_buf.std()}.items():
            writer.add_scalar(k, v.item(), iteration)
        writer.add_scalar("charts/epochs", epoch + 1, iteration)
        writer.add_scalar("charts/actor_lr", actor_opt.param_groups[0]["lr"], iteration)
        writer.add_scalar("charts/SPS", N * T * Ta * (progress.n - progress.start) / max(progress.train_time, 1e-9), iteration)
        evaluate_now = iteration % args.eval_every == 0 or iteration == last_iteration
        if evaluate_now:
            last_success = evaluate(iteration)["success_rate"]
            progress.evaluation(f"deterministic success {last_success:.2f} over {args.eval_episodes} episodes")
        state = snapshot(iteration)
        if args.save_model and (evaluate_now or checkpointing.due()):
            checkpointing.saved(save(state), iteration, writer)  # exits here after a stop signal
    progress.close()

    envs.close()
    common.write_results(run_dir, args, "dbpo_online", steps=last_iteration, final_success=last_success,
                         final_episodes=args.eval_episodes, switch_success=pretrained_success,
                         wall_time_s=time.time() - t_start)
    if args.capture_video:
        environments.record_video(policy.act, args.env_id, os.path.join(run_dir, "videos", "final.mp4"), To, Ta,
                            max_episode_steps=args.max_episode_steps)
    writer.close()
