"""Milliseconds per action chunk: DBP (one network call) against Diffusion Policy sampling with the same
backbone (100 DDPM steps, 10 DDIM steps, 1 DDIM step), lift-sized by default (Do 19, Da 7, To 1, H = Ta = 4).

    python benchmarks/inference_speed.py                      # MLP 3x256, batch 1 and 32, 1 thread
    python benchmarks/inference_speed.py --backbone unet      # U-Net (64, 128, 256): ~10 min on a busy 2-core CPU
    python benchmarks/inference_speed.py --threads 2 --repeats 300

A timed call is what acting costs: draw z ~ N(0, I) of the policy's noise shape, then policy(obs, z) (normalise,
the network call(s) and sampler arithmetic, unnormalise, clip), under torch.inference_mode. Weights are random
(timing does not depend on them); the diffusion policies share one network. Warm-up calls are left out, and the
methods are timed in interleaved rounds (each round times every method once, in a rotating order), so a change
in the machine's load hits all of them alike. Reported: p50, mean and p95 per chunk, and each method's time over
DBP's. DDIM 1 is there to separate the cost of one diffusion network call (with its step embedding) from
the number of calls: one step from pure noise reads x_0 off at t = 99, where abar_t ~ 2e-7, and acts far worse
than 10 or 100 steps. Rows go to benchmarks/results/inference_speed.csv (rows of the same backbone are replaced,
others kept), with the 1-minute load average when the run started; the plot has one panel per backbone.
"""

import csv
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from baselines.diffusion_bc import DiffusionPolicy  # noqa: E402
from dbp_bc import DriftPolicy  # noqa: E402

FIELDS = ["backbone", "net", "batch", "method", "network_calls", "p50_ms", "mean_ms", "p95_ms", "p50_over_dbp",
          "mean_over_dbp", "threads", "repeats", "load_1min", "device", "torch", "date"]


@dataclass
class Args:
    backbone: Literal["mlp", "unet"] = "mlp"
    """backbone of every method (DBP and diffusion)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """MLP hidden layer sizes (dbp_bc.py's default)"""
    unet_dims: tuple[int, ...] = (64, 128, 256)
    """U-Net channels per level (dbp_bc.py's default)"""
    obs_dim: int = 19
    """observation dim Do (lift: 19, can / square: 23)"""
    action_dim: int = 7
    """action dim Da"""
    n_obs_steps: int = 1
    """observation history To"""
    horizon: int = 4
    """predicted chunk length H (the U-Net needs H % 4 == 0)"""
    batch_sizes: tuple[int, ...] = (1, 32)
    """observations per call (1: one robot; 32: e.g. parallel evaluation envs)"""
    threads: int = 1
    """torch intra-op threads"""
    warmup: int = 10
    """untimed calls per method and batch size before timing"""
    repeats: int = 100
    """timed calls per method and batch size"""
    cuda: bool = False
    """time on the GPU (synchronising before reading clocks)"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """where inference_speed.csv and inference_speed.png go"""


@torch.inference_mode()
def time_methods(methods, obs, warmup, repeats, device):
    """{name: per-call seconds [repeats]}, from interleaved rounds after `warmup` untimed calls per method."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names, times = list(methods), {name: [] for name in methods}
    for name in names:
        for _ in range(warmup):
            methods[name](obs, torch.randn(len(obs), *methods[name].noise_shape, device=device))
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            policy = methods[name]
            sync()
            t = time.perf_counter()
            policy(obs, torch.randn(len(obs), *policy.noise_shape, device=device))
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: np.array(v) for name, v in times.items()}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r["backbone"] for r in rows})
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        sub = [r for r in rows if r["backbone"] == backbone]
        methods = list(dict.fromkeys(r["method"] for r in sub))
        batches = sorted({int(r["batch"]) for r in sub})
        width = 0.8 / len(batches)
        for j, batch in enumerate(batches):
            cell = {r["method"]: float(r["p50_ms"]) for r in sub if int(r["batch"]) == batch}
            ms = [cell[m] for m in methods]
            x = np.arange(len(methods)) + (j - (len(batches) - 1) / 2) * width
            bars = ax.bar(x, ms, width, label=f"batch {batch}")
            ax.bar_label(bars, [f"{v:.3g}" if v < 1000 else f"{v:.0f}" for v in ms], fontsize=7)
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_yscale("log")
        ax.set_ylabel("ms per action chunk (p50)")
        ax.set_title(f"{backbone} {sub[0]['net']}, {sub[0]['threads']} thread(s), load {sub[0]['load_1min']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    load_1min = os.getloadavg()[0]
    Do, Da, To, H = args.obs_dim, args.action_dim, args.n_obs_steps, args.horizon
    net = args.hidden_dims if args.backbone == "mlp" else args.unet_dims
    common_kw = dict(obs_dim=Do, action_dim=Da, n_obs_steps=To, horizon=H, n_action_steps=H - To + 1,
                     backbone=args.backbone, hidden_dims=args.hidden_dims, unet_dims=args.unet_dims)
    methods = {"DBP": DriftPolicy(**common_kw)}
    for name, sampler, k in (("DDPM 100", "ddpm", 100), ("DDIM 10", "ddim", 10), ("DDIM 1", "ddim", 1)):
        methods[name] = DiffusionPolicy(**common_kw, sampler=sampler, inference_steps=k)
        methods[name].load_state_dict(methods["DDPM 100"].state_dict())  # one network for the three samplers
    calls = {"DBP": 1, "DDPM 100": 100, "DDIM 10": 10, "DDIM 1": 1}
    methods = {name: p.to(device).eval() for name, p in methods.items()}
    params = {name: sum(p.numel() for p in methods[name].parameters()) for name in ("DBP", "DDPM 100")}

    print(f"{args.backbone} {net}, Do {Do}, Da {Da}, To {To}, H {H}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.repeats} timed calls per cell after {args.warmup} warm-up, "
          f"load average (1 min) {load_1min:.2f}")
    print(f"parameters: DBP {params['DBP']:,}, diffusion {params['DDPM 100']:,} (+ the diffusion-step embedding)")
    rows = []
    for batch in args.batch_sizes:
        obs = torch.rand(batch, To, Do, device=device) * 2 - 1
        times = time_methods(methods, obs, args.warmup, args.repeats, device)
        stats = {name: (1e3 * np.median(t), 1e3 * t.mean(), 1e3 * np.percentile(t, 95)) for name, t in times.items()}
        print(f"\nbatch {batch}\n{'method':<10}{'calls':>6}{'p50 ms':>10}{'mean ms':>10}{'p95 ms':>10}"
              f"{'/ DBP p50':>11}{'/ DBP mean':>12}")
        for name, (p50, mean, p95) in stats.items():
            over_p50, over_mean = p50 / stats["DBP"][0], mean / stats["DBP"][1]
            print(f"{name:<10}{calls[name]:>6}{p50:>10.3f}{mean:>10.3f}{p95:>10.3f}"
                  f"{over_p50:>10.1f}x{over_mean:>11.1f}x")
            rows.append(dict(backbone=args.backbone, net=" ".join(map(str, net)), batch=batch, method=name,
                             network_calls=calls[name], p50_ms=f"{p50:.4f}", mean_ms=f"{mean:.4f}", p95_ms=f"{p95:.4f}",
                             p50_over_dbp=f"{over_p50:.2f}", mean_over_dbp=f"{over_mean:.2f}",
                             threads=torch.get_num_threads(), repeats=args.repeats, load_1min=f"{load_1min:.2f}",
                             device=str(device), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M")))
        labels = {"DDPM 100": "100-step DDPM", "DDIM 10": "10-step DDIM", "DDIM 1": "1-step DDIM"}
        print("ratios (p50 / mean): " + "; ".join(
            f"{label} / DBP {stats[name][0] / stats['DBP'][0]:.1f}x / {stats[name][1] / stats['DBP'][1]:.1f}x"
            for name, label in labels.items()))

    # Keep the other backbone's rows, so one CSV and one figure hold both.
    os.makedirs(args.results_dir, exist_ok=True)
    csv_path = os.path.join(args.results_dir, "inference_speed.csv")
    if os.path.exists(csv_path):
        with open(csv_path) as f:
            rows = [r for r in csv.DictReader(f) if r["backbone"] != args.backbone] + rows
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.results_dir, "inference_speed.png"))
    print(f"\nwrote {csv_path} and inference_speed.png")
