"""The drifting loss against its mathematical properties (docs/method.md) and a slow reference."""

import inspect
import math

import numpy as np
import pytest
import torch

from dbp_bc import drift_loss


def reference_drift(gen, pos, temperatures, neg=None):
    """The estimator of docs/method.md written out with loops in float64: returns (target - x) = V in rescaled coordinates,
    the coordinate scale and the per-temperature force magnitudes."""
    gen, pos = gen.astype(np.float64), pos.astype(np.float64)
    B, G, S = gen.shape
    neg = np.zeros((B, 0, S)) if neg is None else neg.astype(np.float64)
    targets = np.concatenate([gen, neg, pos], axis=1)
    M, n_neg = targets.shape[1], G + neg.shape[1]
    dist = np.maximum(np.linalg.norm(gen[:, :, None] - targets[:, None], axis=-1), 1e-4)  # self: 1e-4
    scale = dist.mean()
    cs = max(scale / math.sqrt(S), 1e-3)
    dist_n = dist / max(scale, 1e-3)
    for i in range(G):
        dist_n[:, i, i] += 100.0
    fields, forces = [], []
    for R in temperatures:
        k = np.exp(-dist_n / R)
        field = np.zeros_like(gen)
        for b in range(B):
            row = k[b] / k[b].sum(1, keepdims=True)
            col = k[b] / k[b].sum(0, keepdims=True)
            A = np.sqrt(np.maximum(row * col, 1e-6))
            for i in range(G):
                s_pos, s_neg = A[i, n_neg:].sum(), A[i, :n_neg].sum()
                for m in range(M):
                    coef = A[i, m] * s_neg if m >= n_neg else -A[i, m] * s_pos
                    field[b, i] += coef * (targets[b, m] - gen[b, i]) / cs
        forces.append((field**2).mean())
        fields.append(field / math.sqrt(max(forces[-1], 1e-8)))
    return sum(fields), cs, forces


def test_matches_reference_loss_and_gradient():
    rng = np.random.default_rng(0)
    gen, pos, neg = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 2, 6)) + 0.5, rng.normal(size=(3, 2, 6))
    temps = (0.02, 0.05, 0.2)
    V, cs, forces = reference_drift(gen, pos, temps, neg)
    x = torch.tensor(gen, dtype=torch.float32, requires_grad=True)
    loss, info = drift_loss(x, torch.tensor(pos, dtype=torch.float32), temps, torch.tensor(neg, dtype=torch.float32))
    np.testing.assert_allclose(loss.detach().numpy(), (V**2).mean(axis=(1, 2)), rtol=1e-4)
    for R, f in zip(temps, forces):
        np.testing.assert_allclose(info[f"force_mag_R{R}"].item(), f, rtol=1e-4)
    loss.mean().backward()
    # d/dx mean_b mean_{i,s} (x/cs - sg(x/cs + V))^2 = -2 V / (cs * B * G * S): the gradient moves x along V.
    np.testing.assert_allclose(x.grad.numpy(), -2 * V / (cs * V.size), rtol=1e-3, atol=1e-7)


def test_one_temperature_gives_loss_one():
    torch.manual_seed(0)
    for shift in (0.0, 3.0):
        loss, _ = drift_loss(torch.randn(16, 8, 10), torch.randn(16, 4, 10) + shift, temperatures=(0.05,))
        assert loss.mean().item() == pytest.approx(1.0, abs=1e-5)


def test_field_vanishes_for_same_distribution_and_is_large_when_shifted():
    torch.manual_seed(0)
    B, G, P, S = 64, 64, 64, 2
    direction = torch.tensor([1.0, 0.0])
    stats = {}
    for shift in (0.0, 2.0):
        x = torch.randn(B, G, S, requires_grad=True)
        loss, info = drift_loss(x, torch.randn(B, P, S) + shift * direction, temperatures=(0.2,))
        loss.mean().backward()
        V = -x.grad  # proportional to the (unit-RMS) field
        stats[shift] = (info["force_mag_R0.2"].item(), V.mean(dim=(0, 1)) / V.pow(2).mean().sqrt())
    (force_same, mean_same), (force_shift, mean_shift) = stats[0.0], stats[2.0]
    assert force_same < 0.25 * force_shift  # pre-normalisation field: finite-sample noise vs a real drift
    assert mean_same.abs().max() < 0.1  # p = q: no systematic direction (the field vanishes in expectation)
    assert mean_shift[0] > 0.8 and abs(mean_shift[1]) < 0.1  # shifted: the field points along the shift


def test_sample_never_repels_itself():
    # x1 = (0, 0) and x2 = (1, 0) generated, one positive y = (0, 1). With the self-mask, the attraction to y
    # and the repulsion from x2 get equal weight, so V(x1) ~ (y - x1) - (x2 - x1) = (-1, 1). If x1 repelled
    # itself, its own column (distance ~0) would dominate the softmax and swamp the repulsion from x2.
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    loss, _ = drift_loss(x, torch.tensor([[[0.0, 1.0]]]), temperatures=(1.0,))
    loss.sum().backward()
    v1 = -x.grad[0, 0]
    cos = (v1 @ torch.tensor([-1.0, 1.0])) / (v1.norm() * math.sqrt(2))
    assert cos > 0.995


def test_gradient_flows_only_through_generated_samples():
    gen = torch.randn(4, 3, 5, requires_grad=True)
    pos, neg = torch.randn(4, 2, 5, requires_grad=True), torch.randn(4, 2, 5, requires_grad=True)
    loss, info = drift_loss(gen, pos, neg=neg)
    loss.sum().backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None
    assert all(not v.requires_grad for v in info.values())


def test_computed_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    gen, pos = torch.randn(8, 4, 12), torch.randn(8, 1, 12)
    ref, _ = drift_loss(gen, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = drift_loss(gen.bfloat16(), pos.bfloat16())
    assert out.dtype == torch.float32
    ref16, _ = drift_loss(gen.bfloat16().float(), pos.bfloat16().float())
    torch.testing.assert_close(out, ref16)


def test_drift_loss_copies_are_identical():
    import dbp_bc

    others = []
    for name in ("dfp_offline_to_online",):
        try:
            others.append(__import__(name))
        except ImportError:
            continue
    for module in others:
        assert inspect.getsource(module.drift_loss) == inspect.getsource(dbp_bc.drift_loss), module.__name__
