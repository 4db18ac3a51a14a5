"""Inductive Moment Matching (Zhou, Ermon, Song, ICML 2025, arXiv 2503.07565) in one file.

Read top to bottom next to the paper. Sections follow the paper's order:
  1. schedules and the DDIM interpolant (Sec. 4.1, Eq. 11)
  2. the one-step map f_{s,t}(x_t) and its parameterisations (Sec. 4.2, App. C.5)
  3. time sampling p(s,t) and the mapping r(s,t) (Sec. 4.2, App. C.6, C.7)
  4. kernel, weighting and the IMM loss (Eq. 12, 13, 67; Algorithm 1), plus a flow-matching baseline
  5. EMA (sampling only)
  6. samplers: pushforward and restart (Algorithms 2 and 5)
  7. networks: a small MLP for 2D data and the DDPM++ U-Net for CIFAR-10 (App. I.1)
  8. a sample-quality metric for low-dimensional data
  9. the 2D demo: `python imm.py`
The CIFAR-10 training script, the official checkpoint's safe reader and image output live in train_cifar.py.

Conventions: time runs from data (t = 0) to noise (t = 1); the prior is N(0, sigma_d^2 I); every
call of f passes its times by keyword, f(x_t, t=t, s=s), because the paper and the official code
order the two times differently and positional calls invite exactly that bug.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class IMMConfig:
    """Every knob of the method. Defaults are the paper's CIFAR-10 recipe (Table 5, App. I.1)."""
    schedule: str = "fm"          # 'fm' (OT-FM: alpha=1-t, sigma=t) or 'vp_cosine'
    f_type: str = "simple_edm"    # 'simple_edm' | 'euler_fm' | 'identity' (Sec. 4.2)
    temb: str = "identity"        # second time input of the network: s ('identity') or t - s ('stride')
    sigma_d: float = 0.5          # data std; the prior is N(0, sigma_d^2 I)
    t_min: float = 0.006          # smallest time (CIFAR: pixel quantisation hides smaller noise)
    T: float = 0.994              # largest time, eta(T) = 165.67 for OT-FM
    time_scale: float = 1000.0    # c_noise(t) = time_scale * t
    M: int = 4                    # particles per group in the MMD estimate
    k: int = 15                   # r(s,t) step: delta eta = (eta(T) - eta(t_min)) / 2^k
    min_gap: float = 0.0          # App. I.6: t - r >= min_gap (low-precision training), 0 = off
    a: float = 1.0                # Eq. 13 exponent of alpha_t
    b: float = 5.0                # Eq. 13 sigmoid shift (paper Table 5: CIFAR b = 5)
    kernel: str = "laplace"       # 'laplace' (paper) or 'rbf' (ablation)
    kernel_eps: float = 1e-8      # distance clamp inside the kernel

    def __post_init__(self):
        checks = [
            (self.schedule in ("fm", "vp_cosine"), f"schedule must be 'fm' or 'vp_cosine', got {self.schedule!r}"),
            (self.f_type in ("simple_edm", "euler_fm", "identity"),
             f"f_type must be 'simple_edm', 'euler_fm' or 'identity', got {self.f_type!r}"),
            (self.f_type != "euler_fm" or self.schedule == "fm", "f_type 'euler_fm' needs schedule 'fm'"),
            (self.temb in ("identity", "stride"), f"temb must be 'identity' or 'stride', got {self.temb!r}"),
            (self.kernel in ("laplace", "rbf"), f"kernel must be 'laplace' or 'rbf', got {self.kernel!r}"),
            (0 <= self.t_min < self.T <= 1, f"need 0 <= t_min < T <= 1, got t_min={self.t_min}, T={self.T}"),
            (self.M >= 1 and self.k >= 0 and self.sigma_d > 0, "need M >= 1, k >= 0 and sigma_d > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"IMMConfig: {msg}")

    @classmethod
    def cifar(cls, **overrides):
        """What train_cifar.py trains with: the paper's recipe above plus the low-precision settings of App. I.6 for
        bf16, a minimum gap t - r >= 1e-3 and the second time input t - s (README, "Precision")."""
        return replace(cls(min_gap=1e-3, temb="stride"), **overrides)

    @classmethod
    def toy(cls, **overrides):
        """2D preset: unit-scale data, no pixel quantisation (t_min = 0), a coarser r-step (k).

        Kept on the paper's Laplace kernel although in 2D it contracts every mode to a blob: the pull of each particle
        towards its own target dominates the loss there, and a unit-length pull settles at a median of the targets,
        not their mean. kernel='rbf' reproduces the checkerboard's squares at 4 to 8 steps but learns the 1-step jump
        slowly (README, "Why IMM turns the squares into blobs")."""
        return replace(cls(sigma_d=1.0, t_min=0.0, f_type="euler_fm", k=10, b=4.0), **overrides)


# ---------------------------------------------------------------------------------------------
# 1. Schedules and interpolants (Sec. 4.1; x_t = alpha_t x + sigma_t noise, noise ~ N(0, sigma_d^2 I))
# ---------------------------------------------------------------------------------------------

def _f64(t):
    return torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t


def alpha_sigma(t, schedule="fm"):
    """(alpha_t, sigma_t): OT-FM (1 - t, t) or VP-cosine (cos(pi t / 2), sin(pi t / 2))."""
    t = _f64(t)
    if schedule == "fm":
        return 1 - t, t
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def eta(t, schedule="fm"):
    """Noise-to-signal ratio eta_t = sigma_t / alpha_t (the official code's 'nt')."""
    alpha, sigma = alpha_sigma(t, schedule)
    return sigma / alpha


def eta_inv(y, schedule="fm"):
    """Inverse of eta: FM y / (1 + y), cosine (2 / pi) atan(y); eta = inf maps to t = 1."""
    y = _f64(y)
    t = y / (1 + y) if schedule == "fm" else torch.atan(y) * (2 / math.pi)
    return torch.nan_to_num(t, nan=1.0)


def logsnr(t, schedule="fm"):
    """lambda_t = 2 log(alpha_t / sigma_t) = -2 log eta_t."""
    return -2 * torch.log(eta(t, schedule))


def neg_dlogsnr_dt(t, schedule="fm"):
    """-d lambda_t / dt: FM 2 / (t (1 - t)), cosine 2 pi / sin(pi t). Used by the weighting, Eq. 13."""
    t = _f64(t)
    if schedule == "fm":
        return 2 / (t * (1 - t))
    return 2 * math.pi / torch.sin(math.pi * t)


def _expand(c, x):
    """Shape a time coefficient (scalar or one per sample) to broadcast against x, in x's dtype."""
    c = torch.as_tensor(c, device=x.device)
    if c.ndim == 1:
        c = c.reshape(-1, *[1] * (x.ndim - 1))
    return c.to(x.dtype)


def ddim(x_t, x, *, t, s, schedule="fm"):
    """Eq. 11: DDIM(x_t, x, s, t) moves x_t from time t to time s <= t along the line through x.

    = (alpha_s - (sigma_s / sigma_t) alpha_t) x + (sigma_s / sigma_t) x_t. Keyword times only.
    """
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    alpha_s, sigma_s = alpha_sigma(s, schedule)
    ratio = sigma_s / sigma_t
    return _expand(alpha_s - ratio * alpha_t, x) * x + _expand(ratio, x) * x_t


def interpolate(x, noise, *, t, schedule="fm"):
    """Forward process x_t = alpha_t x + sigma_t noise (= DDIM from t = 1 with x_1 = noise)."""
    alpha_t, sigma_t = alpha_sigma(t, schedule)
    return _expand(alpha_t, x) * x + _expand(sigma_t, x) * noise


# ---------------------------------------------------------------------------------------------
# 2. Parameterisation: f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, c_noise(t), c_noise(s))
#    (Sec. 4.2 and App. C.5; these are the f-level coefficients, i.e. DDIM applied to g)
# ---------------------------------------------------------------------------------------------

def c_in(t, cfg):
    """Input scaling c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) (App. C.5 and official code)."""
    alpha_t, sigma_t = alpha_sigma(t, cfg.schedule)
    return 1 / (cfg.sigma_d * torch.sqrt(alpha_t ** 2 + sigma_t ** 2))


def f_coefficients(*, s, t, cfg):
    """(c_skip(s,t), c_out(s,t)) of f_{s,t}(x_t) = c_skip x_t + c_out G for cfg.f_type (App. C.5): DDIM (Eq. 11)
    applied to the network's x-prediction g = c_skip(t) x_t + c_out(t) G. In closed form:
      simple_edm: c_skip = (alpha_t alpha_s + sigma_t sigma_s) / (alpha_t^2 + sigma_t^2),
                  c_out = -(alpha_s sigma_t - alpha_t sigma_s) sigma_d / sqrt(alpha_t^2 + sigma_t^2)
                  (OT-FM: c_out = -(t - s) sigma_d / sqrt((1 - t)^2 + t^2))
      euler_fm:   c_skip = 1, c_out = -(t - s) sigma_d            (one Euler step of the velocity sigma_d G)
      identity:   c_skip = sigma_s / sigma_t, c_out = alpha_s - (sigma_s / sigma_t) alpha_t    (g = G)
    Every f-type has c_skip(t,t) = 1 and c_out(t,t) = 0, so f_{t,t}(x) = x exactly."""
    alpha_t, sigma_t = alpha_sigma(t, cfg.schedule)
    alpha_s, sigma_s = alpha_sigma(s, cfg.schedule)
    if cfg.f_type == "simple_edm":    # g = x-prediction with EDM-style skip, then DDIM to s
        norm = alpha_t ** 2 + sigma_t ** 2
        c_skip = (alpha_t * alpha_s + sigma_t * sigma_s) / norm
        c_out = -(alpha_s * sigma_t - alpha_t * sigma_s) * cfg.sigma_d / torch.sqrt(norm)
    elif cfg.f_type == "euler_fm":    # f = x_t - (t - s) sigma_d G: one Euler step of a velocity
        c_skip = torch.ones_like(_f64(t) + _f64(s))
        c_out = -(_f64(t) - _f64(s)) * cfg.sigma_d
    else:                             # 'identity': g = G, then DDIM to s
        ratio = sigma_s / sigma_t
        c_skip, c_out = ratio, alpha_s - ratio * alpha_t
    return c_skip, c_out


class IMMModel(nn.Module):
    """f^theta_{s,t}(x_t) around a raw network G(x, c_noise_t, c_noise_s, labels) stored as `model`; `labels` is the
    network's extra conditioning (DDPM++'s augmentation labels during training), passed alike to both IMM passes.

    The attribute name matches the official checkpoints, whose state-dict keys start with 'model.'.
    Times t and s are scalars or one value per sample. They are kept in float64 up to the network:
    near t = T the r-step is ~2e-7, which float32 cannot resolve after scaling by 1000. (The official
    forward rounds t and s to float32 first; on its checkpoint the outputs differ at round-off level.)
    """

    def __init__(self, net, cfg):
        super().__init__()
        self.model = net
        self.cfg = cfg

    def _times(self, t, x):
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def network_output(self, x_t, *, t, s, labels=None):
        """G_theta(c_in(t) x_t, c_noise(t), c_noise(s)) with c_noise(u) = time_scale * u."""
        t, s = self._times(t, x_t), self._times(s, x_t)
        second = s if self.cfg.temb == "identity" else t - s
        net_dtype = next(self.model.parameters()).dtype   # float32 normally; the state may be float64
        x_in = (_expand(c_in(t, self.cfg), x_t) * x_t).to(net_dtype)
        return self.model(x_in, self.cfg.time_scale * t, self.cfg.time_scale * second, labels)

    def forward(self, x_t, *, t, s, labels=None, raw=False):
        """f_{s,t}(x_t); raw=True returns G instead (the flow-matching baseline regresses G, and going through
        forward keeps torch.compile and DDP wrappers in the path)."""
        G = self.network_output(x_t, t=t, s=s, labels=labels)
        if raw:
            return G
        c_skip, c_out = f_coefficients(s=self._times(s, x_t), t=self._times(t, x_t), cfg=self.cfg)
        return _expand(c_skip, x_t) * x_t + _expand(c_out, x_t) * G.to(x_t.dtype)


# ---------------------------------------------------------------------------------------------
# 3. Time sampling p(s,t) and the mapping r(s,t) (Sec. 4.2, App. C.6, C.7)
# ---------------------------------------------------------------------------------------------

class Times(NamedTuple):
    """One (t, r, s) per group, s <= r < t (r = s allowed), float64."""
    t: torch.Tensor
    r: torch.Tensor
    s: torch.Tensor


def r_of(*, s, t, cfg):
    """App. C.6 'constant decrement in eta': r(s,t) = max(s, eta^-1(eta_t - delta_eta)).

    delta_eta = (eta(T) - eta(t_min)) / 2^k, the official code's (nt_high - nt_low) / 2^k; the
    paper's rounder (160 - 0) / 2^k (App. C.6) differs by 3.5%; we follow the code. With cfg.min_gap > 0 (App. I.6)
    r is also kept at least min_gap below t.
    """
    s, t = _f64(s), _f64(t)
    delta_eta = (eta(cfg.T, cfg.schedule) - eta(cfg.t_min, cfg.schedule)) / 2 ** cfg.k
    # eta_t - delta_eta <= 0 means r = s; clamping first also keeps FM's y / (1 + y) off its y < -1 branch
    r = eta_inv((eta(t, cfg.schedule) - delta_eta).clamp_min(0), cfg.schedule)
    if cfg.min_gap > 0:
        r = torch.minimum(r, t - cfg.min_gap)
    return torch.maximum(s, r)


def sample_times(n_groups, cfg, device="cpu", generator=None):
    """t ~ U(t_min, T), s | t ~ U(t_min, t), r = r(s, t): one triple per group (App. C.7)."""
    u = torch.rand(2, n_groups, dtype=torch.float64, generator=generator).to(device)
    t = cfg.t_min + (cfg.T - cfg.t_min) * u[0]
    s = cfg.t_min + (t - cfg.t_min) * u[1]
    return Times(t=t, r=r_of(s=s, t=t, cfg=cfg), s=s)


# ---------------------------------------------------------------------------------------------
# 4. Kernel, weighting and the loss (Eq. 12, 13, 67)
# ---------------------------------------------------------------------------------------------

def pairwise_distance(x, y, eps):
    """||x_j - y_l||_2 for [G, M, D] inputs, clamped below at eps, without matmul-based cdist
    (which loses precision for near-duplicates). sqrt(clamp(sum sq, eps^2)) keeps the gradient
    finite (zero) when particles coincide."""
    sq = (x[:, :, None, :] - y[:, None, :, :]).square().sum(-1)
    return sq.clamp_min(eps * eps).sqrt()


def laplace_kernel(x, y, w_tilde, eps=1e-8):
    """Sec. 4.2: k_{s,t}(x, y) = exp(-w~(s,t) max(||x - y||, eps) / D) for [G, M, D] particles."""
    D = x.shape[-1]
    return torch.exp(-w_tilde[:, None, None] * pairwise_distance(x, y, eps) / D)


def rbf_kernel(x, y, w_tilde, eps=1e-8):
    """Gaussian kernel exp(-(w~ ||x - y||)^2 / (2 D)) with the same time-dependent scale (ablation)."""
    D = x.shape[-1]
    return torch.exp(-(w_tilde[:, None, None] * pairwise_distance(x, y, eps)) ** 2 / (2 * D))


def kernel_weight(*, s, t, cfg):
    """w~(s,t) = 1 / |c_out(s,t)| of the f-type in use (App. C.8); clamped so s = t stays finite."""
    _, c_out = f_coefficients(s=s, t=t, cfg=cfg)
    return 1 / c_out.abs().clamp_min(1e-12)


def weight(t, cfg):
    """Eq. 13: w(s,t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)."""
    alpha_t, sigma_t = alpha_sigma(t, cfg.schedule)
    return (0.5 * torch.sigmoid(cfg.b - logsnr(t, cfg.schedule)) * neg_dlogsnr_dt(t, cfg.schedule)
            * alpha_t ** cfg.a / (alpha_t ** 2 + sigma_t ** 2))


def mmd_squared(y_t, y_r, w_tilde, cfg):
    """Eq. 67: biased V-statistic of MMD^2 per group, all M x M pairs (diagonal included).

    y_t, y_r: [G, M, D]. Returns [G]: mean K(y_t, y_t) + mean K(y_r, y_r) - 2 mean K(y_t, y_r).
    """
    kernel = laplace_kernel if cfg.kernel == "laplace" else rbf_kernel
    k_tt = kernel(y_t, y_t, w_tilde, cfg.kernel_eps).mean((1, 2))
    k_rr = kernel(y_r, y_r, w_tilde, cfg.kernel_eps).mean((1, 2))
    k_tr = kernel(y_t, y_r, w_tilde, cfg.kernel_eps).mean((1, 2))
    return k_tt + k_rr - 2 * k_tr


def imm_loss(model, x, cfg, times=None, noise=None, labels=None):
    """Eq. 12 (Algorithm 1): one IMM loss over a batch split into B / M groups of M particles.

    Each group shares one (s, r, t); every particle has its own data point and noise.
      x_t = alpha_t x + sigma_t noise,   x_r = DDIM(x_t, x, s=r, t=t)   (same x and noise)
      y_t = f^theta_{s,t}(x_t)   (grad),   y_r = f^theta_{s,r}(x_r)   (same weights, no grad)
      loss = mean over groups of w(s,t) MMD^2_{k_{s,t}}(y_t, y_r)
    The target pass runs in the model's current mode with the same dropout mask as the online
    pass: the RNG state is forked around the online pass and replayed for the target. (The paper does not say
    how dropout enters the stop-gradient pass; this is our choice, as in ECT's consistency training.)
    Returns (loss, stats) where stats holds detached per-group t, s, r, w and MMD^2 for logging.
    """
    B, M = x.shape[0], cfg.M
    if B % M != 0:
        raise ValueError(f"imm_loss: batch size {B} is not a multiple of the group size M={M}; "
                         f"use a batch of {max(M, B - B % M)} or {B + M - B % M}")
    G = B // M
    if times is None:
        times = sample_times(G, cfg, device=x.device)
    t, r, s = (v.to(x.device).repeat_interleave(M) for v in times)   # one time per particle
    if noise is None:
        noise = torch.randn_like(x) * cfg.sigma_d
    x_t = interpolate(x, noise, t=t, schedule=cfg.schedule)
    x_r = ddim(x_t, x, t=t, s=r, schedule=cfg.schedule)

    rng_devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        y_t = model(x_t, t=t, s=s, labels=labels)
    with torch.no_grad():
        y_r = model(x_r, t=r, s=s, labels=labels)

    dtype = torch.promote_types(y_t.dtype, torch.float32)   # the kernel never runs below float32
    w_tilde = kernel_weight(s=times.s, t=times.t, cfg=cfg).to(x.device, dtype)
    mmd2 = mmd_squared(y_t.reshape(G, M, -1).to(dtype), y_r.reshape(G, M, -1).to(dtype), w_tilde, cfg)
    w = weight(times.t, cfg).to(x.device, dtype)
    loss = (w * mmd2).mean()
    stats = dict(t=times.t.detach(), s=times.s.detach(), r=times.r.detach(), w=w, mmd2=mmd2.detach())
    return loss, stats


def fm_loss(model, x, cfg, times=None, noise=None, labels=None):
    """Flow-matching baseline (Lipman et al. 2023) on the same network: with f_type 'euler_fm',
    f_{s,t}(x_t) = x_t - (t - s) sigma_d G, so regress sigma_d G onto the velocity noise - x.

    s is drawn as in IMM and fed to the network, which learns to ignore it; the samplers below
    then run flow matching's Euler steps with the same code as IMM. Returns (loss, stats).
    """
    if cfg.f_type != "euler_fm":
        raise ValueError(f"fm_loss needs cfg.f_type='euler_fm' (got {cfg.f_type!r})")
    if times is None:
        times = sample_times(x.shape[0], cfg, device=x.device)
    if noise is None:
        noise = torch.randn_like(x) * cfg.sigma_d
    x_t = interpolate(x, noise, t=times.t, schedule=cfg.schedule)
    G = model(x_t, t=times.t, s=times.s, labels=labels, raw=True).to(x.dtype)
    per_sample = (cfg.sigma_d * G - (noise - x)).square().flatten(1).mean(1)
    return per_sample.mean(), dict(t=times.t.detach(), mse=per_sample.detach())


# ---------------------------------------------------------------------------------------------
# 5. EMA of the weights, for sampling and evaluation only (the target branch uses the live weights)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and floating buffers."""
    e = [v for v in ema.state_dict().values() if v.is_floating_point()]
    m = [v for v in model.state_dict().values() if v.is_floating_point()]
    torch._foreach_lerp_(e, m, 1 - decay)  # one fused update instead of a Python loop over tensors


# ---------------------------------------------------------------------------------------------
# 6. Samplers (Sec. 4.3, App. F; the state is kept in float64 like the official code)
# ---------------------------------------------------------------------------------------------

def timesteps(n, kind, cfg, mid_eta=(), rho=7.0):
    """Decreasing times T = t_0 > ... > t_n = t_min (float64, length n + 1).

    'uniform': linspace(T, t_min) (Eq. 117); 'edm': rho-spaced in eta between eta(T) and
    eta(t_min) (App. I.2); 'eta': explicit midpoints in eta, [T, eta^-1(mid_eta), t_min]
    (CIFAR 2-step: mid_eta = (1.4,)).
    """
    if n < 1:
        raise ValueError(f"timesteps: need n >= 1 steps, got {n}")
    if kind == "uniform":
        return torch.linspace(cfg.T, cfg.t_min, n + 1, dtype=torch.float64)
    if kind == "edm":
        hi, lo = eta(cfg.T, cfg.schedule) ** (1 / rho), eta(cfg.t_min, cfg.schedule) ** (1 / rho)
        etas = (hi + torch.arange(n + 1, dtype=torch.float64) / n * (lo - hi)) ** rho
        ts = eta_inv(etas, cfg.schedule)
        ts[0], ts[-1] = cfg.T, cfg.t_min  # exact endpoints, no round-trip error
        return ts
    if kind == "eta":
        if len(mid_eta) != n - 1:
            raise ValueError(f"timesteps: kind 'eta' with n={n} needs {n - 1} mid_eta values, got {len(mid_eta)}")
        mids = eta_inv(torch.tensor(list(mid_eta), dtype=torch.float64), cfg.schedule)
        return torch.cat([torch.tensor([cfg.T], dtype=torch.float64), mids,
                          torch.tensor([cfg.t_min], dtype=torch.float64)])
    raise ValueError(f"timesteps: kind must be 'uniform', 'edm' or 'eta', got {kind!r}")


def prior_sample(shape, cfg, device="cpu", generator=None):
    """x_T ~ N(0, sigma_d^2 I) in float64."""
    return torch.randn(shape, dtype=torch.float64, generator=generator).to(device) * cfg.sigma_d


@torch.no_grad()
def pushforward_sample(model, x_T, ts, labels=None):
    """Algorithm 2: x <- f_{t_{i+1}, t_i}(x) along the decreasing time list ts; returns x at ts[-1]."""
    was_training = model.training
    model.eval()
    x = x_T.to(torch.float64)
    for t, s in zip(ts[:-1], ts[1:]):
        x = model(x, t=t, s=s, labels=labels)
    model.train(was_training)
    return x


@torch.no_grad()
def restart_sample(model, x_T, ts, labels=None, generator=None):
    """Algorithm 5: jump from each t_i straight to t_end = ts[-1], then re-noise to t_{i+1} with fresh noise."""
    was_training = model.training
    model.eval()
    cfg, x, t_end = model.cfg, x_T.to(torch.float64), ts[-1]
    # all re-noising at once, one row per sample: the CPU generator fills in order, so the first k samples of a batch
    # get the noise of a batch of k (for rows of a multiple of 16 values, as images have)
    noise = prior_sample((len(x), max(len(ts) - 2, 0), *x.shape[1:]), cfg, x.device, generator)
    for i, t in enumerate(ts[:-1]):
        x_end = model(x, t=t, s=t_end, labels=labels)
        if i + 2 < len(ts):
            x = interpolate(x_end, noise[:, i], t=ts[i + 1], schedule=cfg.schedule)
    model.train(was_training)
    return x_end


# ---------------------------------------------------------------------------------------------
# 7. Networks. Both take (x, c_noise_t, c_noise_s, labels) and return a tensor shaped like x; DDPM++'s labels are
#    EDM's augmentation labels (None = un-augmented), the MLP ignores them.
# ---------------------------------------------------------------------------------------------

def positional_embedding(x, channels, max_positions=10000):
    """Sinusoidal embedding in [sin, cos] order (EDM's [cos, sin] after SongUNet's swap), float64.

    freqs_i = (1 / max_positions)^(i / (channels/2 - 1)), i = 0 .. channels/2 - 1 ('endpoint').
    """
    half = channels // 2
    freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float64, device=x.device) / (half - 1))
    angles = x.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLP(nn.Module):
    """Residual MLP for low-dimensional data, conditioned on t and s like DDPM++ (App. I.1, "injecting time s"):
    emb = silu(mlp_t(PE(c_noise_t)) + mlp_s(PE(c_noise_s))), added inside every block."""

    def __init__(self, dim=2, width=256, depth=4, emb_channels=64, dropout=0.0):
        super().__init__()
        self.emb_channels = emb_channels
        self.map_t = nn.Sequential(nn.Linear(emb_channels, width), nn.SiLU(), nn.Linear(width, width))
        self.map_s = nn.Sequential(nn.Linear(emb_channels, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Linear(width, dim)

    def forward(self, x, c_noise_t, c_noise_s, labels=None):
        pe_t = positional_embedding(c_noise_t, self.emb_channels).to(x.dtype)
        pe_s = positional_embedding(c_noise_s, self.emb_channels).to(x.dtype)
        emb = F.silu(self.map_t(pe_t) + self.map_s(pe_s))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(F.silu(h))


# ---------------------------------------------------------------------------------------------
# 7b. DDPM++ for CIFAR-10: EDM's SongUNet plus IMM's second (s) time embedding (App. I.1; official training/unets.py).
#     Module names follow the official code so its checkpoints load key for key.
# ---------------------------------------------------------------------------------------------

SKIP_SCALE = math.sqrt(0.5)   # DDPM++ scales every residual sum by 1/sqrt(2)


def _edm_init(layer, scale=1.0):
    """EDM's init: xavier_uniform weight times `scale`, zero bias (matters only from scratch)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


# Speed: two layout-aware pieces that compute exactly the official ops, but keep channels_last (NHWC) tensors in their
# layout, so cuDNN's convolutions need no transposes around them (README, "Measured speed").

class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a channels_last (NHWC) input in its layout.

    The native op views its input as [N, groups, -1], which copies an NHWC tensor to NCHW (torch.compile's
    version too). Here a channels_last input gets each channel's moments over H, W (in NHWC a reduction that
    reads memory in order) and each group pools its channels' moments (law of total variance). Same maths:
    biased variance per group, in float32 at least (autocast's rule), y = x * scale + shift as the CUDA kernel."""

    def forward(self, x):
        if x.is_contiguous():   # NCHW: the native kernel
            return super().forward(x)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        var_c, mean_c = (m.unflatten(1, (self.num_groups, -1)) for m in torch.var_mean(x, dim=(2, 3), correction=0))
        mean = mean_c.mean(2, keepdim=True)                                    # [N, groups, 1]
        var = (var_c + (mean_c - mean).square()).mean(2, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.unflatten(0, (self.num_groups, -1))
        shift = self.bias.unflatten(0, (self.num_groups, -1)) - mean * scale  # [N, groups, C / groups]
        return x * scale.flatten(1)[:, :, None, None] + shift.flatten(1)[:, :, None, None]


def self_attention(qkv):
    """Single-head self-attention over the pixels, from the official interleaved qkv output [N, 3C, H, W] (channels
    in [C, 3] order): a[n,i,c] = sum_j softmax_j(sum_c' q[n,i,c'] k[n,j,c'] / sqrt(C)) v[n,j,c], as [N, C, H, W].
    One copy lays q, k, v out as [N, HW, C]; SDPA computes exactly this (checked against the einsum form in the
    tests) without storing the [N, HW, HW] weights, and keeps the softmax in fp32 under bf16 autocast. The result
    comes back in qkv's layout (a free view for NHWC), so the next convolution's weight gradient keeps the layout of
    its weight, which DDP's gradient buckets expect."""
    N, C3, H, W = qkv.shape
    q, k, v = qkv.unflatten(1, (C3 // 3, 3)).flatten(3).permute(2, 0, 3, 1).contiguous().unbind(0)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, C3 // 3, H, W)   # an NHWC view
    return a.contiguous(memory_format=torch.channels_last if qkv.is_contiguous(memory_format=torch.channels_last)
                        else torch.contiguous_format)


# The network proper.

def group_norm(channels):
    return GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class EmbeddingLinear(nn.Linear):
    """Linear layer that computes in the dtype of its input.

    The positional-embedding frequencies are float64, so in the official code the time embedding,
    both MLPs and every block's `affine` run in float64 (its layers cast weights to the input).
    We do the same with float32 parameters: it keeps parity with the official weights, and near T,
    where t - r is only ~2e-7 (App. C.6 with k = 15), the embedding still tells t and r apart.
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        _edm_init(self)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv(nn.Conv2d):
    """'Same' convolution, optionally preceded by EDM's [1,1]-filter resampling.

    EDM resamples with a depthwise conv by the filter [1,1]x[1,1]/4 (down, stride 2) or a depthwise
    transposed conv by 4x that filter (up, stride 2): a 2x2 box average and nearest-neighbour
    upsampling. The filter is kept as a buffer only because the official state dict stores it
    (`resample_filter`, shape [1,1,2,2], all 0.25).
    """

    def __init__(self, in_channels, out_channels, kernel, up=False, down=False, init_scale=1.0):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2)
        _edm_init(self, init_scale)
        self.up, self.down = up, down
        if up or down:
            self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))

    def forward(self, x):
        # With the fixed [1,1] filter these are exactly 2x2 average pooling and nearest upsampling; the pooling
        # kernels are several times faster than depthwise (transposed) convolutions and their gradients.
        if self.down:
            x = F.avg_pool2d(x, 2)
        elif self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return super().forward(x)


class UNetBlock(nn.Module):
    """DDPM++ residual block (EDM's UNetBlock, official training/unets.py): GroupNorm-SiLU-conv, add the embedding,
    GroupNorm-SiLU-dropout-conv, skip, scale by 1/sqrt(2); optionally single-head self-attention after it."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.attention = dropout, attention
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv(in_channels, out_channels, 3, up=up, down=down)
        self.affine = EmbeddingLinear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels)
        self.conv1 = Conv(out_channels, out_channels, 3, init_scale=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv(in_channels, out_channels, 1, up=up, down=down)
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv(out_channels, 3 * out_channels, 1, init_scale=math.sqrt(0.2))
            self.proj = Conv(out_channels, out_channels, 1, init_scale=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            x = (self.proj(self_attention(self.qkv(self.norm2(x)))) + x) * SKIP_SCALE
        return x


class DDPMpp(nn.Module):
    """G_theta(x, c_noise_t, c_noise_s) for 32x32 images: EDM's DDPM++ U-Net with a second time
    embedding for s (App. I.1; 56,061,443 parameters with the defaults, Table 5's "55M"). Unconditional."""

    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
                 num_blocks=4, attn_resolutions=(16,), dropout=0.2, channel_mult_emb=4, channel_mult_noise=1,
                 augment_dim=0):
        super().__init__()
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        # EDM's augmentation labels (the paper's CIFAR-10 recipe), added to the t embedding's input; zero at sampling
        self.map_augment = EmbeddingLinear(augment_dim, self.noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = EmbeddingLinear(self.noise_channels, emb_channels)
        self.map_layer1 = EmbeddingLinear(emb_channels, emb_channels)
        self.map_layer0_s = EmbeddingLinear(self.noise_channels, emb_channels)   # App. I.1 "injecting time s"
        self.map_layer1_s = EmbeddingLinear(emb_channels, emb_channels)

        def block(cin, cout, **kw):
            return UNetBlock(cin, cout, emb_channels, dropout=dropout, **kw)

        # Encoder: a conv, then per resolution an optional downsampling block and num_blocks blocks.
        self.enc, cout = nn.ModuleDict(), model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(in_channels, model_channels, 3)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = block(cin, cout, attention=res in attn_resolutions)

        # Decoder: mirror image with num_blocks + 1 blocks per resolution, each taking one skip.
        skips = [layer.out_channels for layer in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = block(cin, cout, attention=attention)
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = group_norm(cout)
        self.dec[f"{res}x{res}_aux_conv"] = Conv(cout, out_channels, 3, init_scale=1e-5)

    def embedding(self, c_noise_t, c_noise_s, augment_labels=None):
        """emb = silu(MLP_t(PE(c_noise_t) [+ A aug]) + MLP_s(PE(c_noise_s))) in float64, shape [N or 1, emb]."""
        pe_t = positional_embedding(c_noise_t.reshape(-1), self.noise_channels)
        if augment_labels is not None:
            pe_t = pe_t + self.map_augment(augment_labels.to(pe_t.dtype))
        pe_s = positional_embedding(c_noise_s.reshape(-1), self.noise_channels)
        emb_t = self.map_layer1(F.silu(self.map_layer0(pe_t)))
        emb_s = self.map_layer1_s(F.silu(self.map_layer0_s(pe_s)))
        return F.silu(emb_t + emb_s)

    def forward(self, x, c_noise_t, c_noise_s, augment_labels=None):
        if augment_labels is not None and self.map_augment is None:
            raise ValueError("this DDPMpp has no augmentation-label input (augment_dim=0): pass augment_labels=None")
        emb = self.embedding(c_noise_t, c_noise_s, augment_labels)
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        *blocks, aux_norm, aux_conv = self.dec.values()
        for layer in blocks:
            if x.shape[1] != layer.in_channels:   # every decoder block except in0, in1 and up takes a skip
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return aux_conv(F.silu(aux_norm(x)))


# ---------------------------------------------------------------------------------------------
# 8. Sample quality for low-dimensional data: sliced Wasserstein-2 distance (needs no network)
# ---------------------------------------------------------------------------------------------

def sliced_wasserstein(x, y, n_proj=256, seed=0):
    """sqrt(mean over directions of W_2^2 of the 1D projections) between equal-size point sets.

    2D uses n_proj evenly spaced angles (deterministic); higher dims use seeded random directions.
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein: need equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] == 2:
        angle = torch.arange(n_proj, dtype=torch.float64) * math.pi / n_proj
        dirs = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    else:
        dirs = torch.randn(n_proj, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    px, _ = (x @ dirs.T.to(x.device)).sort(0)
    py, _ = (y @ dirs.T.to(y.device)).sort(0)
    return (px - py).square().mean().sqrt().item()


def share_on_black_squares(x):
    """Fraction of 2D points on a black square of toy_data's checkerboard (data 1.0, uniform on the board 0.5).

    The board is the 4x4 grid of unit cells over [-2, 2]^2; a cell is black where its column and row have the same
    parity. SW2 sees the board only through 1D projections, which a uniform cloud nearly matches; this sees the pattern.
    """
    col, row = (x.double() + 2).floor().clamp(0, 3).unbind(1)   # a point on the board's right or top edge: last cell
    return ((x.abs() <= 2).all(1) & (col % 2 == row % 2)).double().mean().item()


# ---------------------------------------------------------------------------------------------
# 9. 2D demo: IMM against flow matching with the same network, step budget and sampler code
# ---------------------------------------------------------------------------------------------

def toy_data(n, name="checkerboard", generator=None):
    """Samples of a 2D distribution with about unit scale: 'checkerboard' (8 squares on a 4x4 board
    over [-2, 2]^2) or 'gaussians' (25 modes on a 5x5 grid, spacing 1, std 0.05)."""
    if name == "checkerboard":
        u = torch.rand(n, 2, generator=generator)
        col = torch.randint(0, 4, (n,), generator=generator)
        row = 2 * torch.randint(0, 2, (n,), generator=generator) + col % 2   # black squares only
        return torch.stack([col + u[:, 0], row + u[:, 1]], 1) - 2.0
    if name == "gaussians":
        idx = torch.randint(0, 25, (n,), generator=generator)
        centres = torch.stack([idx % 5, idx // 5], 1).float() - 2.0
        return centres + 0.05 * torch.randn(n, 2, generator=generator)
    raise ValueError(f"toy_data: unknown dataset {name!r}; use 'checkerboard' or 'gaussians'")


def train_2d(method, cfg, data="checkerboard", steps=3000, batch=1024, lr=1e-3, seed=0,
             width=128, depth=3, ema_decay=0.995, callback=None):
    """Train MLP + IMMModel on 2D data with `method` 'imm' or 'fm'; returns (EMA model, losses).

    callback(step, model, ema), if given, runs every 100 steps and after the last one (the notebook plots progress
    with it; the demo prints it).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = IMMModel(MLP(dim=2, width=width, depth=depth), cfg)
    ema = IMMModel(MLP(dim=2, width=width, depth=depth), cfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = imm_loss if method == "imm" else fm_loss
    losses = []
    for step in range(steps):
        x = toy_data(batch, data, generator=gen)
        loss, _ = loss_fn(model, x, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, ema_decay)
        losses.append(loss.item())
        if callback is not None and ((step + 1) % 100 == 0 or step + 1 == steps):
            callback(step + 1, model, ema)
    return ema, losses


def sample_2d(model, n, n_steps, seed=0, kind="uniform", sampler="pushforward"):
    """n samples from a trained 2D model with the 'pushforward' (Algorithm 2) or 'restart' (Algorithm 5) sampler,
    as float32; restart's re-noising comes from the same seeded generator as the prior."""
    gen = torch.Generator().manual_seed(seed)
    x_T, ts = prior_sample((n, 2), model.cfg, generator=gen), timesteps(n_steps, kind, model.cfg)
    if sampler == "pushforward":
        return pushforward_sample(model, x_T, ts).float()
    if sampler == "restart":
        return restart_sample(model, x_T, ts, generator=gen).float()
    raise ValueError(f"sample_2d: sampler must be 'pushforward' or 'restart', got {sampler!r}")


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage dump), once under torchrun (by rank 0)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n"
                  if os.environ.get("RANK", "0") == "0" else None)


def int_at_least(lo, multiple_of=1):
    """argparse type: an integer >= lo (and a multiple of `multiple_of`)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value < lo or value % multiple_of:
            extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise argparse.ArgumentTypeError(f"must be at least {lo}{extra}, got {value}")
        return value
    return parse


def main(argv=None):
    p = ArgParser(description="IMM vs flow matching on 2D data (CPU, about a minute).")
    p.add_argument("--data", default="checkerboard", choices=["checkerboard", "gaussians"])
    p.add_argument("--steps", type=int_at_least(1), default=2000, help="training steps for each method")
    p.add_argument("--batch", type=int_at_least(4, multiple_of=4), default=512,
                   help="training batch (a multiple of M=4)")
    p.add_argument("--n-eval", type=int_at_least(2), default=10000, help="samples for SW2 and the share on squares")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="imm_2d.png", help="where to write the figure")
    args = p.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))

    def progress(step, model, ema):   # one flushed line every 500 steps, so a redirected run shows it is alive
        if step % 500 == 0 or step == args.steps:
            print(f"  {method.upper()} step {step}/{args.steps} ({time.time() - t0:.0f}s)", flush=True)

    cfg_imm, cfg_fm = IMMConfig.toy(), IMMConfig.toy()
    results, samples = {}, {}
    for method, cfg in (("imm", cfg_imm), ("fm", cfg_fm)):
        t0 = time.time()
        model, losses = train_2d(method, cfg, args.data, args.steps, args.batch, seed=args.seed, callback=progress)
        tail = losses[-100:]
        print(f"trained {method.upper():>3} for {args.steps} steps in {time.time() - t0:.1f}s "
              f"(final loss {sum(tail) / len(tail):.4g})", flush=True)
        # IMM with both samplers; FM only pushes forward (its restart would jump to t = 0 with one Euler step)
        for sampler in ("pushforward", "restart") if method == "imm" else ("pushforward",):
            for n in (1, 2, 4, 8) + ((100,) if method == "fm" else ()):
                samples[method, sampler, n] = sample_2d(model, args.n_eval, n, seed=args.seed + 10, sampler=sampler)
    data_gen = torch.Generator().manual_seed(args.seed + 20)
    ref, ref2 = toy_data(args.n_eval, args.data, data_gen), toy_data(args.n_eval, args.data, data_gen)
    floor = sliced_wasserstein(ref, ref2)
    on_board = args.data == "checkerboard"   # the share on black squares means something on the checkerboard only
    for key, x in samples.items():
        results[key] = sliced_wasserstein(x, ref), f"{share_on_black_squares(x):.3f}" if on_board else "-"

    print(f"\nsliced Wasserstein-2 distance (SW2) to fresh {args.data} data, {args.n_eval} samples, lower is better")
    if on_board:
        print("share: the share of samples on a black square (data 1.00, uniform on the board 0.50)")
    rows = (("imm", "pushforward", "IMM pushforward"), ("imm", "restart", "IMM restart"),
            ("fm", "pushforward", "flow matching"))
    print(f"{'steps':>5} " + "".join(f"{name:>17}" for *_, name in rows))
    print(f"{'':>5} " + f"{'SW2':>11} {'share':>5}" * 3)
    for n in (1, 2, 4, 8, 100):
        print(f"{n:>5} " + "".join(f"{results[m, sm, n][0]:>11.4f} {results[m, sm, n][1]:>5}"
                                   if (m, sm, n) in results else " " * 17 for m, sm, _ in rows))
    print(f"floor (two independent data draws): {floor:.4f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.6), sharex=True, sharey=True)
    show = 5000
    for row, (method, sampler, name) in enumerate(rows):
        axes[row, 0].scatter(*ref[:show].T, s=1, c="#000000")
        axes[row, 0].set_title("data")
        for col, n in enumerate((1, 2, 4, 8), start=1):
            sw2, share = results[method, sampler, n]
            axes[row, col].scatter(*samples[method, sampler, n][:show].T, s=1, c=("#0072B2", "#009E73", "#D55E00")[row])
            axes[row, col].set_title(f"{n} step{'s' * (n > 1)}: SW2 {sw2:.3f}" + f", share {share}" * on_board,
                                     fontsize=10)
        axes[row, 0].set_ylabel(name)
    for ax in axes.flat:
        ax.set_aspect("equal")
        ax.set_xlim(-2.6, 2.6)
        ax.set_ylim(-2.6, 2.6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
