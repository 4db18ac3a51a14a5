"""Tests for imm.py: each name states a property; each body checks it against a value computed
another way (numbers computed by hand from the paper and the official code, closed forms, or a naive
re-computation)."""
import builtins
import contextlib
import copy
import errno
import gc
import importlib
import inspect
import io
import json
import math
import mimetypes  # noqa: F401  (urllib's file:// handler imports it lazily; import it before exec is patched)
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
import urllib.error
import warnings
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import imm
import train_cifar
from imm import IMMConfig, IMMModel

torch.set_num_threads(min(2, torch.get_num_threads()))
# Tests that take more than ~10 s (most that start processes, the notebook) are marked slow: `python -m pytest -q -m
# "not slow"` skips them for a quick check; CI runs everything. (The marker is this file's own; the filter keeps pytest
# from warning about it.)
warnings.filterwarnings("ignore", "Unknown pytest.mark.slow", pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow
SCHEDULES = ("fm", "vp_cosine")
F_TYPES = (("simple_edm", "fm"), ("simple_edm", "vp_cosine"), ("identity", "fm"),
           ("identity", "vp_cosine"), ("euler_fm", "fm"))
HERE = os.path.dirname(os.path.abspath(__file__))


class Affine(torch.nn.Module):
    """A stand-in network G whose output depends on x and both time inputs, with optional dropout."""

    def __init__(self, dim=2, p=0.0):
        super().__init__()
        self.lin = torch.nn.Linear(dim + 2, dim)
        self.drop = torch.nn.Dropout(p)

    def forward(self, x, c_noise_t, c_noise_s, labels=None):
        flat = x.flatten(1)
        h = torch.cat([flat, c_noise_t[:, None].float() / 1000, c_noise_s[:, None].float() / 1000], 1)
        return self.drop(torch.tanh(self.lin(h))).reshape(x.shape)


# ----------------------------------------------------------------------------- schedules, DDIM

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_eta_inv_inverts_eta_and_logsnr_is_minus_two_log_eta(schedule):
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(imm.eta_inv(imm.eta(t, schedule), schedule), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(imm.logsnr(t, schedule), -2 * torch.log(imm.eta(t, schedule)))
    assert imm.eta_inv(torch.tensor(float("inf")), schedule).item() == 1.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_neg_dlogsnr_dt_matches_a_finite_difference(schedule):
    t, h = torch.linspace(0.05, 0.95, 19, dtype=torch.float64), 1e-6
    fd = -(imm.logsnr(t + h, schedule) - imm.logsnr(t - h, schedule)) / (2 * h)
    torch.testing.assert_close(imm.neg_dlogsnr_dt(t, schedule), fd, rtol=1e-7, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_boundaries(schedule):
    g = torch.Generator().manual_seed(0)
    x, x_t, noise = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    torch.testing.assert_close(imm.ddim(x_t, x, t=t, s=t, schedule=schedule), x_t, rtol=0, atol=1e-15)
    torch.testing.assert_close(imm.ddim(x_t, x, t=t, s=0.0, schedule=schedule), x, rtol=0, atol=1e-15)
    alpha, sigma = imm.alpha_sigma(t, schedule)
    torch.testing.assert_close(imm.ddim(noise, x, t=1.0, s=t, schedule=schedule),
                               alpha[:, None] * x + sigma[:, None] * noise, rtol=0, atol=1e-14)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_is_self_consistent(schedule):
    g = torch.Generator().manual_seed(1)
    x, x_t = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randn(64, 4, generator=g, dtype=torch.float64)
    s, r, t = torch.rand(3, 64, generator=g, dtype=torch.float64).sort(0).values * 0.98 + 0.01
    two_hops = imm.ddim(imm.ddim(x_t, x, t=t, s=r, schedule=schedule), x, t=r, s=s, schedule=schedule)
    torch.testing.assert_close(two_hops, imm.ddim(x_t, x, t=t, s=s, schedule=schedule), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_of_an_interpolant_reuses_its_noise(schedule):
    g = torch.Generator().manual_seed(2)
    x, n = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)
    r, t = torch.rand(2, 32, generator=g, dtype=torch.float64).sort(0).values * 0.98 + 0.01
    x_t = imm.interpolate(x, n, t=t, schedule=schedule)
    torch.testing.assert_close(imm.ddim(x_t, x, t=t, s=r, schedule=schedule),
                               imm.interpolate(x, n, t=r, schedule=schedule), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- parameterisation

@pytest.mark.parametrize("f_type,schedule", F_TYPES)
def test_f_is_identity_when_s_equals_t(f_type, schedule):
    cfg = IMMConfig(f_type=f_type, schedule=schedule)
    model = IMMModel(Affine(dim=6), cfg).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.98 + 0.01
    assert torch.equal(model(x, t=t, s=t), x)
    images = torch.randn(8, 3, 8, 8, dtype=torch.float64)   # also around the real network, whatever it outputs
    assert torch.equal(IMMModel(randomize_(tiny_net()), cfg).eval()(images, t=t, s=t), images)
    c_skip, c_out = imm.f_coefficients(s=t, t=t, cfg=cfg)
    assert torch.all(c_skip == 1) and torch.all(c_out == 0)


@pytest.mark.parametrize("f_type,schedule", F_TYPES)
def test_f_coefficients_equal_ddim_applied_to_the_x_prediction(f_type, schedule):
    """f_{s,t} = DDIM(x_t, g, s, t) with g = c_skip(t) x_t + c_out(t) G at the g-level (Sec. 4.2)."""
    cfg = IMMConfig(f_type=f_type, schedule=schedule)
    s, t = torch.tensor([0.1, 0.3, 0.0]), torch.tensor([0.5, 0.9, 0.7])
    s, t = s.double(), t.double()
    alpha, sigma = imm.alpha_sigma(t, schedule)
    norm = alpha ** 2 + sigma ** 2
    g_skip, g_out = {"simple_edm": (alpha / norm, -cfg.sigma_d * sigma / norm.sqrt()),
                     "euler_fm": (torch.ones_like(t), -t * cfg.sigma_d),
                     "identity": (torch.zeros_like(t), torch.ones_like(t))}[f_type]
    x_t, G = torch.randn(3, 1, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    expected = imm.ddim(x_t, g_skip[:, None] * x_t + g_out[:, None] * G, t=t, s=s, schedule=schedule)
    c_skip, c_out = imm.f_coefficients(s=s, t=t, cfg=cfg)
    torch.testing.assert_close(c_skip[:, None] * x_t + c_out[:, None] * G, expected)


def test_f_coefficients_special_forms():
    s, t = torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64), torch.tensor([0.4, 0.9, 0.95], dtype=torch.float64)
    _, c_out = imm.f_coefficients(s=s, t=t, cfg=IMMConfig(f_type="euler_fm"))
    torch.testing.assert_close(c_out, -(t - s) * 0.5)
    c_skip, c_out = imm.f_coefficients(s=s, t=t, cfg=IMMConfig(schedule="vp_cosine"))
    torch.testing.assert_close(c_skip, torch.cos(math.pi * (t - s) / 2))
    torch.testing.assert_close(c_out, -0.5 * torch.sin(math.pi * (t - s) / 2))
    _, c_out = imm.f_coefficients(s=s, t=t, cfg=IMMConfig())
    torch.testing.assert_close(c_out, -(t - s) * 0.5 / ((1 - t) ** 2 + t ** 2).sqrt())


def test_cifar_reference_coefficients():
    cfg = IMMConfig()
    c_skip, c_out = imm.f_coefficients(s=0.006, t=0.994, cfg=cfg)
    assert c_skip.item() == pytest.approx(0.012072, abs=1e-6) and c_out.item() == pytest.approx(-0.496973, abs=1e-6)
    c_skip, c_out = imm.f_coefficients(s=imm.eta_inv(1.4), t=0.994, cfg=cfg)
    assert c_skip.item() == pytest.approx(0.589363, abs=1e-6) and c_out.item() == pytest.approx(-0.206569, abs=1e-6)
    c_skip, c_out = imm.f_coefficients(s=0.006, t=imm.eta_inv(1.4), cfg=cfg)
    assert c_skip.item() == pytest.approx(0.812758, abs=2e-6) and c_out.item() == pytest.approx(-0.402682, abs=1e-6)
    assert imm.c_in(0.994, cfg).item() == pytest.approx(2.012036, abs=1e-6)
    assert imm.c_in(imm.eta_inv(1.4), cfg).item() == pytest.approx(2.789944, abs=1e-6)


def test_positional_embedding_reference_values():
    pe = imm.positional_embedding(torch.tensor([0.0, 500.0]), 128)
    assert torch.equal(pe[0], torch.cat([torch.zeros(64), torch.ones(64)]).double())
    assert pe[1, 0].item() == pytest.approx(-0.467772, abs=1e-6)
    assert pe[1, 63].item() == pytest.approx(0.049979, abs=1e-6)
    assert pe[1, 64].item() == pytest.approx(-0.883849, abs=1e-6)


def test_config_rejects_impossible_options():
    for bad in (dict(f_type="euler_fm", schedule="vp_cosine"), dict(t_min=0.5, T=0.4),
                dict(schedule="linear"), dict(kernel="cosine"), dict(M=0)):
        with pytest.raises(ValueError, match="IMMConfig"):
            IMMConfig(**bad)


# ----------------------------------------------------------------------------- times and r(s,t)

@pytest.mark.parametrize("cfg", [IMMConfig(), IMMConfig(schedule="vp_cosine", T=0.996), IMMConfig.toy(),
                                 IMMConfig(k=12, t_min=0.0)])
def test_sampled_times_are_ordered_and_r_is_strictly_below_t(cfg):
    times = imm.sample_times(20000, cfg, generator=torch.Generator().manual_seed(0))
    t, r, s = times
    assert torch.all(cfg.t_min <= s) and torch.all(s <= r) and torch.all(r <= t) and torch.all(t <= cfg.T)
    assert torch.all(r[s < t] < t[s < t])
    delta_eta = (imm.eta(cfg.T, cfg.schedule) - imm.eta(cfg.t_min, cfg.schedule)) / 2 ** cfg.k
    collapsed = imm.eta(t, cfg.schedule) - delta_eta <= imm.eta(s, cfg.schedule)
    assert torch.equal(r == s, collapsed)
    assert 0 < collapsed.float().mean() < 1


@pytest.mark.parametrize("k", [0, 2, 4, 6, 8])
def test_r_stays_between_s_and_t_even_for_large_steps(k):
    cfg = IMMConfig.toy(k=k)
    t = torch.linspace(0.0, 0.994, 2001, dtype=torch.float64)
    for s in (0.0, 0.3):
        s_ = torch.full_like(t, s).clamp(max=t)
        r = imm.r_of(s=s_, t=t, cfg=cfg)
        assert torch.all(s_ <= r) and torch.all(r <= t)


def test_r_is_non_decreasing_in_t():
    cfg = IMMConfig()
    t = torch.linspace(0.006, 0.994, 5001, dtype=torch.float64)
    for s in (0.006, 0.3, 0.9):
        r = imm.r_of(s=torch.full_like(t, s).clamp(max=t), t=t, cfg=cfg)
        assert torch.all(r[1:] >= r[:-1])


def test_r_gaps_match_hand_computed_examples():
    assert (0.994 - imm.r_of(s=0.0, t=0.994, cfg=IMMConfig())).item() == pytest.approx(1.82e-7, rel=5e-3)
    # App. I.6 minimum gap: t - r >= 1e-4 unless r collapses to s
    cfg = IMMConfig(min_gap=1e-4)
    t = torch.linspace(0.01, 0.994, 1000, dtype=torch.float64)
    r = imm.r_of(s=torch.zeros_like(t), t=t, cfg=cfg)
    assert torch.all(t - r >= 1e-4 - 1e-15)
    # Delta eta is (eta(T) - eta(t_min)) / 2^k: the official nt_high / nt_low
    cfg = IMMConfig()
    expected = (0.994 / 0.006 - 0.006 / 0.994) / 2 ** 15
    assert (imm.eta(0.5) - imm.eta(imm.r_of(s=0.0, t=0.5, cfg=cfg))).item() == pytest.approx(expected, rel=1e-9)


def test_timestep_lists_match_the_official_configs():
    cifar = IMMConfig()
    torch.testing.assert_close(imm.timesteps(1, "uniform", cifar), torch.tensor([0.994, 0.006], dtype=torch.float64))
    torch.testing.assert_close(imm.timesteps(2, "eta", cifar, mid_eta=(1.4,)),
                               torch.tensor([0.994, 1.4 / 2.4, 0.006], dtype=torch.float64))
    zero = IMMConfig(t_min=0.0)
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)   # noqa: E731
    torch.testing.assert_close(imm.timesteps(4, "uniform", zero), f64([0.994, 0.7455, 0.497, 0.2485, 0.0]))
    torch.testing.assert_close(imm.timesteps(4, "edm", zero), f64([0.994, 0.95674, 0.56413, 0.01001, 0.0]),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mid_eta"):
        imm.timesteps(3, "eta", cifar, mid_eta=(1.4,))


# ----------------------------------------------------------------------------- weighting, kernel, MMD

def test_weighting_matches_the_reference_table():
    t = torch.tensor([0.006, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.994], dtype=torch.float64)
    a1b5 = [0.9072, 6.4385, 7.8893, 6.0341, 3.9732, 2.1317, 1.3549, 1.0305, 1.0182]
    a2b4 = [0.3329, 2.7581, 4.4193, 4.1207, 1.9640, 0.5323, 0.1355, 0.0103, 0.0061]
    torch.testing.assert_close(imm.weight(t, IMMConfig()), torch.tensor(a1b5, dtype=torch.float64), rtol=0, atol=6e-5)
    torch.testing.assert_close(imm.weight(t, IMMConfig(a=2, b=4)), torch.tensor(a2b4, dtype=torch.float64),
                               rtol=0, atol=6e-5)
    dense = imm.weight(torch.linspace(0.006, 0.994, 999, dtype=torch.float64), IMMConfig())
    assert torch.all(torch.isfinite(dense)) and torch.all(dense > 0)


def test_kernel_value_is_invariant_to_the_output_scale():
    """k with weight w on (l y, l y') equals k with weight l w on (y, y'): dividing by |c_out| cancels it."""
    y, y2 = torch.randn(3, 4, 10, dtype=torch.float64), torch.randn(3, 4, 10, dtype=torch.float64)
    w, lam = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), 3.7
    torch.testing.assert_close(imm.laplace_kernel(lam * y, lam * y2, w), imm.laplace_kernel(y, y2, lam * w))


def test_laplace_kernel_matches_an_explicit_loop():
    x, y = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    w = torch.tensor([0.7, 1.3], dtype=torch.float64)
    K = imm.laplace_kernel(x, y, w)
    for g in range(2):
        for j in range(3):
            for l in range(3):
                expect = math.exp(-w[g].item() * max((x[g, j] - y[g, l]).norm().item(), 1e-8) / 5)
                assert K[g, j, l].item() == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("kernel", ["laplace", "rbf"])
def test_mmd_is_zero_for_identical_sets_and_positive_otherwise(kernel):
    cfg = IMMConfig(kernel=kernel)
    y, w = torch.randn(16, 4, 30), torch.rand(16) + 0.5
    assert torch.all(imm.mmd_squared(y, y.clone(), w, cfg) == 0)
    assert torch.all(imm.mmd_squared(y, torch.randn(16, 4, 30) + 0.3, w * 30, cfg) > 0)


def test_mmd_is_invariant_to_permuting_particles_and_groups():
    cfg = IMMConfig()
    y_t, y_r = torch.randn(8, 4, 12, dtype=torch.float64), torch.randn(8, 4, 12, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64) * 20
    base = imm.mmd_squared(y_t, y_r, w, cfg)
    torch.testing.assert_close(imm.mmd_squared(y_t[:, torch.randperm(4)], y_r[:, torch.randperm(4)], w, cfg), base)
    p = torch.randperm(8)
    torch.testing.assert_close(imm.mmd_squared(y_t[p], y_r[p], w[p], cfg), base[p])


def _naive_imm_loss(y_t, y_r, times, cfg):
    """Eq. 67 with Python loops over groups and pairs."""
    G, M = len(times.t), cfg.M
    total = 0.0
    for i in range(G):
        _, c_out = imm.f_coefficients(s=times.s[i].item(), t=times.t[i].item(), cfg=cfg)
        wt = 1 / abs(c_out.item())
        k = lambda a, b: math.exp(-wt * max((a - b).norm().item(), 1e-8) / a.numel())
        acc = 0.0
        for j in range(M):
            for l in range(M):
                a_t, b_t, a_r, b_r = y_t[i * M + j], y_t[i * M + l], y_r[i * M + j], y_r[i * M + l]
                acc += k(a_t, b_t) + k(a_r, b_r) - k(a_t, b_r) - k(b_t, a_r)
        total += imm.weight(times.t[i], cfg).item() * acc / M ** 2
    return total / G


def test_imm_loss_equals_a_naive_evaluation_of_eq_67():
    cfg = IMMConfig()
    torch.manual_seed(0)
    model = IMMModel(Affine(dim=12), cfg).double()
    x, noise = torch.randn(16, 3, 2, 2, dtype=torch.float64), 0.5 * torch.randn(16, 3, 2, 2, dtype=torch.float64)
    times = imm.sample_times(4, cfg, generator=torch.Generator().manual_seed(3))
    loss, stats = imm.imm_loss(model, x, cfg, times=times, noise=noise)
    t, r, s = (v.repeat_interleave(4) for v in times)
    x_t = imm.interpolate(x, noise, t=t)
    y_t, y_r = model(x_t, t=t, s=s), model(imm.ddim(x_t, x, t=t, s=r), t=r, s=s)
    assert loss.item() == pytest.approx(_naive_imm_loss(y_t.detach(), y_r.detach(), times, cfg), rel=1e-5)
    assert stats["mmd2"].shape == (4,)


def test_m1_loss_has_the_closed_form():
    cfg = IMMConfig(M=1)
    model = IMMModel(Affine(dim=3), cfg).double()
    x, noise = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    times = imm.sample_times(5, cfg, generator=torch.Generator().manual_seed(4))
    loss, _ = imm.imm_loss(model, x, cfg, times=times, noise=noise)
    x_t = imm.interpolate(x, noise, t=times.t)
    y_t, y_r = model(x_t, t=times.t, s=times.s), model(imm.ddim(x_t, x, t=times.t, s=times.r), t=times.r, s=times.s)
    wt = imm.kernel_weight(s=times.s, t=times.t, cfg=cfg)
    closed = imm.weight(times.t, cfg) * 2 * (torch.exp(-wt * 1e-8 / 3) - torch.exp(-wt * (y_t - y_r).norm(dim=1) / 3))
    assert loss.item() == pytest.approx(closed.mean().item(), rel=1e-5)


def test_rbf_mmd_and_its_gradient_match_the_closed_form_for_two_gaussians():
    """For N(a, s^2 I) and N(b, s^2 I) in D dimensions and k = exp(-|x - y|^2 / (2 h^2)), E k = c exp(-|a - b|^2 /
    (2 (h^2 + 2 s^2))) with c = (h^2 / (h^2 + 2 s^2))^(D/2), so MMD^2 = 2 c (1 - exp(...)) and its gradient in a is
    2 c exp(...) (a - b) / (h^2 + 2 s^2). The V-statistic over M particles, differentiated through y = a + s eps."""
    D, G, M, s, h = 3, 16, 500, 0.5, 1.0   # 16 groups of 500 particles (Monte Carlo error about 3%)
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.4, 0.1, 0.2], dtype=torch.float64)
    y_t = a + s * torch.randn(G, M, D, dtype=torch.float64, generator=g)
    y_r = b + s * torch.randn(G, M, D, dtype=torch.float64, generator=g)
    w_tilde = torch.full((G,), math.sqrt(D) / h, dtype=torch.float64)   # rbf_kernel: exp(-(w~ d)^2 / (2 D))
    mmd2 = imm.mmd_squared(y_t, y_r, w_tilde, IMMConfig(kernel="rbf")).mean()
    grad, = torch.autograd.grad(mmd2, a)
    var, c = h ** 2 + 2 * s ** 2, (h ** 2 / (h ** 2 + 2 * s ** 2)) ** (D / 2)
    e = math.exp(-((a - b) ** 2).sum().item() / (2 * var))
    bias = 2 * (1 - c) / M    # the V-statistic's diagonal pairs k(y, y) = 1 in place of E k = c
    assert mmd2.item() == pytest.approx(2 * c * (1 - e) + bias, rel=0.08)
    assert rel_err(grad, 2 * c * e * (a - b).detach() / var) < 0.05


def test_the_laplace_own_target_pull_settles_at_the_geometric_median_and_rbf_at_the_mean():
    """The 2D lesson in one particle: with one particle per group (M = 1, the own-target term alone) and fixed
    targets, gradient descent on the Laplace loss ends at the geometric median of the targets (its gradient is a
    unit vector whatever the distance); a wide RBF kernel ends at their mean."""
    targets = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    median = targets.mean(0)
    for _ in range(500):   # Weiszfeld's iteration: an independent computation of the geometric median
        w = 1 / (targets - median).norm(dim=1)
        median = (w[:, None] * targets).sum(0) / w.sum()
    for kernel, w_tilde, want in (("laplace", 1e-3, median), ("rbf", 1e-2, targets.mean(0))):
        cfg = IMMConfig(kernel=kernel, M=1)
        y = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([y], lr=0.02)
        for step in range(3000):
            for group in opt.param_groups:
                group["lr"] = 0.02 * (1 - step / 3000)
            loss = imm.mmd_squared(y.expand(4, 1, 2), targets[:, None], torch.full((4,), w_tilde, dtype=torch.float64),
                                   cfg).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(y.detach(), want, atol=0.02, rtol=0)
    assert (median - targets.mean(0)).norm() > 0.5   # the two answers are far apart


def test_no_gradient_flows_through_the_target_branch():
    """Parameter gradients equal those of a loss whose target particles are constants."""
    cfg = IMMConfig()
    torch.manual_seed(1)
    model = IMMModel(Affine(dim=4), cfg).double()
    x, noise = torch.randn(8, 4, dtype=torch.float64), 0.5 * torch.randn(8, 4, dtype=torch.float64)
    times = imm.sample_times(2, cfg, generator=torch.Generator().manual_seed(5))
    loss, _ = imm.imm_loss(model, x, cfg, times=times, noise=noise)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    t, r, s = (v.repeat_interleave(4) for v in times)
    x_t = imm.interpolate(x, noise, t=t)
    y_r = model(imm.ddim(x_t, x, t=t, s=r), t=r, s=s).detach().reshape(2, 4, -1)
    y_t = model(x_t, t=t, s=s).reshape(2, 4, -1)
    wt = imm.kernel_weight(s=times.s, t=times.t, cfg=cfg)
    only_online = (imm.weight(times.t, cfg) * (imm.laplace_kernel(y_t, y_t, wt).mean((1, 2))
                                                - 2 * imm.laplace_kernel(y_t, y_r, wt).mean((1, 2)))).mean()
    for g, ref in zip(grads, torch.autograd.grad(only_online, list(model.parameters()))):
        torch.testing.assert_close(g, ref)


def test_loss_and_gradient_are_finite_when_particles_coincide():
    cfg = IMMConfig(M=4)
    model = IMMModel(Affine(dim=4), cfg)
    x = torch.randn(1, 4).repeat(8, 1)           # four identical particles per group
    noise = torch.zeros(8, 4)
    loss, _ = imm.imm_loss(model, x, cfg, noise=noise)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_target_pass_uses_the_same_dropout_mask():
    """With r = t the target equals the online prediction, so the loss is exactly zero, dropout or not."""
    cfg = IMMConfig()
    model = IMMModel(Affine(dim=6, p=0.5), cfg).train()
    t = torch.tensor([0.9, 0.5]).double()
    times = imm.Times(t=t, r=t.clone(), s=torch.tensor([0.1, 0.2]).double())
    loss, _ = imm.imm_loss(model, torch.randn(8, 6), cfg, times=times)
    assert loss.item() == 0.0


def test_imm_loss_rejects_a_batch_that_is_not_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of the group size M=4"):
        imm.imm_loss(IMMModel(Affine(dim=2), IMMConfig()), torch.randn(10, 2), IMMConfig())


def test_fm_loss_regresses_onto_the_ot_velocity():
    cfg = IMMConfig.toy()
    model = IMMModel(Affine(dim=2), cfg)
    x, noise = torch.randn(6, 2), torch.randn(6, 2)
    times = imm.sample_times(6, cfg, generator=torch.Generator().manual_seed(0))
    loss, _ = imm.fm_loss(model, x, cfg, times=times, noise=noise)
    # one Euler step of size (t - s) with velocity sigma_d G is exactly f_{s,t}
    G = model.network_output(imm.interpolate(x, noise, t=times.t), t=times.t, s=times.s)
    assert loss.item() == pytest.approx((cfg.sigma_d * G - (noise - x)).square().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="euler_fm"):
        imm.fm_loss(model, x, IMMConfig())


# ----------------------------------------------------------------------------- EMA, samplers, metric

def test_ema_update_is_a_convex_combination():
    a, b = Affine(dim=3), Affine(dim=3)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    imm.ema_update(a, b, 0.9)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * b.state_dict()[k])


def test_pushforward_applies_f_between_consecutive_times():
    cfg = IMMConfig.toy()
    model = IMMModel(imm.MLP(width=16, depth=1, dropout=0.5), cfg).train()
    x_T = imm.prior_sample((5, 2), cfg)
    ts = imm.timesteps(3, "uniform", cfg)
    out = imm.pushforward_sample(model, x_T, ts)
    assert model.training and out.dtype == torch.float64
    model.eval()
    with torch.no_grad():
        x = x_T
        for i in range(3):
            x = model(x, t=ts[i], s=ts[i + 1])
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_restart_with_one_step_equals_pushforward_and_renoises_otherwise():
    cfg = IMMConfig.toy()
    model = IMMModel(imm.MLP(width=16, depth=1), cfg)
    x_T = imm.prior_sample((7, 2), cfg)
    ts = imm.timesteps(1, "uniform", cfg)
    torch.testing.assert_close(imm.restart_sample(model, x_T, ts), imm.pushforward_sample(model, x_T, ts))
    ts = imm.timesteps(2, "uniform", cfg)
    with torch.no_grad():
        x0 = model(x_T.double(), t=ts[0], s=ts[2])
        g = torch.Generator().manual_seed(9)
        x1 = imm.interpolate(x0, imm.prior_sample((7, 2), cfg, generator=g), t=ts[1])
        expected = model(x1, t=ts[1], s=ts[2])
    torch.testing.assert_close(imm.restart_sample(model, x_T, ts, generator=torch.Generator().manual_seed(9)), expected)
    # one noise row per sample: the first 8 of 16 samples get the noise of 8 samples drawn alone (8 x 3 x 2 values)
    x_T, ts = imm.prior_sample((16, 2), cfg), imm.timesteps(4, "uniform", cfg)
    all16, first8 = (imm.restart_sample(model, x_T[:n], ts, generator=torch.Generator().manual_seed(9))
                     for n in (16, 8))
    torch.testing.assert_close(all16[:8], first8)


def test_sliced_wasserstein_of_a_translation_is_its_length_over_root_two():
    x = imm.toy_data(4000, generator=torch.Generator().manual_seed(0)).double()
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)
    assert imm.sliced_wasserstein(x, x) == 0.0
    assert imm.sliced_wasserstein(x, x + shift, n_proj=512) == pytest.approx(0.5 / math.sqrt(2), rel=1e-9)


def test_share_on_black_squares_is_one_for_checkerboard_data_and_zero_on_the_white_squares():
    x = imm.toy_data(4000, generator=torch.Generator().manual_seed(0))
    assert imm.share_on_black_squares(x) == 1.0
    mirrored = x * torch.tensor([-1.0, 1.0])            # x1 -> -x1 flips the column's parity: black squares to white
    assert imm.share_on_black_squares(mirrored) == 0.0
    assert imm.share_on_black_squares(x + 4.0) == 0.0   # off the board
    on_edge = torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [2.0, 1.5]])   # black, white, black (the board's right edge)
    assert imm.share_on_black_squares(on_edge) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- training end to end

def test_a_tiny_2d_run_makes_two_step_imm_beat_two_step_flow_matching():
    """400 steps on the checkerboard (about 15 s on 2 CPU cores). Measured 2-step SW2, seeds 0 and 1:
    IMM 0.116 / 0.093, flow matching 0.349 / 0.372, floor at 4000 samples about 0.03."""
    cfg = IMMConfig.toy()
    ref = imm.toy_data(4000, generator=torch.Generator().manual_seed(7))
    dist = {}
    for method in ("imm", "fm"):
        model, losses = imm.train_2d(method, cfg, "checkerboard", steps=400, batch=512, width=64, depth=2, seed=0)
        assert all(math.isfinite(v) for v in losses)
        dist[method] = imm.sliced_wasserstein(imm.sample_2d(model, 4000, 2, seed=1), ref)
    assert dist["imm"] < 0.2, dist
    assert dist["imm"] < 0.5 * dist["fm"], dist


@slow
def test_the_demo_runs_from_the_command_line(tmp_path):
    out = tmp_path / "demo.png"
    res = subprocess.run([sys.executable, os.path.join(HERE, "imm.py"), "--steps", "20", "--n-eval", "400",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "floor (two independent data draws)" in res.stdout and out.stat().st_size > 10000
    lines = res.stdout.splitlines()   # progress while each method trains, then its summary
    assert lines[0].startswith("  IMM step 20/20 (") and lines[1].startswith("trained IMM for 20 steps")
    assert lines[2].startswith("  FM step 20/20 (") and lines[3].startswith("trained  FM for 20 steps")
    table = lines[lines.index("steps   IMM pushforward      IMM restart    flow matching") + 2:]
    rows = {int(line.split()[0]): [float(v) for v in line.split()[1:]] for line in table[:5]}
    assert sorted(rows) == [1, 2, 4, 8, 100] and all(len(rows[n]) == 6 for n in (1, 2, 4, 8)) and len(rows[100]) == 2
    assert rows[1][:2] == rows[1][2:4]   # one restart step is one pushforward step (SW2 and share)
    assert rows[2][:2] != rows[2][2:4]   # ... and two are not
    help_text = subprocess.run([sys.executable, os.path.join(HERE, "imm.py"), "--help"], capture_output=True,
                               text=True).stdout
    for option in ("--steps", "--seed", "--out", "--data"):
        assert option in help_text


# ============================================================================= DDPM++, checkpoints, images


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def randomize_(net, seed=0):
    """Weights of order one everywhere (EDM's init makes conv1/proj/aux_conv ~1e-5, which would
    hide the embedding's and the attention's effect on the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return net.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_net(**kw):
    kw = dict(img_resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)) | kw
    return imm.DDPMpp(**kw)


@pytest.fixture(scope="module")
def fresh_net():
    torch.manual_seed(0)
    return imm.DDPMpp()


@pytest.fixture(scope="module")
def random_net(fresh_net):
    return randomize_(copy.deepcopy(fresh_net), seed=1)


def official_state_dict_shapes():
    """The official CIFAR-10 SongUNet's blocks (configs/cifar10, training/unets.py), written out row by row
    (independent of DDPMpp's constructor)."""
    E, shapes = 512, {}

    def add(name, **tensors):
        shapes.update({f"model.{name}.{k}": v for k, v in tensors.items()})

    def conv(name, cin, cout, k, resample=False):
        add(name, weight=(cout, cin, k, k), bias=(cout,))
        if resample:
            add(name, resample_filter=(1, 1, 2, 2))

    def norm(name, c):
        add(name, weight=(c,), bias=(c,))

    def linear(name, cin, cout):
        add(name, weight=(cout, cin), bias=(cout,))

    def block(name, cin, cout, resample, skip, attn):
        norm(f"{name}.norm0", cin)
        conv(f"{name}.conv0", cin, cout, 3, resample)
        linear(f"{name}.affine", E, cout)
        norm(f"{name}.norm1", cout)
        conv(f"{name}.conv1", cout, cout, 3)
        if skip:
            conv(f"{name}.skip", cin, cout, 1, resample)
        if attn:
            norm(f"{name}.norm2", cout)
            conv(f"{name}.qkv", cout, 3 * cout, 1)
            conv(f"{name}.proj", cout, cout, 1)

    for sfx in ("", "_s"):
        linear(f"map_layer0{sfx}", 128, E)
        linear(f"map_layer1{sfx}", E, E)
    conv("enc.32x32_conv", 3, 128, 3)
    rng = lambda prefix, idx: [f"{prefix}{i}" for i in idx]  # noqa: E731
    table = [  # names, in, out, resample, skip conv, attention
        (["enc.32x32_block0"], 128, 256, False, True, False),
        (rng("enc.32x32_block", (1, 2, 3)), 256, 256, False, False, False),
        (["enc.16x16_down"], 256, 256, True, True, False),
        (rng("enc.16x16_block", range(4)), 256, 256, False, False, True),
        (["enc.8x8_down"], 256, 256, True, True, False),
        (rng("enc.8x8_block", range(4)), 256, 256, False, False, False),
        (["dec.8x8_in0"], 256, 256, False, False, True),
        (["dec.8x8_in1"], 256, 256, False, False, False),
        (rng("dec.8x8_block", range(5)), 512, 256, False, True, False),
        (["dec.16x16_up"], 256, 256, True, True, False),
        (rng("dec.16x16_block", range(4)), 512, 256, False, True, False),
        (["dec.16x16_block4"], 512, 256, False, True, True),
        (["dec.32x32_up"], 256, 256, True, True, False),
        (rng("dec.32x32_block", range(4)), 512, 256, False, True, False),
        (["dec.32x32_block4"], 384, 256, False, True, False),
    ]
    for names, cin, cout, resample, skip, attn in table:
        for name in names:
            block(name, cin, cout, resample, skip, attn)
    norm("dec.32x32_aux_norm", 256)
    conv("dec.32x32_aux_conv", 256, 3, 3)
    return shapes


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------

def test_cifar_network_has_the_official_keys_shapes_and_parameter_count(fresh_net):
    model = imm.IMMModel(fresh_net, imm.IMMConfig())
    sd = model.state_dict()
    expected = official_state_dict_shapes()
    assert len(expected) == 428
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 56_061_443
    s_mlp = (p.numel() for n, p in model.named_parameters() if n.startswith("model.map_layer") and "_s." in n)
    assert sum(s_mlp) == 328_704
    buffers = dict(model.named_buffers())
    assert len(buffers) == 8 and all(k.endswith("resample_filter") for k in buffers)
    assert all(torch.equal(b, torch.full((1, 1, 2, 2), 0.25)) for b in buffers.values())
    assert isinstance(fresh_net.enc, nn.ModuleDict) and isinstance(fresh_net.dec, nn.ModuleDict)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == min(32, m.num_channels // 4) and m.eps == 1e-6 for m in norms)


def test_init_follows_edm(fresh_net):
    """xavier_uniform scaled by 1e-5 (conv1, proj, aux_conv), sqrt(0.2) (qkv) or 1; zero biases."""
    for name, m in fresh_net.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
        leaf = name.split(".")[-1]
        scale = {"conv1": 1e-5, "proj": 1e-5, "32x32_aux_conv": 1e-5, "qkv": math.sqrt(0.2)}.get(leaf, 1.0)
        bound = scale * math.sqrt(6 / (fan_in + fan_out))
        w = m.weight.abs().max().item()
        assert 0.9 * bound < w <= bound * (1 + 1e-6), name
        assert torch.all(m.bias == 0), name


def test_output_shape_equals_input_shape_and_labels_need_an_augmentation_input(random_net):
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([990.0, 300.0], dtype=torch.float64)
    with torch.no_grad():
        y = random_net(x, t, 0.5 * t)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="no augmentation-label input"):
        random_net(x, t, t, torch.zeros(2, 9))


def test_augmentation_labels_enter_the_t_embedding_and_zero_labels_mean_none():
    net = randomize_(tiny_net(img_resolution=16, model_channels=16, attn_resolutions=(8,), dropout=0.0,
                              augment_dim=9), seed=0)
    assert tuple(net.map_augment.weight.shape) == (16, 9) and net.map_augment.bias is None
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([900.0, 500.0, 100.0], dtype=torch.float64)
    with torch.no_grad():
        plain, zero = net(x, t, 0.5 * t), net(x, t, 0.5 * t, torch.zeros(3, 9))
        labelled = net(x, t, 0.5 * t, torch.randn(3, 9))
        # the labels act exactly as a shift of the t embedding's input: PE(c_t) + A labels
        pe = imm.positional_embedding(t, 16)
        emb = net.embedding(t, 0.5 * t, torch.ones(3, 9))
        ref = F.silu(net.map_layer1(F.silu(net.map_layer0(pe + net.map_augment.weight.double().sum(1))))
                     + net.map_layer1_s(F.silu(net.map_layer0_s(imm.positional_embedding(0.5 * t, 16)))))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert rel_err(labelled, plain) > 1e-3
    torch.testing.assert_close(emb, ref, rtol=1e-12, atol=1e-12)


def test_scalar_times_and_a_time_batch_of_one_equal_per_sample_times():
    net = randomize_(tiny_net())
    x = torch.randn(2, 3, 8, 8)
    t, s = torch.tensor([700.0], dtype=torch.float64), torch.tensor([200.0], dtype=torch.float64)
    model = IMMModel(net, IMMConfig())
    with torch.no_grad():
        one = net(x, t, s)
        per_sample = net(x, t.expand(2), s.expand(2))
        single = net(x[1:], t, s)
        scalar, tensors = model(x, t=0.7, s=0.2), model(x, t=torch.full((2,), 0.7), s=torch.full((2,), 0.2))
    assert rel_err(one, per_sample) < 1e-6      # only the batch size of the matmuls differs
    assert rel_err(scalar, tensors) < 1e-6
    assert rel_err(one[1:], single) < 1e-5      # batch-size-dependent fp32 conv round-off


def test_network_depends_on_both_t_and_s_per_sample():
    net = randomize_(tiny_net())
    x = torch.randn(2, 3, 8, 8)
    t, s = torch.tensor([800.0, 800.0], dtype=torch.float64), torch.tensor([100.0, 400.0], dtype=torch.float64)
    with torch.no_grad():
        y = net(x, t, s)
        y_other_s = net(x, t, s.flip(0))
        y_other_t = net(x, t - 300, s)
        y0 = net(x[:1], t[:1], s[:1])
    assert (y - y_other_s).abs().amin(dim=(1, 2, 3)).gt(0).all() and (y - y_other_s).abs().max() > 1e-3
    assert (y - y_other_t).abs().max() > 1e-3
    assert rel_err(y[:1], y0) < 1e-5


def test_tiny_network_matches_the_official_songunet():
    """Reference values computed once by running the official lumalabs/imm SongUNet (commit c9473e9,
    s_embed=True, same kwargs) on CPU with these deterministic weights and inputs (fp32 round-off ~1e-6)."""
    net = tiny_net()
    with torch.no_grad():
        for k, (name, p) in enumerate(net.named_parameters()):
            fan_in = p[0].numel() if p.ndim > 1 else 10
            w = torch.sin(0.37 * torch.arange(p.numel(), dtype=torch.float64) + k) / math.sqrt(fan_in)
            p.copy_(w.reshape(p.shape) + (1 if "norm" in name and name.endswith("weight") else 0))
    x = (0.8 * torch.sin(torch.arange(2 * 3 * 8 * 8, dtype=torch.float32) * 0.7)).reshape(2, 3, 8, 8)
    c_t, c_s = torch.tensor([994.0, 250.0], dtype=torch.float64), torch.tensor([6.0, 100.0], dtype=torch.float64)
    with torch.no_grad():
        y = net.eval()(x, c_t, c_s)
    idx = [(0, 0, 0, 0), (0, 1, 3, 4), (0, 2, 7, 7), (1, 0, 5, 2), (1, 1, 0, 7), (1, 2, 4, 4)]
    official = [0.710555, 0.536711, -0.726856, 1.14229, -0.61992, -0.277662]
    torch.testing.assert_close(torch.stack([y[i] for i in idx]), torch.tensor(official), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), torch.tensor([12.263800621, 13.474885941]), rtol=1e-5, atol=0)


def test_embedding_is_silu_of_the_sum_of_two_float64_mlps():
    net = randomize_(tiny_net())
    t, s = torch.tensor([994.0, 20.0], dtype=torch.float64), torch.tensor([6.0, 10.0], dtype=torch.float64)
    emb = net.embedding(t, s)
    assert emb.dtype == torch.float64

    def mlp(pe, l0, l1):
        h = F.silu(pe @ l0.weight.double().T + l0.bias.double())
        return h @ l1.weight.double().T + l1.bias.double()
    freqs = 1e-4 ** (torch.arange(8.0, dtype=torch.float64) / 7)
    pe = lambda c: torch.cat([torch.sin(c[:, None] * freqs), torch.cos(c[:, None] * freqs)], 1)   # noqa: E731
    ref = F.silu(mlp(pe(t), net.map_layer0, net.map_layer1) + mlp(pe(s), net.map_layer0_s, net.map_layer1_s))
    torch.testing.assert_close(emb, ref, rtol=1e-12, atol=1e-12)
    # float64 keeps t and r = t - 1.8e-7 (App. C.6, k = 15; scaled by 1000) apart; float32 could not
    assert not torch.equal(net.embedding(t[:1], s[:1]), net.embedding(t[:1] - 1.82e-4, s[:1]))


def test_unet_block_matches_edms_formula_with_explicit_attention():
    torch.manual_seed(0)
    block = randomize_(imm.UNetBlock(32, 64, emb_channels=24, attention=True))
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 24, dtype=torch.float64)
    with torch.no_grad():
        out = block(x, emb)
        N, C, H, W = 2, 64, 8, 8
        h = block.conv0(F.silu(block.norm0(x)))
        affine = emb @ block.affine.weight.double().T + block.affine.bias.double()
        h = F.silu(block.norm1(h + affine.float()[:, :, None, None]))
        h = (block.conv1(h) + block.skip(x)) / math.sqrt(2)
        qkv = block.qkv(block.norm2(h)).reshape(N, C, 3, H * W)     # channel c of q is qkv channel 3c
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(C)).softmax(dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(N, C, H, W)
        ref = (block.proj(a) + h) / math.sqrt(2)
    assert rel_err(out, ref) < 1e-5


def test_resampling_equals_edms_depthwise_convolutions_with_the_stored_filter():
    """Reference: EDM's formulation, a depthwise conv (down, stride 2) or transposed conv (up, 4x the filter)."""
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    down, up = imm.Conv(5, 7, 3, down=True).double(), imm.Conv(5, 7, 1, up=True).double()
    f = down.resample_filter.tile(5, 1, 1, 1)
    with torch.no_grad():
        want = F.conv2d(F.conv2d(x, f, stride=2, groups=5), down.weight, down.bias, padding=1)
        torch.testing.assert_close(down(x), want, rtol=1e-13, atol=1e-13)
        want = F.conv2d(F.conv_transpose2d(x, 4 * f, stride=2, groups=5), up.weight, up.bias)
        torch.testing.assert_close(up(x), want, rtol=1e-13, atol=1e-13)
    assert down(x).shape == (2, 7, 4, 4) and up(x).shape == (2, 7, 16, 16)


def test_group_norm_keeps_channels_last_and_matches_the_native_op_with_gradients():
    torch.manual_seed(0)
    gn = randomize_(imm.group_norm(64)).double()
    x = (torch.randn(3, 64, 6, 5, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    ref, out = F.group_norm(x, 16, gn.weight, gn.bias, 1e-6), gn(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, gn.weight, gn.bias), g)
    grads = torch.autograd.grad(out, (x_cl, gn.weight, gn.bias), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # bf16 input (autocast's case): computed and returned in float32, like autocast's group_norm
    y = copy.deepcopy(gn).float()(x.detach().bfloat16().to(memory_format=torch.channels_last))
    assert y.dtype == torch.float32 and rel_err(y, ref) < 1e-2
    # float32 with a mean far from 0 (cancellation in x * scale + shift): about as accurate as the native op
    x32, gn32 = torch.randn(3, 64, 6, 5) + 50, copy.deepcopy(gn).float()
    ref64 = F.group_norm(x32.double(), 16, gn.weight, gn.bias, 1e-6)
    err, err_native = rel_err(gn32(x32.to(memory_format=torch.channels_last)), ref64), rel_err(gn32(x32), ref64)
    assert err < max(4 * err_native, 1e-6), (err, err_native)


# ---------------------------------------------------------------------------------------------
# the official checkpoint format (a raw pickle of persistent classes, official torch_utils/persistence.py),
# built here without the official code
# ---------------------------------------------------------------------------------------------

OFFICIAL_NAMES = {"IMMModel": "IMMPrecond", "DDPMpp": "SongUNet", "Conv": "Conv2d", "EmbeddingLinear": "Linear"}


@contextlib.contextmanager
def official_globals():
    """Temporary modules torch_utils.persistence and dnnlib.util, as the official pickles name them."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the official reconstructor must never run")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    mods = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}
    assert not any(name in sys.modules for name in mods)
    sys.modules.update(mods)
    try:
        yield persistence, util
    finally:
        for name in mods:
            sys.modules.pop(name, None)


class OfficialPickler(pickle.Pickler):
    """Pickles our modules as the official persistent classes do: REDUCE(_reconstruct_persistent_obj,
    (meta,)), meta carrying module source (here: a payload writing `marker`) and the instance __dict__.
    ModuleDict stays a plain NEWOBJ + BUILD; tensors go through torch's own reduce (_load_from_bytes)."""

    def __init__(self, f, marker, reconstruct, easydict, root_attrs, location="cpu"):
        super().__init__(f, protocol=4)
        self.src = f"import os\nopen({str(marker)!r}, 'w').write('module_src was executed')\n"
        self.reconstruct, self.easydict, self.root_attrs, self.location = reconstruct, easydict, root_attrs, location

    def reducer_override(self, obj):
        if isinstance(obj, torch.storage.TypedStorage) and self.location != "cpu":
            # what a GPU-trained checkpoint holds: the storage's legacy blob names 'cuda:0' as location
            buf = io.BytesIO()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # TypedStorage deprecation
                torch.save(obj, buf, _use_new_zipfile_serialization=False)
            loc = self.location.encode()
            blob = buf.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X" + len(loc).to_bytes(4, "little") + loc, 1)
            assert loc in blob
            return torch.storage._load_from_bytes, (blob,)
        if not isinstance(obj, nn.Module) or isinstance(obj, nn.ModuleDict):
            return NotImplemented
        state = dict(obj.__dict__)
        if isinstance(obj, imm.IMMModel):
            del state["cfg"]
            state |= self.root_attrs | dict(mixed_precision=torch.float32,
                                            _init_kwargs=self.easydict(model_type="SongUNet", dropout=0.2))
        if isinstance(obj, imm.UNetBlock):
            state["skip_scale"] = np.float64(np.sqrt(0.5))
        name = type(obj).__name__
        meta = dict(type="class", version=6, module_src=self.src, class_name=OFFICIAL_NAMES.get(name, name),
                    state=state)
        return self.reconstruct, (meta,)


CIFAR_ROOT_ATTRS = dict(sigma_data=0.5, T=0.994, eps=0.006, f_type="simple_edm", temb_type="identity",
                        noise_schedule="fm", time_scale=1000, nt_low=0.006036, nt_high=165.667)


def write_official(path, net, marker, extra_augment=False, location="cpu"):
    model = imm.IMMModel(net, imm.IMMConfig())
    if extra_augment:   # an extra tensor the loader must ignore, as the official copy_params_and_buffers does
        net.map_augment = nn.Linear(9, 128, bias=False)
    try:
        with official_globals() as (persistence, util), open(path, "wb") as f:
            data = {"ema": model, "loss_fn": None, "dataset_kwargs": util.EasyDict(resolution=32)}
            OfficialPickler(f, marker, persistence._reconstruct_persistent_obj, util.EasyDict, CIFAR_ROOT_ATTRS,
                            location).dump(data)
    finally:
        if extra_augment:
            del net.map_augment
    return path


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, random_net):
    d = tmp_path_factory.mktemp("official")
    path = write_official(d / "cifar10.pt", random_net, d / "marker", extra_augment=True, location="cuda:0")
    return path, d / "marker"


def test_load_official_reproduces_every_tensor_bit_for_bit_without_running_code(official_file, random_net, fresh_net,
                                                                                  tmp_path, monkeypatch):
    path, marker = official_file

    def guard(real):
        """exec/eval of source text (what the official loader does with module_src) is an error;
        code objects compiled from real files (torch's own lazy imports) may run."""
        def call(code, *args, **kwargs):
            if isinstance(code, (str, bytes)) or code.co_filename.startswith("<"):
                raise AssertionError("the loader must not execute code from the checkpoint")
            return real(code, *args, **kwargs)
        return call

    def no_import(name, *args, **kwargs):
        raise AssertionError(f"the loader must not import {name}")
    monkeypatch.setattr(builtins, "exec", guard(builtins.exec))
    monkeypatch.setattr(builtins, "eval", guard(builtins.eval))
    monkeypatch.setattr(importlib, "import_module", no_import)
    with pytest.raises(AssertionError):
        exec("pass")     # the guard is active
    model, cfg = train_cifar.load_official(path.as_uri(), cache_dir=tmp_path / "cache")   # a file:// URL: download path
    monkeypatch.undo()

    assert (tmp_path / "cache" / "cifar10.pt").read_bytes() == path.read_bytes()
    assert not marker.exists() and "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert cfg == imm.IMMConfig() and not model.training
    want = imm.IMMModel(random_net, imm.IMMConfig()).state_dict()
    got = model.state_dict()
    assert list(got) == list(want) and len(got) == 428
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert not torch.equal(got["model.enc.32x32_conv.weight"], fresh_net.enc["32x32_conv"].weight)


def test_flat_state_dict_follows_module_state_dict_rules():
    """Parameters and persistent buffers, as Module.state_dict(): None entries and non-persistent buffers skipped."""
    rec = lambda **state: train_cifar.persistent_record({"class_name": "X", "state": state})  # noqa: E731
    one, two = torch.ones(2), torch.zeros(3)
    md = train_cifar.Inert()
    md.__setstate__({"_parameters": {}, "_buffers": {}, "_modules": {"a": rec(_parameters={"w": one, "b": None})}})
    root = rec(_parameters={}, _buffers={"keep": two, "drop": one}, _non_persistent_buffers_set={"drop"},
               _modules={"enc": md, "gone": None})
    flat = train_cifar.flat_state_dict(root)
    assert list(flat) == ["keep", "enc.a.w"] and flat["keep"] is two and flat["enc.a.w"] is one


def test_a_download_is_cached_and_a_failed_one_leaves_no_file(official_file, tmp_path):
    path, _ = official_file
    copy_ = tmp_path / "remote" / "cifar10.pt"
    copy_.parent.mkdir()
    shutil.copy(path, copy_)
    cache = tmp_path / "cache"
    train_cifar.load_official(copy_.as_uri(), cache_dir=cache)
    copy_.unlink()
    train_cifar.load_official(copy_.as_uri(), cache_dir=cache)     # second call: served from the cache
    with pytest.raises(OSError):
        train_cifar.load_official((tmp_path / "remote" / "missing.pt").as_uri(), cache_dir=cache)
    assert os.listdir(cache) == ["cifar10.pt"]      # no partial file left behind


def protocol0_call(module, name, arg):
    return b"\x80\x02" + f"c{module}\n{name}\n(S{arg!r}\ntR.".encode()   # GLOBAL, MARK, STRING, TUPLE, REDUCE


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "exec"),
                                         ("builtins", "eval"), ("subprocess", "check_call"),
                                         ("importlib", "import_module"), ("sys", "exit"), ("real", "os.system")])
def test_code_running_globals_are_refused(module, name, tmp_path):
    marker = tmp_path / "marker"
    if module == "real":   # a real os.system pickle, inside the 'ema' entry

        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)
        payload, match = pickle.dumps({"ema": Evil()}, protocol=4), "refusing to load global (os|posix).system"
    else:
        arg = f"touch {marker}" if name in ("system", "check_call") else f"open({str(marker)!r}, 'w')"
        payload, match = protocol0_call(module, name, arg), f"{module}\\.{name}"
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=match):
        train_cifar.load_official(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unknown_globals_become_inert_stubs_that_only_record_arguments(tmp_path):
    target = tmp_path / "made_by_mkdtemp"
    target.mkdir()
    payload = (b"\x80\x02(ctempfile\nmkdtemp\n(S'x'\nS'y'\nS" + repr(str(target)).encode() + b"\ntR"
               b"cevil_pkg.mod\nrun\n(I42\ntR"
               b"ctorch.nn.modules.container\nModuleDict\n)\x81}S'_modules'\n}sbl.")
    made, run, md = train_cifar.OfficialUnpickler(io.BytesIO(payload)).load()
    assert os.listdir(target) == []                       # mkdtemp never ran
    assert made.args == ("x", "y", str(target)) and run.args == (42,) and "evil_pkg" not in sys.modules
    assert not isinstance(md, nn.Module) and md.state == {"_modules": {}}


def test_truncated_or_non_pickle_files_give_clear_errors(tmp_path):
    small = write_official(tmp_path / "small.pt", randomize_(tiny_net()), tmp_path / "marker")
    data = small.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "header_only.pt": data[:2], "empty.pt": b"",
             "random.pt": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
             "garbage_pickle.pt": b"\x80\x04" + bytes(range(200, 256)) * 20}
    zipped = io.BytesIO()
    torch.save({"ema": 1}, zipped)
    cases["zip.pt"] = zipped.getvalue()
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        msg = ("zip archive" if name == "zip.pt" else "not a pickle" if name in ("random.pt", "empty.pt")
               else "truncated or corrupt")
        with pytest.raises(ValueError, match=msg) as err:
            train_cifar.load_official(tmp_path / name)
        assert "expected an official IMM CIFAR-10 checkpoint" in str(err.value), name
    (tmp_path / "no_ema.pt").write_bytes(pickle.dumps({"model": 1}, protocol=4))
    with pytest.raises(ValueError, match="no 'ema' entry"):
        train_cifar.load_official(tmp_path / "no_ema.pt")
    assert not (tmp_path / "marker").exists()


def test_other_architectures_are_rejected_naming_the_keys(tmp_path):
    narrow = write_official(tmp_path / "narrow.pt", imm.DDPMpp(model_channels=16), tmp_path / "m")
    with pytest.raises(ValueError, match=r"not an IMM CIFAR-10 DDPM\+\+ checkpoint: 0 missing keys .*"
                                         r"model\.map_layer0\.weight \(64, 16\) != \(512, 128\)"):
        train_cifar.load_official(narrow)
    net = imm.DDPMpp(model_channels=16, num_blocks=3)
    del net.map_layer0_s
    fewer = write_official(tmp_path / "fewer.pt", net, tmp_path / "m")
    with pytest.raises(ValueError, match=r"missing keys \['model\.map_layer0_s\.weight', 'model\.map_layer0_s\.bias'"):
        train_cifar.load_official(fewer)
    with pytest.raises(ValueError, match=r"unexpected keys \['model\.dec\.16x16_block3\.norm2\.weight'"):
        train_cifar.load_official(fewer)
    assert not (tmp_path / "m").exists()


def test_official_config_maps_names_and_falls_back_to_cifar_defaults():
    state = dict(sigma_data=1.0, T=0.996, eps=0.0, f_type="euler_fm", temb_type="stride",
                 noise_schedule="fm", time_scale=500)
    assert train_cifar.official_config(state) == imm.IMMConfig(sigma_d=1.0, T=0.996, t_min=0.0, f_type="euler_fm",
                                                        temb="stride", schedule="fm", time_scale=500.0)
    cos = train_cifar.official_config(dict(noise_schedule="vp_cosine", T=0.996))
    assert cos.schedule == "vp_cosine" and cos.T == 0.996 and cos.f_type == "simple_edm"
    assert train_cifar.official_config({"sigma_data": train_cifar.Inert(), "T": True}) == imm.IMMConfig()
    with pytest.raises(ValueError, match="schedule"):
        train_cifar.official_config(dict(noise_schedule="vp"))


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def test_decode_images_matches_the_official_formula():
    v = torch.tensor([-2.0, -1.0, -1 + 0.5 / 127.5, 0.0, 127.999 / 127.5 - 128 / 127.5, 1.0, 1.01, 3.0],
                     dtype=torch.float64)
    x = torch.stack([v, -v, v.flip(0)]).reshape(1, 3, 2, 4)          # channel c holds its own values
    got = train_cifar.decode_images(x)
    want = np.floor(np.clip(x.numpy() * 127.5 + 128, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert got.dtype == torch.uint8 and got.shape == (1, 2, 4, 3)
    np.testing.assert_array_equal(got.numpy(), want)
    assert got[0, :, :, 0].flatten().tolist() == [0, 0, 1, 128, 127, 255, 255, 255]


def test_save_image_grid_writes_a_png_of_the_right_size(tmp_path):
    dec = torch.randint(0, 256, (5, 8, 6, 3), dtype=torch.uint8)
    train_cifar.save_image_grid(dec, tmp_path / "grid.png")       # default: ceil(sqrt(5)) = 3 per row
    with Image.open(tmp_path / "grid.png") as png:
        img = np.array(png)
    assert img.shape == (16, 18, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[8:16, 6:12], dec[4])
    np.testing.assert_array_equal(img[0:8, 12:18], dec[2])
    assert (img[8:16, 12:18] == 0).all()
    train_cifar.save_image_grid(dec[..., :1], tmp_path / "gray.png", nrow=5)
    with Image.open(tmp_path / "gray.png") as gray:
        assert gray.size == (30, 8) and gray.mode == "L"


def test_sample_images_runs_algorithm_2_or_5_on_the_papers_time_lists_and_a_longer_draw_starts_like_a_shorter_one(
        monkeypatch):
    cfg, uniform = IMMConfig(), lambda n: torch.linspace(0.994, 0.006, n + 1, dtype=torch.float64)
    torch.testing.assert_close(train_cifar.sampling_times(1, cfg), uniform(1))                  # official 1 step
    torch.testing.assert_close(train_cifar.sampling_times(2, cfg)[1], imm.eta_inv(1.4))        # official: eta 1.4
    for n, c in ((3, cfg), (8, cfg), (2, IMMConfig(f_type="euler_fm"))):   # uniform in t (Eq. 117); FM: Euler steps
        torch.testing.assert_close(train_cifar.sampling_times(n, c), uniform(n))
    model = IMMModel(randomize_(tiny_net(dropout=0.5)), cfg).train()
    priors, draw = [], train_cifar.prior_sample
    monkeypatch.setattr(train_cifar, "prior_sample", lambda *a, **k: priors.append(draw(*a, **k)) or priors[-1])
    x = {s: train_cifar.sample_images(model, 10, 4, s, seed=7, batch=4) for s in ("pushforward", "restart")}
    assert model.training and x["restart"].shape == (10, 8, 8, 3) and x["restart"].dtype == torch.uint8
    model.eval()
    torch.testing.assert_close(priors[:3], priors[3:])   # both samplers start from the same noise
    assert torch.equal(x["pushforward"], train_cifar.decode_images(
        imm.pushforward_sample(model, torch.cat(priors[:3]), uniform(4))))                     # Algorithm 2
    assert not torch.equal(x["restart"], x["pushforward"]) and not torch.equal(x["restart"][:4], x["restart"][4:8])
    for sampler in ("pushforward", "restart"):
        assert torch.equal(train_cifar.sample_images(model, 8, 4, sampler, seed=7, batch=4), x[sampler][:8])
        shares = [train_cifar.sample_images(model, 10, 4, sampler, seed=7, batch=4, rank=r, world=2) for r in (0, 1)]
        assert torch.equal(torch.cat([shares[0][:4], shares[1], shares[0][4:]]), x[sampler])   # batches 0, 1, 2
        assert not torch.equal(train_cifar.sample_images(model, 3, 4, sampler, seed=8, batch=4), x[sampler][:3])
    one = {s: train_cifar.sample_images(model, 3, 1, s, seed=7) for s in ("pushforward", "restart")}
    assert torch.equal(one["pushforward"], one["restart"])   # one restart step is one pushforward step


def test_sample_images_runs_the_network_under_the_given_autocast_and_bf16_moves_pixels_by_rounding_only():
    model, seen = IMMModel(randomize_(tiny_net()), IMMConfig()).eval(), []
    model.model.register_forward_hook(lambda m, inputs, out: seen.append(out.dtype))
    full = train_cifar.sample_images(model, 6, 2, seed=1)
    low = train_cifar.sample_images(model, 6, 2, seed=1, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2   # 2 network calls each; the default is full precision
    diff = (full.int() - low.int()).abs()
    assert 0 < diff.max() <= 8 and diff.float().mean() < 1   # bf16 keeps 8 bits: a few uint8 steps at most


# ============================================================================= train_cifar.py

SCRIPT_DIR = Path(HERE)
TINY_NET = ["--channels", "16", "--channel-mult", "1,1", "--num-blocks", "1", "--attn", "16",
            "--batch", "8", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_cpu_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_tiny(run_dir, *extra):
    train_cifar.main(TINY_NET + ["--data-dir", "fake", "--run-dir", str(run_dir), *extra])


def read_log(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "log.jsonl")]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training(a_dir, b_dir, exact=False):
    """Same logged losses and the same weights (bit for bit if `exact`, else to float-summation noise)."""
    a, b = read_log(a_dir), read_log(b_dir)
    ca, cb = load_ckpt(Path(a_dir) / "ckpt.pt"), load_ckpt(Path(b_dir) / "ckpt.pt")
    assert ca["step"] == cb["step"] and [r["step"] for r in a] == [r["step"] for r in b]
    if exact:
        assert [r["loss"] for r in a] == [r["loss"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    pairs = [(ca["model"], cb["model"])] + [(ca["ema"][k], cb["ema"][k]) for k in ca["ema"]]
    for sa, sb in pairs:
        for k in sa:
            if exact:
                assert torch.equal(sa[k], sb[k]), k
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# DDP: two gloo processes optimise exactly what one process with the same global batch does
# ---------------------------------------------------------------------------------------------

def torchrun(tmp_path, script, *args, nnodes=1, node_rank=0, port=None):
    """A torchrun command line (gloo on the CPU) for `script` with `args`."""
    launch = (["--nproc_per_node=2", "--standalone"] if nnodes == 1 else
              ["--nproc_per_node=1", f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}"])
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(script), *map(str, args)]


TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPT_DIR))
# --tiny's network has a 1x1 convolution after attention, whose weight gradient once came in another layout than the
# weight (DDP then warned "Grad strides do not match bucket view strides" and copied it); dropout masks are per rank
DDP_RUN = ["--tiny", "--batch", "8", "--log-every", "1", "--data-dir", "fake", "--dropout", "0", "--max-steps", "3"]


def test_one_global_batch_split_over_1_2_and_4_ranks_and_micro_batches_gives_the_same_particles_in_order():
    """Every rank draws the global batch itself and takes its slice: concatenated over ranks and micro-batches, the
    images (augmented), noise, times (one per group of M) and labels are the one-process batch, in its order."""
    cfg, data = IMMConfig.cifar(), torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)

    def batch(world, accum):
        parts = [part for rank in range(world) for part in train_cifar.micro_batches(
            data, train_cifar.global_batch(7, 3, len(data), 32, cfg, 0.5, torch.device("cpu")), rank * 32 // world,
            32 // world // accum, accum, cfg.M, labelled=True)]
        x, noise, times, labels = zip(*parts)
        return [torch.cat(v) for v in (x, noise, labels, *zip(*times))]
    one = batch(1, 1)
    assert [len(v) for v in one] == [32] * 3 + [8] * 3 and one[2].abs().sum() > 0
    for world, accum in ((1, 4), (2, 1), (2, 2), (4, 1), (4, 2)):
        assert all(torch.equal(a, b) for a, b in zip(batch(world, accum), one)), (world, accum)


@slow
def test_two_process_ddp_matches_one_process_with_accumulation(tmp_path):
    proc = subprocess.run(torchrun(tmp_path, SCRIPT_DIR / "train_cifar.py", *DDP_RUN, "--run-dir", tmp_path / "ddp"),
                          env=TORCHRUN_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "batch 8 = 2 x 1 x 4" in proc.stdout
    assert "Grad strides do not match" not in proc.stderr
    train_cifar.main(DDP_RUN + ["--run-dir", str(tmp_path / "one"), "--batch-gpu", "4"])   # two micro-batches of 4
    # the same sums in another order: float noise at most (measured: bit-identical with 2 ranks, on CPU/gloo and on
    # 2 GPUs/NCCL, since halving is exact); rtol leaves room for other rank counts
    assert_same_training(tmp_path / "ddp", tmp_path / "one")


@slow
def test_two_nodes_over_the_loopback_rendezvous_match_one_process(tmp_path):
    """The README's multi-node command, with both 'nodes' on this machine: torchrun --nnodes=2 and a c10d rendezvous."""
    port = 29_400 + os.getpid() % 500
    procs = [subprocess.Popen(torchrun(tmp_path, SCRIPT_DIR / "train_cifar.py", *DDP_RUN, "--run-dir",
                                       tmp_path / "nodes", nnodes=2, node_rank=n, port=port),
                              env=TORCHRUN_ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    train_cifar.main(DDP_RUN + ["--run-dir", str(tmp_path / "one"), "--batch-gpu", "4"])
    assert_same_training(tmp_path / "nodes", tmp_path / "one")


@slow
def test_samples_and_fid_statistics_shared_over_two_processes_equal_one_processs(tmp_path):
    """--sample, --fid and --fid-every with every rank: rank 0 gathers the images of one process, in order, and the
    ranks' summed feature moments give one process's FID statistics."""
    script = tmp_path / "sample.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "import imm, train_cifar, test_imm\n"
        "env = train_cifar.Env()\n"
        "train_cifar.fid_feature_extractor = lambda device: test_imm.FAKE_INCEPTION\n"
        "torch.manual_seed(0)\n"
        "model = imm.IMMModel(test_imm.tiny_net(), imm.IMMConfig())\n"
        "x = train_cifar.sample_images(model, 7, 4, 'restart', seed=3, batch=2, rank=env.rank, world=env.world)\n"
        "stats = train_cifar.fid_statistics(x.permute(0, 3, 1, 2), test_imm.FAKE_INCEPTION, env, batch=3)\n"
        "torch.save((train_cifar.gather_images(x, 7, env, batch=2), stats), sys.argv[1] + f'/rank{env.rank}.pt')\n"
        "for _ in range(2):   # computed by both ranks, then read from rank 0's cache: no rank waits for another\n"
        "    ref = train_cifar.fid_reference(x.permute(0, 3, 1, 2), sys.argv[1], env)\n"
        "env.close()\n")
    proc = subprocess.run(torchrun(tmp_path, script, tmp_path), env=TORCHRUN_ENV, cwd=tmp_path, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(tmp_path.glob("fid_reference_*.npz"))) == 1
    torch.manual_seed(0)
    model = IMMModel(tiny_net(), IMMConfig())
    one = train_cifar.sample_images(model, 7, 4, "restart", seed=3, batch=2)
    ref = train_cifar.fid_statistics(one.permute(0, 3, 1, 2), FAKE_INCEPTION, train_cifar.Env())
    (images, stats), (nothing, stats1) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(images, one) and nothing is None
    for s in (stats, stats1):
        np.testing.assert_allclose(s["mu"], ref["mu"], rtol=1e-12)
        np.testing.assert_allclose(s["sigma"], ref["sigma"], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Runs: resuming continues exactly with every option of the checkpoint, and loses nothing
# ---------------------------------------------------------------------------------------------

def test_resume_continues_exactly_with_every_option_of_the_checkpoint(tmp_path, monkeypatch, capsys):
    options = ["--batch", "16", "--lr", "3e-4", "--ema", "0.5,0.9", "--augment", "0.5", "--min-gap", "0.01",
               "--temb", "identity"]   # dropout 0.2 stays on: its masks are seeded by (seed, step, rank)
    train_tiny(tmp_path / "full", *options, "--max-steps", "4")
    train_tiny(tmp_path / "part", *options, "--max-steps", "2")
    with open(tmp_path / "part" / "log.jsonl", "a") as f:    # logged after the checkpoint, then kill -9
        f.write(json.dumps(dict(step=3, loss=1.0)) + "\n")
    monkeypatch.setattr(train_cifar, "load_dataset", lambda *a, **k: pytest.fail("a --data-dir fake run loaded data"))
    capsys.readouterr()
    train_cifar.main(["--resume", "auto", "--run-dir", str(tmp_path / "part"), "--max-steps", "4"])  # nothing else
    out = capsys.readouterr().out
    assert "batch 16 = 1 x 1 x 16" in out and "--max-steps 4 (was 2)" in out and "steps 2 -> 4" in out
    assert_same_training(tmp_path / "part", tmp_path / "full", exact=True)   # bit for bit on the CPU
    ckpt = load_ckpt(tmp_path / "part" / "ckpt.pt")
    assert sorted(ckpt["ema"]) == ["0.5", "0.9"] and ckpt["net"]["augment_dim"] == 9
    assert (ckpt["imm"]["min_gap"], ckpt["imm"]["temb"]) == (0.01, "identity") and ckpt["args"]["lr"] == 3e-4
    for bad in (["--channels", "32"], ["--M", "8"], ["--seed", "1"], ["--loss", "fm"], ["--temb", "stride"],
                ["--ema", "0.5"], ["--augment", "0"]):
        with pytest.raises(SystemExit, match=f"cannot resume with {bad[0]} .*: a resumed run keeps its network"):
            train_cifar.main(["--resume", str(tmp_path / "part"), "--max-steps", "5", *bad])


def test_a_checkpoint_from_before_ema_lists_resumes_with_its_one_ema(tmp_path):
    train_tiny(tmp_path, "--max-steps", "1")
    ckpt = load_ckpt(tmp_path / "ckpt.pt")
    ckpt["ema"], ckpt["args"]["ema"] = ckpt["ema"]["0.9999"], 0.9999   # the format of commit 44c9c2a and before
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train_cifar.main(["--resume", str(tmp_path), "--max-steps", "2"])
    assert list(load_ckpt(tmp_path / "ckpt.pt")["ema"]) == ["0.9999"]


def test_a_new_run_never_writes_into_a_folder_that_holds_one(tmp_path):
    train_tiny(tmp_path, "--max-steps", "2")
    before = {f: (tmp_path / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "args.json")}
    with pytest.raises(SystemExit, match=f"{tmp_path} already holds a run .*--resume {tmp_path}"):
        train_tiny(tmp_path, "--max-steps", "3")
    assert {f: (tmp_path / f).read_bytes() for f in before} == before


def test_each_ema_follows_its_warm_up_recursion(tmp_path):
    """ema_n = d_n ema_{n-1} + (1 - d_n) theta_n with d_n = min(rate, (1 + n) / (10 + n)), from the initial weights,
    for each rate of --ema (theta_n: the weights after step n, from runs of 1, 2 and 3 steps)."""
    rates, ckpts = (0.2, 0.6), []
    for n in (1, 2, 3):
        train_tiny(tmp_path / str(n), "--max-steps", str(n), "--ema", "0.2,0.6", "--lr", "0.01")
        ckpts.append(load_ckpt(tmp_path / str(n) / "ckpt.pt"))
    torch.manual_seed(0)
    init = IMMModel(imm.DDPMpp(**ckpts[0]["net"]), IMMConfig(**ckpts[0]["imm"])).state_dict()
    for rate in rates:
        ema = {k: v.clone() for k, v in init.items()}
        for n, ckpt in enumerate(ckpts):
            d = min(rate, (1 + n) / (10 + n))
            ema = {k: d * ema[k] + (1 - d) * ckpt["model"][k] if v.is_floating_point() else v for k, v in ema.items()}
        for k, v in ckpts[-1]["ema"][f"{rate:g}"].items():
            torch.testing.assert_close(v, ema[k], rtol=1e-6, atol=1e-7)
    emas = ckpts[-1]["ema"]
    assert not all(torch.equal(emas["0.2"][k], emas["0.6"][k]) for k in emas["0.2"])   # the two rates differ


def test_damaged_and_foreign_checkpoints_get_one_line_naming_the_file(tmp_path):
    train_tiny(tmp_path / "run", "--max-steps", "1")
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    bad = {"random.pt": np.random.default_rng(0).bytes(4096), "truncated.pt": good[:len(good) // 2]}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save({**load_ckpt(tmp_path / "run" / "ckpt.pt"), "ema": {}}, tmp_path / "no_ema.pt")

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)
    torch.save({"net": Evil()}, tmp_path / "evil.pt")
    for name, message in (("random.pt", "cannot be read as a checkpoint"), ("truncated.pt", "cannot be read"),
                          ("evil.pt", "cannot be read"), ("foreign.pt", "is not a train_cifar.py checkpoint"),
                          ("no_ema.pt", "holds no EMA weights")):
        for argv in (["--resume", str(tmp_path / name)], ["--sample", str(tmp_path / name)]):
            with pytest.raises(SystemExit) as e:
                train_cifar.main(argv + ["--run-dir", str(tmp_path / "out")])
            text = str(e.value)
            assert str(tmp_path / name) in text and message in text and "\n" not in text, text
            assert "weights_only=False" not in text and "Traceback" not in text


class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose update ruins the weights."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, poison):
    calls, real_loss = [], train_cifar.imm_loss

    def imm_loss(model, x, cfg, **kw):
        loss, stats = real_loss(model, x, cfg, **kw)
        calls.append(1)
        if len(calls) >= 2:   # the first call counts FLOPs; the second is step 3 of the resumed run
            loss = loss * float("nan") if poison == "loss" else NaNGrad.apply(loss)
        return loss, stats

    train_tiny(tmp_path, "--max-steps", "2", "--ckpt-every", "2")
    good = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train_cifar, "imm_loss", imm_loss)
    # a NaN loss is caught at the next loss check; a finite loss with NaN gradients by the weight check
    # that precedes every checkpoint (here no loss check comes first: --log-every 10)
    extra = ["--ckpt-every", "2"] if poison == "loss" else ["--ckpt-every", "1", "--log-every", "10"]
    with pytest.raises(SystemExit) as e:
        train_tiny(tmp_path, "--max-steps", "6", "--resume", "auto", *extra)
    expected = "loss is nan within steps 3..3" if poison == "loss" else "weights became non-finite by step 3"
    assert expected in str(e.value) and f"the last good checkpoint is {tmp_path / 'ckpt.pt'}" in str(e.value)
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def signal_after(cmd, sig, step, env=None, twice=False):
    """Run cmd, send it `sig` once it has printed step `step` (twice: again 0.1 s later); (return code, stdout,
    stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step} |"):
            proc.send_signal(sig)
            if twice:
                time.sleep(0.1)
                proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=240)
    return proc.returncode, "".join(seen) + out, err


@slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_training_after_a_step_with_a_checkpoint_that_resumes_exactly(tmp_path, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT_DIR / "train_cifar.py"), *TINY_NET, "--data-dir", "fake", "--max-steps", "100000",
           "--run-dir", str(run)]
    code, out, err = signal_after(cmd, sig, 2)
    step = load_ckpt(run / "ckpt.pt")["step"]
    assert code == 128 + sig and step >= 2 and "Traceback" not in err, err[-2000:]
    assert out.splitlines()[-1] == (f"stopped at step {step} by {sig.name}; checkpoint {run / 'ckpt.pt'}; "
                                    f"continue with --resume {run}")
    assert read_log(run)[-1]["step"] == step                    # the log line of the last step is written too
    train_cifar.main(["--resume", str(run), "--max-steps", str(step + 2)])
    train_tiny(tmp_path / "full", "--max-steps", str(step + 2))
    assert_same_training(run, tmp_path / "full", exact=True)


def test_a_second_ctrl_c_exits_at_once_and_the_checkpoint_before_it_still_resumes(tmp_path):
    """The first Ctrl-C asks for a checkpoint after the step; the second, 0.1 s later (the step, its checkpoint and
    grids take seconds here), exits at once with 130: no final checkpoint, and the one before still resumes."""
    run = tmp_path / "run"
    code, out, err = signal_after([sys.executable, str(SCRIPT_DIR / "train_cifar.py"), *TINY_NET, "--data-dir", "fake",
                                   "--max-steps", "100000", "--ckpt-every", "1", "--run-dir", str(run)],
                                  signal.SIGINT, 2, twice=True)
    assert code == 130 and "second Ctrl-C: exiting at once" in err and "stopped at step" not in out, (out, err)
    step = train_cifar.load_checkpoint(str(run / "ckpt.pt"))["step"]
    train_cifar.main(["--resume", str(run), "--max-steps", str(step + 1)])
    assert step >= 1 and load_ckpt(run / "ckpt.pt")["step"] == step + 1


@slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_errors_print_once(tmp_path):
    code, out, err = signal_after(torchrun(tmp_path, SCRIPT_DIR / "train_cifar.py", *DDP_RUN, "--max-steps", "100000",
                                           "--run-dir", tmp_path / "ddp"), signal.SIGTERM, 2, env=TORCHRUN_ENV)
    step = load_ckpt(tmp_path / "ddp" / "ckpt.pt")["step"]
    assert code != 0 and out.count("stopped at step") == 1 and f"stopped at step {step} by SIGTERM" in out, err
    train_cifar.main(["--resume", str(tmp_path / "ddp"), "--max-steps", str(step + 2), "--batch-gpu", "4"])
    train_cifar.main(DDP_RUN + ["--max-steps", str(step + 2), "--run-dir", str(tmp_path / "one"), "--batch-gpu", "4"])
    assert_same_training(tmp_path / "ddp", tmp_path / "one")
    for bad, message in ((["--batch", "33"], "--batch 33 is not divisible by the 2 processes"),
                         (["--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5")):
        proc = subprocess.run(torchrun(tmp_path, SCRIPT_DIR / "train_cifar.py", "--tiny", "--data-dir", "fake", *bad),
                              env=TORCHRUN_ENV, cwd=tmp_path, capture_output=True, text=True, timeout=150)
        assert proc.returncode != 0 and (proc.stdout + proc.stderr).count(message) == 1, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# What a cluster does to a run: full disks, two jobs on one folder, damaged files, signals at start-up, power loss
# ---------------------------------------------------------------------------------------------

def one_line(excinfo):   # the message of a one-line error
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


@contextlib.contextmanager
def file_size_limit(n_bytes):
    """ulimit -f: a write past n_bytes fails for real (EFBIG, after writing up to the limit), like a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_at_checkpoint_time_stops_in_one_line_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch,
                                                                                                 capsys):
    run = tmp_path / "run"
    train_tiny(run, "--max-steps", "2")
    good = (run / "ckpt.pt").read_bytes()

    def full_disk(obj, f):   # the disk fills up 4 KiB into the file
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as full:
        train_tiny(run, "--resume", "auto", "--max-steps", "3")
    monkeypatch.undo()
    with file_size_limit(len(good) // 2), pytest.raises(SystemExit) as limit:   # a real partial file
        train_tiny(run, "--resume", "auto", "--max-steps", "3")
    for e, reason in ((full, "No space left on device"), (limit, "File too large")):
        text = one_line(e)
        assert re.search(re.escape(f"cannot write to {run} ({reason};") + r" [\d,]+ MiB free on /", text)
        assert f"the last good checkpoint is {run / 'ckpt.pt'}" in text and f"--resume {run}" in text, text
    assert not list(run.glob("*.tmp")) and (run / "ckpt.pt").read_bytes() == good
    grids = {p: p.read_bytes() for p in run.glob("samples_0000003_*")}   # drawn by the tries above
    with file_size_limit(20_000), pytest.raises(SystemExit) as limit:   # redrawing them fills the disk
        train_tiny(run, "--resume", "auto", "--max-steps", "3")
    assert "File too large" in one_line(limit) and len(grids) == 2 and not list(run.glob("*.tmp"))
    assert all(p.read_bytes() == png for p, png in grids.items())   # each grid whole: the old one, not half a new one
    train_tiny(run, "--resume", "auto", "--max-steps", "3")   # once there is space again
    train_tiny(tmp_path / "full", "--max-steps", "3")
    assert_same_training(run, tmp_path / "full", exact=True)


def test_a_write_that_fails_mid_log_line_stops_in_one_line_and_resume_cuts_the_torn_line(tmp_path, capsys):
    run, full = tmp_path / "run", tmp_path / "full"
    train_tiny(run, "--max-steps", "3")
    size = (run / "log.jsonl").stat().st_size
    with file_size_limit(size + 100), pytest.raises(SystemExit) as e:   # the next line is torn after 100 bytes
        train_tiny(run, "--resume", "auto", "--max-steps", "5")
    text = one_line(e)
    assert f"cannot write to {run} (File too large;" in text and f"--resume {run}" in text, text
    assert f"the last good checkpoint is {run / 'ckpt.pt'}" in text and (run / "log.jsonl").stat().st_size == size + 100
    capsys.readouterr()
    train_cifar.main(["--resume", str(run), "--max-steps", "5"])
    assert f"{run / 'log.jsonl'}: cut 1 line(s) written after step 3, the last one torn" in capsys.readouterr().out
    train_tiny(full, "--max-steps", "5")
    assert_same_training(run, full, exact=True)


def test_resume_cuts_the_log_at_the_first_line_that_is_not_a_record_of_a_step_up_to_the_checkpoints(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n5\n{"step": 2}\n')   # a stray non-record line, then more
    train_cifar.truncate_log(str(log), 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder_and_a_kill_9_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT_DIR / "train_cifar.py"), *TINY_NET, "--data-dir", "fake", "--max-steps", "100000",
           "--ckpt-every", "1", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in proc.stdout:
            if line.startswith("step 2 |"):
                break
        with pytest.raises(SystemExit) as e:   # a scheduler's requeue while the first job still trains
            train_cifar.main(["--resume", str(run), "--max-steps", "40"])
    finally:
        proc.kill()   # kill -9: its lock goes with it
        proc.wait()
    assert f"{run} is in use by another training process (pid {proc.pid} on {os.uname().nodename})" in one_line(e)
    step = train_cifar.find_checkpoint(str(run))[1]["step"]   # (ckpt.pt, or ckpt.prev.pt if killed between renames)
    train_cifar.main(["--resume", str(run), "--max-steps", str(step + 1)])
    assert load_ckpt(run / "ckpt.pt")["step"] == step + 1 and [r["step"] for r in read_log(run)] == list(
        range(1, step + 2))


def test_a_damaged_or_missing_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    run, full = tmp_path / "run:a", tmp_path / "full"   # a ':' in the path: the reason is still given whole
    train_tiny(run, "--max-steps", "3", "--ckpt-every", "2")
    train_tiny(full, "--max-steps", "4")
    assert load_ckpt(run / "ckpt.prev.pt")["step"] == 2
    for damage, why in (("cut in half", "cannot be read as a checkpoint"), ("deleted", "no checkpoint at")):
        newest = (run / "ckpt.pt").read_bytes()
        if damage == "deleted":
            (run / "ckpt.pt").unlink()
        else:
            (run / "ckpt.pt").write_bytes(newest[:len(newest) // 2])
        capsys.readouterr()
        train_cifar.main(["--sample", str(run), "--run-dir", str(tmp_path / "samples")])   # says which file it used
        assert f"using {run / 'ckpt.prev.pt'} (" in capsys.readouterr().out
        train_cifar.main(["--resume", str(run), "--max-steps", "4"])
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("resumed from"))
        assert line.startswith(f"resumed from {run / 'ckpt.prev.pt'} at step 2 (") and why in line, line
        assert_same_training(run, full, exact=True)
        assert load_ckpt(run / "ckpt.prev.pt")["step"] == 2   # the damaged file never pushes the good one out


def test_a_kill_while_grids_are_drawn_loses_no_grid(tmp_path, monkeypatch):
    class Killed(BaseException):   # stands for kill -9: nothing catches it
        pass

    def killed_at_step_2(model, out_dir, tag, *args):
        if "_0000002_" in tag:
            raise Killed
        return save_grids(model, out_dir, tag, *args)
    save_grids = train_cifar.save_grids
    monkeypatch.setattr(train_cifar, "save_grids", killed_at_step_2)
    with pytest.raises(Killed):
        train_tiny(tmp_path, "--max-steps", "2", "--ckpt-every", "1")
    gc.collect()   # the dead run's lock, which the OS releases when a process dies
    monkeypatch.undo()
    train_cifar.main(["--resume", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        f"samples_000000{n}_ema0.9999_pushforward_{k}step.png" for n in (1, 2) for k in (1, 2)]


def test_a_run_killed_before_its_first_checkpoint_continues_with_resume_and_no_log_is_cut_silently(tmp_path, capsys):
    run, full = tmp_path / "run", tmp_path / "full"
    train_tiny(full, "--max-steps", "3", "--batch", "16")
    for argv in (["--resume", str(run)], ["--resume", "auto", "--run-dir", str(run)]):
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(full, run)
        (run / "ckpt.pt").unlink()   # as a kill before the first checkpoint leaves the folder
        with pytest.raises(SystemExit, match=f"{run} already holds a run .*: continue it with --resume {run}"):
            train_tiny(run, "--max-steps", "3")
        capsys.readouterr()
        train_cifar.main(argv + ["--max-steps", "3"])   # its options come from its args.json
        out = capsys.readouterr().out
        assert f"{run / 'log.jsonl'}: cut 3 line(s) written after step 0" in out and "batch 16 = " in out, out
        assert_same_training(run, full, exact=True)


def test_a_read_only_run_folder_is_refused_in_one_line_before_the_model_is_built(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_tiny(run, "--max-steps", "1")

    def read_only(path, mode="r", *a, **k):   # as for a user without write access (root may write anyway)
        if str(path).startswith(str(run)) and set(mode) & set("wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *a, **k)
    monkeypatch.setattr(train_cifar, "open", read_only, raising=False)
    monkeypatch.setattr(train_cifar, "IMMModel", lambda *a, **k: pytest.fail("the model was built"))
    run.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            train_cifar.main(["--resume", str(run), "--max-steps", "2"])
    finally:
        run.chmod(0o755)
    assert f"cannot write to {run} (Permission denied;" in one_line(e) and "writable" in one_line(e)


def caught_signals(pid):   # the stop signals that process `pid` running train_cifar.py handles (Linux: /proc/PID)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if b"train_cifar.py" not in f.read():   # not yet exec'd: still a copy of this process
            return set()
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return {s for s in (signal.SIGINT, signal.SIGTERM) if mask >> (s - 1) & 1}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_ends_the_process_in_one_line_with_128_plus_its_number(tmp_path, sig):
    cmd = [sys.executable, str(SCRIPT_DIR / "train_cifar.py"), *TINY_NET, "--data-dir", "fake", "--max-steps", "100000",
           "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while caught_signals(proc.pid) != {signal.SIGINT, signal.SIGTERM} and time.time() < deadline:
        time.sleep(0.01)   # from here on torch is imported, the model built, ...: all before the first step
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    assert f"stopped by {sig.name} during start-up" in err and "step" not in out, err


def test_ctrl_c_after_sigterm_is_named_so_and_a_stop_during_the_last_step_finishes_the_run(tmp_path, monkeypatch,
                                                                                           capsys):
    def exit_at_once(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_at_once)
    stops = train_cifar.StopSignals()
    stops.handle(signal.SIGTERM, None)
    with pytest.raises(SystemExit, match="130"):
        stops.handle(signal.SIGINT, None)
    assert capsys.readouterr().err.startswith("Ctrl-C after SIGTERM: exiting at once")
    monkeypatch.setattr(train_cifar.StopSignals, "agreed", lambda self, env, pending: signal.SIGTERM)
    train_tiny(tmp_path, "--max-steps", "1")   # the signal came during the last step: the run is complete
    assert capsys.readouterr().out.splitlines()[-1] == f"done: 1 steps, checkpoint {tmp_path / 'ckpt.pt'}"


def test_a_checkpoint_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or
                        fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    train_tiny(tmp_path, "--max-steps", "1")
    ckpt = os.path.realpath(tmp_path / "ckpt.pt")
    i = events.index(("replace", str(tmp_path / "ckpt.pt.tmp"), str(tmp_path / "ckpt.pt")))
    assert ("fsync", ckpt + ".tmp") in events[:i] and ("fsync", os.path.dirname(ckpt)) in events[i + 1:], events


# ---------------------------------------------------------------------------------------------
# What a step logs: the loss per bin of t; flow matching through the same script; fp16's loss scaling
# ---------------------------------------------------------------------------------------------

def test_loss_per_time_bin_averages_back_to_the_logged_loss(tmp_path, capsys):
    train_tiny(tmp_path, "--max-steps", "4", "--batch", "32", "--log-every", "2")
    assert "w*mmd2 by t [" in capsys.readouterr().out
    for rec in read_log(tmp_path):
        counts, means = rec["groups_per_t_bin"], rec["loss_per_t_bin"]
        assert len(counts) == len(means) == 8 and sum(counts) == 2 * 32 // 4   # 2 steps of 8 groups
        assert all((m is None) == (n == 0) for m, n in zip(means, counts))
        total = sum(m * n for m, n in zip(means, counts) if n) / sum(counts)
        assert total == pytest.approx(rec["loss"], rel=1e-5)
        assert rec["t_bin_edges"][0] == 0.006 and rec["t_bin_edges"][-1] == 0.994


def test_the_cifar_training_path_overfits_a_handful_of_images():
    """200 training steps (global_batch, micro_batches with the default augmentation, train_step, RAdam) of a tiny
    DDPM++ on 4 fixed 8x8 images bring its 1-step samples within 0.3 (RMS distance to the nearest training image or its
    mirror; pixels in [-1, 1]) where the untrained network's lie 0.54 away; measured 0.16 to 0.21, seeds 0-4. k = 6
    (CIFAR: 15) takes the induction from r to t in coarser steps, so it reaches the 1-step jump within those steps."""
    cfg, (u, v) = IMMConfig.cifar(k=6), centred_pixels(8)
    data = torch.stack([torch.where(u ** 2 + v ** 2 < 7, torch.tensor([220, 60 + 20 * i, 40])[:, None, None],
                                    torch.tensor([30, 40, 180 - 20 * i])[:, None, None] + 4 * (v + 3.5))
                        for i in range(4)]).to(torch.uint8)   # a disk on a gradient, in four colours
    mirrored = torch.cat([data, data.flip(3)]).float() / 127.5 - 1

    def distance(model):   # of 1-step samples to the nearest training image, on average
        x = train_cifar.sample_images(model, 32, steps=1).permute(0, 3, 1, 2).float() / 127.5 - 1
        return (x[:, None] - mirrored).pow(2).mean((2, 3, 4)).sqrt().amin(1).mean().item()
    torch.manual_seed(0)
    model = IMMModel(tiny_net(attn_resolutions=(), dropout=0.0, augment_dim=9), cfg)
    untrained, opt = distance(model), torch.optim.RAdam(model.parameters(), lr=1e-2)
    for step in range(200):
        draws = train_cifar.global_batch(step, 0, len(data), 32, cfg, 0.12, torch.device("cpu"), img_shape=(3, 8, 8))
        train_cifar.train_step(model, opt, train_cifar.micro_batches(data, draws, 0, 32, 1, cfg.M, labelled=True), cfg,
                               accum=1, autocast=contextlib.nullcontext())
    assert untrained > 0.45 and distance(model) < 0.3, (untrained, distance(model))


def test_flow_matching_baseline_trains_through_the_same_script_and_samples_with_euler_steps(tmp_path):
    train_tiny(tmp_path, "--max-steps", "1", "--loss", "fm")
    ckpt = load_ckpt(tmp_path / "ckpt.pt")
    assert ckpt["imm"]["f_type"] == "euler_fm" and ckpt["args"]["loss"] == "fm"
    # at init sigma_d G ~ 0, so the regression loss is E|noise - x|^2 per element: about sigma_d^2 + E x^2 = 0.25 + 1/3
    assert read_log(tmp_path)[0]["loss"] == pytest.approx(0.25 + 1 / 3, rel=0.1)
    assert (tmp_path / "samples_0000001_ema0.9999_euler_2step.png").exists()   # Euler steps (sampling_times' test)
    with pytest.raises(SystemExit, match="--sampler restart: a flow-matching model samples with Euler steps"):
        train_cifar.main(["--sample", str(tmp_path), "--sampler", "restart"])


def test_fp16_with_loss_scaling_takes_the_fp32_step():
    """One RAdam step under fp16 autocast with the GradScaler lands where the fp32 step lands (to fp16 accuracy):
    the loss scale (65536) is undone before the update (measured: 0.5% apart; a scaled gradient reaching RAdam's
    first, SGD-like steps would move the weights 65536 times too far)."""
    cfg = IMMConfig()
    batch = (torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, 3, 16, 16) * 0.5,
             imm.sample_times(2, cfg, generator=torch.Generator().manual_seed(1)), None)
    after = {}
    for mode in ("fp32", "fp16"):
        model = IMMModel(randomize_(tiny_net(img_resolution=16, model_channels=16, attn_resolutions=(8,),
                                             dropout=0.0), seed=0), cfg)
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.RAdam(model.parameters(), lr=1e-3)
        autocast, scaler = train_cifar.precision_setup(mode, "cpu")
        assert (scaler is None) == (mode == "fp32")
        train_cifar.train_step(model, opt, iter([batch]), cfg, accum=1, autocast=autocast, scaler=scaler)
        after[mode] = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert after["fp32"].abs().max() > 0
    assert rel_err(after["fp16"], after["fp32"]) < 0.1


def test_a_training_step_in_channels_last_gives_the_loss_and_gradients_of_one_in_nchw():
    """Compiled and channels_last is the GPU default (main converts the model, not the images): one step of the NHWC
    model, whose every block then computes in NHWC, gives the NCHW step's loss and gradients (float64, to round-off)."""
    cfg, data = IMMConfig.cifar(), torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    draws = train_cifar.global_batch(0, 0, len(data), 16, cfg, 0.5, torch.device("cpu"), img_shape=(3, 8, 8))
    (x, noise, times, labels), = train_cifar.micro_batches(data, draws, 0, 16, 1, cfg.M, labelled=True)
    net, steps = randomize_(tiny_net(dropout=0.0, augment_dim=9)).double(), []
    for layout in (torch.contiguous_format, torch.channels_last):
        model, nhwc = IMMModel(copy.deepcopy(net), cfg).to(memory_format=layout).train(), []
        for block in (m for m in model.modules() if isinstance(m, imm.UNetBlock)):   # the layout each block computes in
            block.register_forward_hook(lambda m, i, out: nhwc.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)   # the step is minus the gradient
        loss = train_cifar.train_step(model, opt, iter([(x.double(), noise.double(), times, labels)]), cfg, accum=1,
                                      autocast=contextlib.nullcontext())
        steps.append((loss, [b - a for a, b in zip(net.parameters(), model.parameters())], nhwc))
    (loss, grads, nhwc), (loss_cl, grads_cl, nhwc_cl) = steps
    assert not any(nhwc) and nhwc_cl and all(nhwc_cl) and sum(g.abs().sum() for g in grads) > 0
    torch.testing.assert_close(loss_cl, loss, rtol=1e-12, atol=0)
    for g, g_cl in zip(grads, grads_cl):
        torch.testing.assert_close(g_cl, g, rtol=1e-9, atol=1e-12)


def test_bench_counts_the_flops_of_each_loss_and_writes_no_run_folder(tmp_path, monkeypatch, capsys):
    """IMM's step costs a forward with gradient, a target forward and a backward (2 forwards): 4 forwards per image;
    flow matching's 3. Counted here from one forward (on the meta device, as flops_per_image does: there attention is
    two matrix products that the counter sees); --bench prints its numbers and writes nothing."""
    from torch.utils.flop_counter import FlopCounterMode
    net_cfg = train_cifar.net_kwargs(train_cifar.parse_args(TINY_NET)[0])
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"):
        IMMModel(imm.DDPMpp(**net_cfg), IMMConfig())(torch.zeros(1, 3, 32, 32), t=0.5, s=0.1)
    forward = counter.get_total_flops()
    assert train_cifar.flops_per_image(net_cfg, IMMConfig(), imm.imm_loss) == pytest.approx(4 * forward, rel=0.02)
    assert train_cifar.flops_per_image(net_cfg, IMMConfig(f_type="euler_fm"), imm.fm_loss) == pytest.approx(
        3 * forward, rel=0.02)
    monkeypatch.chdir(tmp_path)
    train_cifar.main(TINY_NET + ["--bench", "1"])
    assert "ms/step" in capsys.readouterr().out and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Data: the CIFAR-10 python format, image folders, and clear errors for everything else
# ---------------------------------------------------------------------------------------------

def write_cifar_python(folder, n_per_batch=2, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * n_per_batch, b"batch_label": name.encode()}, f)
        batches.append(data)
    return np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)   # rows are R(1024) G(1024) B(1024)


def write_pngs(folder, images):
    for i, im in enumerate(images):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"class{i % 2}" / f"{i:03d}.png")


def test_cifar_python_folder_loads_train_batches_only(tmp_path, capsys):
    expected = write_cifar_python(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):   # the root or the folder itself
        data = train_cifar.load_dataset(str(where))
        assert data.dtype == torch.uint8 and data.shape == (10, 3, 32, 32)
        assert torch.equal(data, torch.from_numpy(expected))
    train_cifar.main(TINY_NET + ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"),
                                 "--max-steps", "1"])
    assert ", 10 images," in capsys.readouterr().out and read_log(tmp_path / "run")[0]["step"] == 1


def test_image_folder_loads_pngs_in_class_subfolders(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_pngs(tmp_path, images)
    data = train_cifar.load_dataset(str(tmp_path))
    order = [0, 2, 4, 1, 3]                                          # sorted paths: class0/*, then class1/*
    assert torch.equal(data, torch.from_numpy(images[order]).permute(0, 3, 1, 2))


def test_bad_data_gives_one_clear_error_and_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision

    def offline(root, **k):
        os.makedirs(root, exist_ok=True)   # as torchvision does before it fails
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")          # never downloads into a folder with files
    write_pngs(tmp_path / "small", np.zeros((1, 16, 16, 3), dtype=np.uint8))
    write_cifar_python(tmp_path / "partial")
    (tmp_path / "partial" / "data_batch_3").unlink()
    write_cifar_python(tmp_path / "broken")
    (tmp_path / "broken" / "data_batch_2").write_bytes(b"not a pickle")
    write_cifar_python(tmp_path / "evil")
    with open(tmp_path / "evil" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": os.system}, f)
    for folder, message in (("junk", "no training data in"), ("no/such/path", "could not download CIFAR-10"),
                            ("small", "is 16x16; this script trains on 32x32 images"),
                            ("partial", "missing data_batch_3"), ("broken", "is not a CIFAR-10 python batch"),
                            ("evil", "unexpected global (posix|os).system")):
        with pytest.raises(SystemExit, match=message):   # from the command line: a message, no traceback
            train_cifar.main(TINY_NET + ["--data-dir", str(tmp_path / folder), "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "no").exists()   # the mistyped path that a failed download created is gone again


# ---------------------------------------------------------------------------------------------
# EDM's augmentation: what each transform does, to each image of a batch, with EDM's probabilities
# ---------------------------------------------------------------------------------------------

def smooth_image(u, v, phase=0.0):
    """A 3-channel image as a function of pixel coordinates centred on the image (u to the right, v down), band-limited
    (periods of 13 px or more) so that bicubic resampling reproduces it closely."""
    return torch.stack([torch.sin(2 * math.pi * u / 16 + 0.3 + phase) * torch.cos(2 * math.pi * v / 21),
                        torch.cos(2 * math.pi * (u + v) / 24 + phase),
                        0.5 * torch.sin(2 * math.pi * u / 32) + 0.4 * torch.cos(2 * math.pi * v / 13 + phase)])


def centred_pixels(size=32):   # (u, v) of every pixel, [size, size] each
    v, u = torch.meshgrid(*[torch.arange(size, dtype=torch.float64) - (size - 1) / 2] * 2, indexing="ij")
    return u, v


def aug_params(**values):
    """augment_params' choices at p > 0 for one image: nothing applied except `values`."""
    p = {k: torch.zeros(1, dtype=torch.float64) for k in ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle")}
    p["translate"] = torch.zeros(2, 1, dtype=torch.float64)
    return p | {k: torch.tensor(v, dtype=torch.float64).reshape(p[k].shape) for k, v in values.items()}


def test_augment_at_p_zero_only_x_flips_and_untransformed_images_stay_bit_exact():
    """p = 0 (--augment 0) draws the x-flips that p > 0 draws, and nothing else; at p > 0 an image that drew no
    geometric transform is only blit-flipped, never resampled."""
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    p0, p = (train_cifar.augment_params(64, prob, torch.Generator().manual_seed(0)) for prob in (0.0, 0.12))
    assert list(p0) == ["xflip"] and torch.equal(p0["xflip"], p["xflip"]) and 0 < p0["xflip"].mean() < 1
    flipped = torch.stack([im.flip(2) if f else im for im, f in zip(x, p0["xflip"])])
    assert torch.equal(train_cifar.augment(x, p0), flipped)
    still = torch.stack([p["scale"], p["rotate"], p["aniso"], *p["translate"]]).eq(0).all(0)
    assert 10 < still.sum() < 60
    for im, out, fx, fy, s in zip(x, train_cifar.augment(x, p), p["xflip"], p["yflip"], still):
        want = im.flip(2) if fx else im
        assert torch.equal(out, want.flip(1) if fy else want) == bool(s)


@pytest.mark.parametrize("values", [dict(scale=1.5), dict(rotate=0.7), dict(aniso=1.2, aniso_angle=0.5),
                                    dict(translate=[0.3, -0.2]), dict(xflip=1.0), dict(yflip=1.0)])
def test_each_augmentation_undone_by_its_inverse_gives_the_image_back(values):
    x = smooth_image(*centred_pixels())[None].float()
    p = aug_params(**values)
    y = train_cifar.augment(x, p)
    back = train_cifar.augment(y, {k: -v if k in ("scale", "rotate", "aniso", "translate") else v
                                   for k, v in p.items()})
    assert (y - x).abs().max() > 0.4   # the transform did something
    # two bicubic resamplings of a smooth image, away from the reflected borders: measured at most 0.035; flips exact
    assert (back - x)[..., 8:24, 8:24].abs().max() < 0.06


def test_augmentations_do_what_their_labels_say():
    """Flips, a quarter turn and a shift against torch's pixel operations; the 9 labels; the matrix of all four
    geometric transforms against EDM's composition (augment.py: G^-1 = S^-1 R(theta) A_r^-1 T^-1; a unit of shift
    is 0.125 image widths)."""
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for values, want, labels in ((dict(xflip=1.0), x.flip(3), [1, 0, 0, 0, 0, 0, 0, 0, 0]),
                                 (dict(yflip=1.0), x.flip(2), [0, 1, 0, 0, 0, 0, 0, 0, 0]),
                                 (dict(rotate=math.pi / 2), torch.rot90(x, 1, (2, 3)), [0, 0, 0, -1, 1, 0, 0, 0, 0]),
                                 (dict(translate=[1.0, -0.5]), torch.roll(x, (-2, 4), (2, 3)),   # 4 px right, 2 up
                                  [0, 0, 0, 0, 0, 0, 0, 1, -0.5])):
        p = aug_params(**values)
        inside = (..., slice(0, 30), slice(4, 32))   # what the shift does not fill by reflection
        torch.testing.assert_close(train_cifar.augment(x, p)[inside], want[inside], rtol=0, atol=1e-4)
        torch.testing.assert_close(train_cifar.augment_labels(p)[0], torch.tensor(labels, dtype=torch.float32),
                                   rtol=0, atol=1e-6)
    theta, r = 0.4, math.pi / 3
    p = aug_params(scale=5.0, rotate=theta, aniso=2.0, aniso_angle=r, translate=[0.5, -1.0])

    def rot(a):
        return torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]],
                            dtype=torch.float64)
    diag = lambda a, b: torch.diag(torch.tensor([a, b, 1], dtype=torch.float64))   # noqa: E731
    shift = torch.tensor([[1, 0, -2], [0, 1, 4], [0, 0, 1]], dtype=torch.float64)   # by (0.5, -1) x 4 px
    torch.testing.assert_close(train_cifar.augment_matrix(p, 32)[0],   # 2^(0.2 x 5) = 2, 2^(0.2 x 2) = 2^0.4
                               diag(0.5, 0.5) @ rot(theta) @ rot(-r) @ diag(2 ** -0.4, 2 ** 0.4) @ rot(r) @ shift)
    torch.testing.assert_close(train_cifar.augment_labels(p)[0], torch.tensor(
        [0, 0, 5, math.cos(theta) - 1, math.sin(theta), 2 * math.cos(r), 2 * math.sin(r), 0.5, -1]).float())


def test_augment_reads_each_image_of_a_batch_at_its_own_matrix_times_the_pixel_coordinates():
    """Output pixel (u, v) of image i is input image i at F_i G_i^-1 (u, v) (G_i^-1: augment_matrix; F_i: its flips),
    checked on images given as functions of the coordinates, wherever that point lies well inside the image: every
    image gets its own transform and keeps its place in the batch."""
    n, (u, v) = 16, centred_pixels()
    x = torch.stack([smooth_image(u, v, phase=i) for i in range(n)]).float()
    p = train_cifar.augment_params(n, 1.0, torch.Generator().manual_seed(3))
    G = train_cifar.augment_matrix(p, 32)
    q = (G[:, :2, :2] @ torch.stack([u, v]).reshape(2, -1) + G[:, :2, 2:]) * (1 - 2 * torch.stack(
        [p["xflip"], p["yflip"]], 1))[:, :, None]                  # [n, 2, pixels]: where each output pixel reads
    want = torch.stack([smooth_image(*q[i].reshape(2, 32, 32), phase=i) for i in range(n)]).float()
    inside = (q.abs() < 13).all(1).reshape(n, 1, 32, 32).expand_as(x)   # bicubic taps reach 2 px; no reflection
    assert inside.float().mean() > 0.3 and 0 < p["xflip"].sum() < n and 0 < p["yflip"].sum() < n
    assert (train_cifar.augment(x, p) - want)[inside].abs().max() < 0.04   # measured 0.025 (bicubic's own error)


def test_augmentation_probabilities_follow_edm():
    """EDM's CIFAR-10 pipe (xflip=1e8, yflip=scale=rotate_frac=aniso=translate_frac=1, aniso_rotate_prob=0.5) over
    40,000 draws at p = 0.12: how often each transform is applied, independently, and its distribution."""
    n, prob = 40_000, 0.12
    p = train_cifar.augment_params(n, prob, torch.Generator().manual_seed(0))
    on = {k: p[k] != 0 for k in ("xflip", "yflip", "scale", "rotate", "aniso")} | dict(translate=p["translate"][0] != 0)
    rate = lambda m: m.double().mean().item()   # noqa: E731
    assert rate(on["xflip"]) == pytest.approx(0.5, abs=0.01)    # xflip * p >= 1: every image, half of them flipped
    assert rate(on["yflip"]) == pytest.approx(prob / 2, abs=0.005)
    for k in ("scale", "rotate", "aniso", "translate"):
        assert rate(on[k]) == pytest.approx(prob, abs=0.006)
    assert rate(on["scale"] & on["rotate"]) == pytest.approx(prob ** 2, abs=0.0025)   # independent gates
    assert torch.equal(p["translate"][1] != 0, on["translate"])   # one gate for both axes
    assert rate(p["aniso_angle"][on["aniso"]] != 0) == pytest.approx(0.5, abs=0.03) and not p["aniso_angle"][
        ~on["aniso"]].any()   # the axis of an applied anisotropy is turned half the time
    for k in ("scale", "aniso", "translate"):   # N(0, 1) where applied
        values = p[k][..., on[k]]
        assert values.mean().item() == pytest.approx(0, abs=0.06) and values.std().item() == pytest.approx(1, abs=0.05)
    theta = p["rotate"][on["rotate"]]   # U(-pi, pi)
    assert theta.abs().max() <= math.pi and theta.abs().mean().item() == pytest.approx(math.pi / 2, abs=0.06)


# ---------------------------------------------------------------------------------------------
# Every bad option is refused in one line before anything is written
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
    (["--channel-mult", "abc"], "argument --channel-mult: expected comma-separated numbers such as 2,2,2"),
    (["--channels", "0"], "argument --channels: must be at least 1, got 0"),
    (["--ema", "2"], "argument --ema: expected comma-separated numbers such as 0.999,0.9999 (each in [0, 1))"),
    (["--max-steps", "-5"], "argument --max-steps: must be at least 1, got -5"),
    (["--lr", "x"], "argument --lr: expected a number, got 'x'"),
    (["--sample"], "argument --sample: expected one argument"),
    (["--batch", "10"], "the per-GPU micro-batch 10 is not a multiple of M=4"),
    (["--batch-gpu", "3"], "--batch-gpu 3 does not divide the per-process batch 8"),
    (["--batch", "12", "--batch-gpu", "6"], "not a multiple of M=4"),
    (["--sample", "a", "--fid", "b"], "choose one of --sample and --fid"),
    (["--sample", "a", "--ema", "0.5,0.9"], "give one EMA rate"),
    (["--resume", "nowhere/ckpt.pt"], "no checkpoint at nowhere/ckpt.pt"),
    (["--sample", "nowhere"], "no checkpoint at nowhere"),
    (["--steps", "0"], "argument --steps: expected comma-separated numbers such as 2,2,2 (positive integers)"),
    (["--n", "5"], "--n is the number of samples of --sample, --fid or --fid-every: use it with one of them"),
    (["--loss", "fm", "--sampler", "restart"], "--sampler restart: a flow-matching model samples with Euler steps"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train_cifar.main(TINY_NET + ["--data-dir", "fake", "--run-dir", str(tmp_path / "r")] + argv)
    text = capsys.readouterr().err if e.value.code == 2 else str(e.value)   # 2: argparse's own exit, on stderr
    assert message in text and text.strip().count("\n") == 0, text
    assert not (tmp_path / "r").exists()


def test_the_demo_refuses_bad_options_in_one_line(capsys):
    for argv, message in ((["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
                          (["--batch", "10"], "argument --batch: must be at least 4 and a multiple of 4, got 10")):
        with pytest.raises(SystemExit) as e:
            imm.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_running_out_of_memory_names_a_micro_batch_that_helps(tmp_path, monkeypatch):
    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 824633720832 bytes")
    monkeypatch.setattr(train_cifar, "train_step", no_memory)
    with pytest.raises(SystemExit, match="out of memory with a micro-batch of 8 images on cpu: use --batch-gpu 4 "):
        train_tiny(tmp_path, "--max-steps", "1")


def test_help_shows_every_default_as_the_value_it_parses_to_and_the_tiny_preset_yields_to_typed_options():
    parser = train_cifar.get_parser()
    defaults, formatter = parser.parse_args([]), parser._get_formatter()
    for action in parser._actions[1:]:   # after --help
        shown = re.fullmatch(r" \(default: (.*)\)", formatter._expand_help(action)[len(action.help):])
        assert action.help and (shown is None) == (action.default in (None, "") or action.default is False), action.dest
        if shown:   # typed as shown, it gives the default
            typed = parser.parse_args([action.option_strings[0], shown.group(1)])
            assert getattr(typed, action.dest) == getattr(defaults, action.dest), action.dest
    args = train_cifar.parse_args(["--tiny", "--channels", "48"])[0]
    assert (args.channels, args.channel_mult, args.num_blocks, args.batch) == (48, "1,2", 1, 32)
    assert defaults.augment == 0.12   # the paper's CIFAR-10 recipe augments


def test_every_console_line_is_flushed_as_it_is_printed(tmp_path, monkeypatch):
    """stdout redirected to a file or a pipe is block-buffered: a console line shows only once it is flushed."""
    class Pipe(io.StringIO):   # counts the lines written since the last flush
        held = most = 0

        def write(self, text):
            self.held += text.count("\n")
            self.most = max(self.most, self.held)
            return super().write(text)

        def flush(self):
            self.held = 0
    monkeypatch.setattr(sys, "stdout", Pipe())
    train_tiny(tmp_path, "--max-steps", "3")
    lines = sys.stdout.getvalue().splitlines()   # run ..., 3 steps, done
    assert len(lines) == 5 and sys.stdout.most == 1 and sys.stdout.held == 0, lines


# ---------------------------------------------------------------------------------------------
# Evaluation: grids, --sample, FID (with its Inception weights replaced or missing), the official checkpoint
# ---------------------------------------------------------------------------------------------

def test_the_readme_cpu_smoke_run_writes_a_checkpoint_and_grids_and_sample_draws_from_any_ema(tmp_path):
    readme = Path(HERE, "README.md").read_text().splitlines()
    line = next(line for line in readme if line.startswith("python train_cifar.py --tiny"))
    argv = line.split("#")[0].split()[2:]
    argv[argv.index("--max-steps") + 1] = "2"   # the README's 20 steps take ~25 s on 2 cores; 2 show the same path
    train_cifar.main(argv + ["--run-dir", str(tmp_path), "--ema", "0.9,0.99"])
    ckpt = load_ckpt(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["net"]["model_channels"] == 32 and ckpt["args"]["batch"] == 32
    grids = [f"samples_0000002_ema0.99_pushforward_{n}step.png" for n in (1, 2)]   # the slowest EMA
    assert sorted(p.name for p in tmp_path.glob("*.png")) == grids
    for ema, tag in (([], "ema0.99"), (["--ema", "0.9"], "ema0.9"), (["--ema", "0"], "live")):
        train_cifar.main(["--sample", str(tmp_path), *ema])
        with Image.open(tmp_path / f"samples_{tag}_pushforward_2step.png") as png:
            assert png.size == (8 * 32, 8 * 32)
    with Image.open(tmp_path / grids[1]) as a, Image.open(tmp_path / "samples_ema0.99_pushforward_2step.png") as b:
        assert np.array_equal(np.array(a), np.array(b))   # --sample redraws what training drew (same noise, weights)
    with pytest.raises(SystemExit, match="--ema 0.5: the checkpoint keeps the EMAs 0.9, 0.99"):
        train_cifar.main(["--sample", str(tmp_path), "--ema", "0.5"])


FAKE_INCEPTION = train_cifar.Extractor("per-channel means and standard deviations", 6,
                                       lambda x: torch.cat([x.float().mean((2, 3)), x.float().std((2, 3))], 1))


def test_sample_writes_a_grid_and_an_npz_per_step_count_and_the_grid_shows_the_first_64_samples(tmp_path, capsys,
                                                                                               monkeypatch):
    train_tiny(tmp_path, "--max-steps", "1")
    train_cifar.main(["--sample", str(tmp_path), "--steps", "1,2,4,8", "--sampler", "restart", "--n", "70"])
    out, x = capsys.readouterr().out, {}
    for n in (1, 2, 4, 8):
        stem = tmp_path / f"samples_ema0.9999_restart_{n}step"
        with np.load(f"{stem}_70.npz") as f:   # the layout of ADM's evaluator suite: arr_0, uint8 [N, H, W, 3]
            assert f.files == ["arr_0"] and f["arr_0"].shape == (70, 32, 32, 3) and f["arr_0"].dtype == np.uint8
            x[n] = f["arr_0"]
        with Image.open(f"{stem}.png") as png:
            grid = np.array(png).reshape(8, 32, 8, 32, 3).transpose(0, 2, 1, 3, 4).reshape(64, 32, 32, 3)
        np.testing.assert_array_equal(grid, x[n][:64])
        assert f"sampling 70 images at {n}-step restart (1 process(es))" in out
        wrote = re.escape(f"wrote {stem}.png and {stem}_70.npz (sampled in ")
        assert re.search(wrote + r"[\d.]+ s, [\d,]+ img/s\)", out)
    assert not np.array_equal(x[4], x[8])
    train_cifar.main(["--sample", str(tmp_path), "--steps", "8", "--sampler", "restart", "--run-dir",
                      str(tmp_path / "b")])
    with Image.open(tmp_path / "b" / "samples_ema0.9999_restart_8step.png") as png:   # without --n: the same grid
        assert np.array_equal(np.array(png), np.array(Image.open(tmp_path / "samples_ema0.9999_restart_8step.png")))
    assert not list((tmp_path / "b").glob("*.npz"))
    compiled = []   # --compile: the raw network compiled (here: recorded), in channels_last; the same samples
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    train_cifar.main(["--sample", str(tmp_path), "--steps", "8", "--sampler", "restart", "--n", "70", "--compile",
                      "--run-dir", str(tmp_path / "c")])
    assert len(compiled) == 1 and isinstance(compiled[0], imm.DDPMpp)
    assert compiled[0].enc["32x32_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    with np.load(tmp_path / "c" / "samples_ema0.9999_restart_8step_70.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], x[8])


def fake_inception(monkeypatch, extractor=FAKE_INCEPTION):
    """FID without torch-fidelity's weights: per-channel means and standard deviations as features."""
    monkeypatch.setattr(train_cifar, "fid_setup", lambda say=print: None)
    monkeypatch.setattr(train_cifar, "fid_feature_extractor", lambda device: extractor)


def test_fid_from_summed_feature_moments_equals_torch_fidelitys_and_the_reference_is_cached_per_extractor(
        tmp_path, monkeypatch):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    g, env = torch.Generator().manual_seed(0), train_cifar.Env()
    fake, real = (torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g) for n in (37, 50))
    fake_inception(monkeypatch)
    ours = train_cifar.fid_statistics(fake, FAKE_INCEPTION, env, batch=10)
    theirs = fid_features_to_statistics(FAKE_INCEPTION.fn(fake).double())   # what --fid computed before, from all
    np.testing.assert_allclose(ours["mu"], theirs["mu"], rtol=1e-12)       # the features at once
    np.testing.assert_allclose(ours["sigma"], theirs["sigma"], rtol=1e-9, atol=1e-12)
    ref, n = train_cifar.fid_reference(real, str(tmp_path), env)
    fid = fid_statistics_to_metric(ours, ref, verbose=False)["frechet_inception_distance"]
    want = fid_statistics_to_metric(theirs, fid_features_to_statistics(FAKE_INCEPTION.fn(real).double()), False)
    assert n == 50 and fid == pytest.approx(want["frechet_inception_distance"], rel=1e-9) and fid > 0
    [cached] = tmp_path.glob("fid_reference_*.npz")
    fake_inception(monkeypatch, FAKE_INCEPTION._replace(fn=lambda x: pytest.fail("recomputed a cached reference")))
    again, _ = train_cifar.fid_reference(real, str(tmp_path), env)
    np.testing.assert_array_equal(again["sigma"], ref["sigma"])
    fake_inception(monkeypatch, FAKE_INCEPTION._replace(name="another extractor"))   # another network: another file
    train_cifar.fid_reference(real, str(tmp_path), env)
    assert len(list(tmp_path.glob("fid_reference_*.npz"))) == 2 and cached.exists()


def test_fid_during_training_and_fid_mode_score_the_slowest_ema_by_default(tmp_path, monkeypatch, capsys):
    write_cifar_python(tmp_path / "data" / "cifar-10-batches-py")
    fake_inception(monkeypatch)
    train_cifar.main(TINY_NET + ["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "r"), "--seed", "3",
                                 "--max-steps", "2", "--fid-every", "2", "--n", "6", "--ema", "0.5,0.9",
                                 "--steps", "1,3", "--sampler", "restart"])
    [fid] = [r for r in read_log(tmp_path / "r") if "fid_model" in r]
    one, three = fid["fid_restart_1step"], fid["fid_restart_3step"]
    assert fid["step"] == 2 and fid["fid_model"] == "ema0.9" and one > 0 and three > 0 and one != three
    assert "FID (6 samples): 6 samples vs 10 training images" in fid["fid_protocol"]
    assert f"step 2 | 1-step restart FID {one:.3f} (ema0.9)\nstep 2 | 3-step restart FID {three:.3f}" in \
        capsys.readouterr().out
    train_cifar.main(["--fid", str(tmp_path / "r"), "--data-dir", str(tmp_path / "data"), "--n", "6", "--steps", "1,3",
                      "--sampler", "restart"])   # the run's seed, 3: the same samples, the same numbers
    lines = (tmp_path / "r" / "fid.txt").read_text().splitlines()
    assert lines[0].startswith(f"1-step restart FID {one:.3f} (ema0.9)  [FID (6 samples)")
    assert lines[1].startswith(f"3-step restart FID {three:.3f} (ema0.9)") and lines[1] in capsys.readouterr().out


def test_fid_without_inception_weights_names_the_file_and_training_goes_on(tmp_path, monkeypatch, capsys):
    write_cifar_python(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    train_cifar.main(TINY_NET + ["--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "r"),
                                 "--max-steps", "2", "--fid-every", "1"])
    out = capsys.readouterr().out
    assert "--fid-every 1: skipped, training goes on without it" in out and "done: 2 steps" in out
    assert not any("fid_1step" in r for r in read_log(tmp_path / "r"))
    monkeypatch.setattr(train_cifar, "sample_images", lambda *a, **k: pytest.fail("sampled before checking FID"))
    with pytest.raises(SystemExit) as e:   # --fid checks first: before the data, the checkpoint and any sample
        train_cifar.main(["--fid", str(tmp_path / "r"), "--data-dir", str(tmp_path / "nodata")])
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as inception
    except ImportError:   # without the library the message says how to install it
        assert "pip install torch-fidelity" in str(e.value)
        return
    place = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert inception.URL_INCEPTION_V3 in str(e.value) and f"place it at {place}" in str(e.value)
    place.write_bytes(b"an interrupted download")   # a file whose SHA-256 does not start as its name says
    with pytest.raises(SystemExit, match=f"{re.escape(str(place))} is not torch-fidelity's Inception weights "
                                         r"\(SHA-256 [0-9a-f]{8}\.\.\., expected 6726825d\.\.\.\): delete it"):
        train_cifar.fid_setup()


def test_speed_figures_leave_out_the_time_of_checkpoints_grids_and_fid(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cifar, "save_grids", lambda *a: time.sleep(3))   # a slow evaluation at every step
    train_tiny(tmp_path, "--max-steps", "3", "--ckpt-every", "1")
    assert all(r["img_s"] > 8 / 3 for r in read_log(tmp_path)[1:]), read_log(tmp_path)   # a step takes < 3 s


def test_sampling_an_official_checkpoint_that_cannot_be_had_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))   # the download cache ~/.cache/imm
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    (tmp_path / "cifar10.pkl").write_bytes(b"\x80\x04" + bytes(range(200, 256)))
    for source in ("official", str(tmp_path / "cifar10.pkl")):
        with pytest.raises(SystemExit, match=f"cannot load the official checkpoint {re.escape(source)} .*its path"):
            train_cifar.main(["--sample", source, "--run-dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------
# Precision: y_t - y_r keeps its direction in every precision mode that training offers
# ---------------------------------------------------------------------------------------------

# The Laplace kernel's gradient on the own-target pair is the unit vector along y_r - y_t, and near T the target time r
# is only ~2e-7 below t (min_gap 0): the network has to deliver that tiny difference with its direction intact. With a
# relative error e in a random direction, the expected component of the unit gradient along the true direction is about
# 1/sqrt(1 + e^2), so e <= 0.5 keeps >= 89% of the signal.
DIRECTION_BOUND = 0.5
PRECISION_TS = (0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 0.994)


def tf32_round(x):
    """float32 -> TF32 (10 explicit mantissa bits), round to nearest even; anything else is returned unchanged."""
    if not (torch.is_tensor(x) and x.dtype == torch.float32):
        return x
    i = x.view(torch.int32)
    return ((i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


class TF32Operands(torch.overrides.TorchFunctionMode):
    """Tensor cores on a CPU: the float32 operands of convs, linears and attention rounded to TF32, fp32 arithmetic."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.linear, F.scaled_dot_product_attention):
            args = [tf32_round(a) for a in args]
            kwargs = {k: tf32_round(v) for k, v in (kwargs or {}).items()}
        return func(*args, **(kwargs or {}))


def target_difference_errors(mode, cfg):
    """{t: ||d - d_64|| / ||d_64||} for d = y_t - y_r = f_{s,t}(x_t) - f_{s,r}(x_r), s = t_min, r = r(s, t), on a small
    DDPM++ with order-one random weights, computed in `mode`; d_64: the same with a float64 copy of the network."""
    net = randomize_(tiny_net(img_resolution=16, model_channels=16, attn_resolutions=(8,), dropout=0.0), seed=0)
    model, model_64 = IMMModel(net, cfg).eval(), IMMModel(copy.deepcopy(net).double(), cfg).eval()
    # CPUs have no TF32 (precision_setup's 'tf32' only sets the CUDA switches): emulate it
    autocast = TF32Operands() if mode == "tf32" else train_cifar.precision_setup(mode, "cpu")[0]
    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randn(4, 3, 16, 16, generator=g) * cfg.sigma_d
    errors = {}
    for t_value in PRECISION_TS:
        t = torch.full((len(x),), t_value, dtype=torch.float64)
        s = torch.full_like(t, cfg.t_min)
        r = imm.r_of(s=s, t=t, cfg=cfg)

        def d(f, x, noise):   # y_t - y_r
            x_t = imm.interpolate(x, noise, t=t)
            return f(x_t, t=t, s=s) - f(imm.ddim(x_t, x, t=t, s=r), t=r, s=s)

        with torch.no_grad():
            d_64 = d(model_64, x.double(), noise.double())
            with autocast:
                errors[t_value] = rel_err(d(model, x, noise).double(), d_64)
    return errors


def test_target_difference_survives_every_precision_mode_at_the_default_gap_and_bf16_needs_the_gap():
    default = IMMConfig.cifar()
    print(f"\nrelative error of y_t - y_r at min_gap={default.min_gap}, temb={default.temb}\n  t:   "
          + " ".join(f"{t:>7}" for t in PRECISION_TS))
    for mode in train_cifar.PRECISIONS:
        errors = target_difference_errors(mode, default)
        print(f"  {mode}  " + " ".join(f"{e:7.2g}" for e in errors.values()))
        assert max(errors.values()) < DIRECTION_BOUND, (mode, errors)
    assert max(target_difference_errors("fp32", IMMConfig()).values()) < DIRECTION_BOUND   # fp32 needs no gap
    bf16_no_gap = target_difference_errors("bf16", IMMConfig())
    assert bf16_no_gap[PRECISION_TS[-1]] > DIRECTION_BOUND, bf16_no_gap   # the check can fail: bf16 needs the gap


def test_every_test_the_readme_names_exists():
    named = set(re.findall(r"`(test_\w+?)(?:\.\.\.)?`", Path(HERE, "README.md").read_text()))
    assert len(named) >= 12 and all(any(t.startswith(n) for t in globals()) for n in named), named - set(globals())


def test_the_readmes_code_map_points_at_the_right_lines_of_imm_py():
    rows = re.findall(r"`([\w.]+)`, line (\d+) \|", Path(HERE, "README.md").read_text())
    assert len(rows) >= 15
    for name, line in rows:
        obj = imm
        for part in name.split("."):
            obj = getattr(obj, part)
        assert inspect.getsourcelines(obj)[1] == int(line), f"README: {name} is at line {line}, imm.py says otherwise"


# ============================================================================= toy_2d.ipynb

REPO = HERE
NOTEBOOK = os.path.join(REPO, "toy_2d.ipynb")


def _summary_row(text, name):
    """The four distances (1, 2, 4, 8 steps) of one row of the notebook's printed summary table."""
    m = re.search(r"\|\s*" + re.escape(name) + r"\s*\|" + r"\s*([\d.]+)\s*\|" * 4, text)
    assert m, f"row {name!r} not found in the summary table"
    return [float(v) for v in m.groups()]


@slow
def test_notebook_runs_top_to_bottom_in_fast_mode_and_imm_beats_flow_matching_at_two_steps(tmp_path, monkeypatch):
    path = tmp_path / "toy_2d.ipynb"
    shutil.copy(NOTEBOOK, path)                  # never touch the committed outputs
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:                        # start from a clean notebook
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("IMM_NOTEBOOK_FAST", "1")                 # the kernel inherits os.environ
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # CellExecutionError propagates: any failing cell fails the test with its traceback.
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": REPO}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "fast mode" in text
    imm = _summary_row(text, "IMM, M=4 (main)")
    fm = _summary_row(text, "flow matching (main)")
    floor = float(re.search(r"floor \(two independent data draws\): ([\d.]+)", text).group(1))
    assert imm[1] < fm[1], f"IMM 2-step distance {imm[1]} is not below flow matching's {fm[1]}"
    assert imm[0] < fm[0], f"IMM 1-step distance {imm[0]} is not below flow matching's {fm[0]}"
    assert floor < min(imm), "no model can beat two independent draws of the data"
    n_png = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert n_png >= 10, f"expected the notebook's figures, got {n_png} PNG outputs"


def test_committed_notebook_has_outputs_in_every_code_cell_and_no_machine_paths():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    empty = [i for i, c in enumerate(code_cells) if not c.outputs]
    assert code_cells and not empty, f"code cells without outputs (indices among code cells): {empty}"
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    # Image data is base64 and can contain any short string by chance, so it is left out of the scan.
    for c in code_cells:
        for o in c.outputs:
            o.get("data", {}).pop("image/png", None)
    text = nbformat.writes(nb)
    for path in ("/work/", "/root/"):
        assert path not in text, f"the committed notebook contains the machine path {path!r}"
