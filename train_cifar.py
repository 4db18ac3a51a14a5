"""Train IMM on CIFAR-10 with the DDPM++ network (paper Table 5, App. I.1; the README says where we differ), then look
at a model (--sample) and measure it (--fid).

  python train_cifar.py                                   # one process, GPU or CPU
  torchrun --nproc_per_node=8 train_cifar.py              # DDP on 8 GPUs (several nodes: torchrun's rendezvous)
  python train_cifar.py --resume runs/X                   # continue a run exactly, with all of its options
  python train_cifar.py --sample runs/X --steps 1,2,4,8   # sample grids of its slowest EMA (--n N: N samples as npz)
  torchrun --nproc_per_node=8 train_cifar.py --fid official   # FID-50k of the released checkpoint at 1 and 2 steps

The file reads top to bottom: 1. config (options, run folders, checkpoint files), 2. processes (DDP, stop signals),
3. data and augmentation, 4. models from checkpoints and the official checkpoint's safe reader, 5. sampling and FID,
6. the training step, 7. --sample and --fid, 8. main: set-up and the training loop.

Randomness: every random choice of step n (data indices, flips and augmentations, times, noise) comes from a
generator seeded by (seed, n), identically on every rank, and each rank takes its slice of the global batch. So a
checkpoint needs no RNG state, resuming is exact, and 1 or N GPUs with the same global batch optimise the same loss up
to float rounding. Dropout masks are seeded by (seed, n, rank): with dropout > 0, runs on different numbers of GPUs
draw different (equally valid) masks.
"""
import argparse
import copy
import datetime
import fcntl
import functools
import glob
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import NamedTuple

if __name__ == "__main__":   # until the training loop takes over, a signal ends the process in one line: start-up has
    def stop_at_once(signum, frame):   # nothing to save (and importing torch alone takes seconds)
        if os.environ.get("RANK", "0") == "0":   # once under torchrun
            print(f"stopped by {signal.Signals(signum).name} during start-up: nothing to save", file=sys.stderr)
        os._exit(128 + signum)
    signal.signal(signal.SIGINT, stop_at_once)
    signal.signal(signal.SIGTERM, stop_at_once)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from imm import (ArgParser, DDPMpp, IMMConfig, IMMModel, Times, ema_update, fm_loss, imm_loss, int_at_least,
                 prior_sample, pushforward_sample, restart_sample, sample_times, timesteps)

# -----------------------------------------------------------------------------------------------
# 1. Config: the paper's CIFAR-10 recipe (imm.IMMConfig.cifar()) as defaults, every value settable on the command
#    line; run folders and checkpoints (plain tensors and Python data, read with torch.load(..., weights_only=True))
# -----------------------------------------------------------------------------------------------

OFFICIAL_CIFAR10_URL = "https://huggingface.co/lumaai/imm/resolve/main/cifar10.pt"   # the released EMA model
CIFAR = IMMConfig.cifar()

# Precision (README "Precision"): the Laplace kernel's gradient is the direction of y_r - y_t, which differ only through
# t - r (~2e-7 near T); bf16 gets it wrong (error 2.2 at t = 0.9) unless t - r >= 1e-3 (App. I.6's gap, the default).
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # mode -> autocast dtype
PEAK_TFLOPS = {"fp32": 67, "tf32": 494, "bf16": 989, "fp16": 989}   # dense, per H100 SXM / H200: the MFU denominator


def precision_setup(precision, device_type):
    """The network's autocast context and, for fp16, a loss scaler; sets cuBLAS/cuDNN's TF32 switches (fp32: off).
    fp32 master weights and the kernel, weighting and interpolants in fp32 or better in every mode."""
    if device_type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
    # fp16's 5 exponent bits underflow the small IMM gradients (the loss is ~1e-3) without loss scaling
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
    return autocast, scaler


def float_in(lo, hi, hi_open=True):   # argparse type: a float in [lo, hi) (or [lo, hi])
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not (lo <= value and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {text}")
        return value
    return parse


def number_list(kind, allow_empty=False):
    """argparse type: positive ints as a string ('2,2,2'), or floats in [0, 1) as a sorted tuple ('0.999,0.9999')."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
            if not (values or allow_empty) or not all(0 < v if kind is int else 0 <= v < 1 for v in values):
                raise ValueError   # out of range: the same message as a typo
        except ValueError:
            example = "2,2,2 (positive integers)" if kind is int else "0.999,0.9999 (each in [0, 1))"
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as {example}, got {text!r}")
        return ",".join(map(str, values)) if kind is int else tuple(sorted(values))
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):   # show defaults, except empty ones (0 is a value)
    def _get_help_string(self, action):
        empty = action.default in ("", None) or action.default is False
        return action.help if empty else super()._get_help_string(action)


# --tiny: a network and batch that train on a laptop CPU (0.77M parameters); options typed on the command line win
TINY = dict(channels=32, channel_mult="1,2", num_blocks=1, attn="16", batch=32, ckpt_every=100, log_every=10)
# options that say how this process runs, not what the run is: a resumed run takes them from the command line
RUNTIME_OPTIONS = {"sample", "fid", "resume", "run_dir", "compile", "bench"}
# options a resumed run cannot change: its weights, optimiser state and random draws depend on them
FIXED_OPTIONS = "channels channel_mult num_blocks attn dropout loss M k min_gap temb ema seed".split()


def get_parser():
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    pos, nonneg = int_at_least(1), int_at_least(0)
    a("--sample", metavar="MODEL", help="write a grid of MODEL's samples per --steps (with --n, also the samples as "
      "npz), then exit: a checkpoint, a run folder, or 'official' (the released model; a path or URL of it also works)")
    a("--fid", metavar="MODEL", help="FID of MODEL's samples per --steps against the training images, then exit")
    # sampling: --sample, --fid, and a run's grids and --fid-every
    a("--steps", type=number_list(int), default="1,2", help="sampling steps, a list: 1 and 2 use the official CIFAR-10 "
      "lists, more are uniform in t (Eq. 117, the paper's multi-step results); flow matching: uniform Euler steps")
    a("--sampler", choices=["pushforward", "restart"], default="pushforward",
      help="pushforward (Algorithm 2: t_i -> t_i+1) or restart (Algorithm 5: t_i -> t_min, re-noised to t_i+1)")
    a("--n", type=pos, help="samples per step count: --sample also writes them as samples_*.npz (uint8 [N, 32, 32, "
      "3], key arr_0); FID (--fid, --fid-every) uses this many (default 50000)")
    # data
    a("--data-dir", default="./data", help="CIFAR-10 root (holds cifar-10-batches-py), that folder itself, or a folder "
      "of 32x32 images; a new or empty folder gets CIFAR-10 downloaded into it. 'fake': random images (smoke tests)")
    a("--augment", type=float_in(0, 1, hi_open=False), default=0.12, help="EDM augmentation probability (the paper's "
      "CIFAR-10 recipe, Table 5), with the 9 augmentation labels fed to the network; 0: x-flips only")
    # network: DDPM++ (paper App. I.1); small values give the tiny networks of the tests
    a("--tiny", action="store_true", help="a tiny network and batch for a CPU smoke run: " +
      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY.items()) + " (options typed as well win)")
    a("--channels", type=pos, default=128, help="DDPM++ base channels (model_channels)")
    a("--channel-mult", type=number_list(int), default="2,2,2", help="channel multiplier per resolution")
    a("--num-blocks", type=pos, default=4, help="residual blocks per resolution")
    a("--attn", type=number_list(int, allow_empty=True), default="16", help="resolutions with attention ('': none)")
    a("--dropout", type=float_in(0, 1), default=0.2, help="dropout inside the residual blocks")
    # method (the rest is imm.IMMConfig.cifar())
    a("--loss", choices=["imm", "fm"], default="imm",
      help="imm (Eq. 12), or the flow-matching baseline on the same network (Euler steps at sampling)")
    a("--M", type=pos, default=CIFAR.M, help="particles per group of the MMD estimate (micro-batches: multiples of M)")
    a("--k", type=nonneg, default=CIFAR.k, help="r(s,t) step: delta eta = (eta(T) - eta(t_min)) / 2^k")
    a("--min-gap", type=float_in(0, 0.5), default=CIFAR.min_gap,
      help="App. I.6: keep t - r >= this (0 = the paper's CIFAR recipe); low precision cannot resolve smaller gaps")
    a("--temb", choices=["identity", "stride"], default=CIFAR.temb,
      help="second time input of the network: s (identity, the released CIFAR model) or t - s (stride, App. I.6)")
    # optimisation
    a("--batch", type=pos, default=4096, help="global batch, split evenly over the processes")
    a("--batch-gpu", type=nonneg, default=0,
      help="micro-batch per process (0 = batch / processes); smaller means gradient accumulation")
    a("--lr", type=float_in(0, 1), default=1e-4, help="RAdam learning rate (constant)")
    a("--ema", type=number_list(float), default=None, help="EMA decay rates per step (default 0.9999), each kept in "
      "the checkpoint with a warm-up min(rate, (1 + n) / (10 + n)) at step n; grids and --fid-every use the slowest. "
      "With --sample/--fid: the checkpoint's EMA to use (default: the slowest; 0: the live weights)")
    a("--max-steps", type=pos, default=400_000, help="stop after this many optimiser steps")
    a("--precision", choices=list(PRECISIONS), help="network arithmetic, fp32 master weights always: fp32 (strict), "
      "tf32 (fp32 with TF32 tensor cores, the paper's), bf16 (default) or fp16 autocast (fp16 with loss scaling). CPU: "
      "always fp32. --sample/--fid: the run's (bf16 samples as well as TF32: README 'Measured speed')")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model and keep it in "
      "channels_last (default: on with CUDA, off on CPU; the first steps then take ~3 min). --sample/--fid: off unless "
      "typed: sampling runs 2.1x faster after a compile of a minute or more, which pays from ~350k network calls")
    a("--seed", type=int, help="seed of the initialisation and all random draws (default 0; --sample/--fid: the run's)")
    # the run folder: logs, grids, checkpoints, FID
    a("--run-dir", default="", help="folder for logs, grids and checkpoints (default: runs/<date-time>, or the resumed "
      "run's folder); a folder that already holds a run is only continued with --resume")
    a("--resume", default="", help="checkpoint file or run folder to continue from (its ckpt.pt, else ckpt.prev.pt; "
      "none yet: step 0 with its args.json), or 'auto' (--run-dir's, else the newest runs/*; none: start afresh). "
      "The run keeps its options except those typed again; its network, method, EMA rates and seed cannot change")
    a("--log-every", type=pos, default=100, help="print, append to log.jsonl and check the loss is finite this often")
    a("--ckpt-every", type=pos, default=10_000, help="write ckpt.pt and sample grids (--steps) this often")
    a("--fid-every", type=nonneg, default=0, help="FID of the slowest EMA at --steps every this many steps, against "
      "the training images, to log.jsonl and the console (0 = never)")
    a("--bench", type=nonneg, default=0, metavar="N", help="time N training steps on fake data after warm-up: img/s, "
      "ms/step, MFU, peak memory and the top GPU kernels, then exit; writes no run folder")
    return p


def ints(text):   # '2,2,2' -> (2, 2, 2)
    return tuple(int(v) for v in text.split(",") if v.strip())


def net_kwargs(args):   # DDPMpp's arguments
    return dict(model_channels=args.channels, channel_mult=ints(args.channel_mult), num_blocks=args.num_blocks,
                attn_resolutions=ints(args.attn), dropout=args.dropout, augment_dim=9 if args.augment else 0)


def shown(value):   # an option's value as typed: 0.999,0.9999 rather than (0.999, 0.9999)
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


# Run folders (README "Training CIFAR-10"): files are replaced atomically, on the disk before and after the rename (a
# power loss needs both). Resuming parses the command line twice: the first parse finds the run, whose options (its
# checkpoint's, or its args.json's before the first) become the second's defaults, so that options typed again win.
def write_atomically(path, write, keep=None):   # keep: where the file it replaces goes (ckpt.prev.pt)
    path = os.fspath(path)
    with open(path + ".tmp", "wb") as f:
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as e:   # a full disk, a file-size limit: no partial file stays to fill the disk
            os.remove(f.name)
            raise e.__context__ if isinstance(e.__context__, OSError) else e   # torch.save wraps it in a RuntimeError
    if keep and os.path.exists(path):
        os.replace(path, keep)
    os.replace(path + ".tmp", path)
    os.fsync(folder := os.open(os.path.dirname(path) or ".", os.O_RDONLY))
    os.close(folder)


def write_failed(folder, e):   # a failed write in one line: why, and the space left on the folder's disk
    disk = os.path.abspath(folder)
    while not os.path.ismount(disk):
        disk = os.path.dirname(disk)
    return (f"cannot write to {folder} ({e.strerror or e}; "
            f"{shutil.disk_usage(disk).free / 2**20:,.0f} MiB free on {disk})")


def open_run_dir(run_dir, args, step):
    """Rank 0, before the model is built: refuse a folder in use or with another run; write args.json, cut the log."""
    held = [f for f in ("ckpt.pt", "log.jsonl", "args.json") if os.path.isfile(os.path.join(run_dir, f))]
    if held and not args.resume:
        raise SystemExit(f"{run_dir} already holds a run ({', '.join(held)}): continue it with --resume {run_dir}, "
                         f"or choose a new --run-dir")
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "lock"), "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        print(f"pid {os.getpid()} on {os.uname().nodename}", file=lock, flush=True)   # what a refused process names
        write_atomically(os.path.join(run_dir, "args.json"),
                         lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
        truncate_log(os.path.join(run_dir, "log.jsonl"), step)
        return lock
    except BlockingIOError:   # the flock is held (the OS drops it when its process dies: no stale locks)
        lock.seek(0)
        raise SystemExit(f"{run_dir} is in use by another training process ({lock.read().strip()}): wait for it to "
                         f"end or stop it, or choose another --run-dir")
    except OSError as e:
        raise SystemExit(f"{write_failed(run_dir, e)}: make it writable, or choose another --run-dir")


def truncate_log(path, step):
    """Cut log.jsonl after the last whole line of a step <= `step`, in place (which a full disk cannot stop); say so."""
    with open(path, "a+b") as f:
        f.seek(0)
        lines = f.readlines()
        for kept, line in enumerate(lines + [b""]):   # the empty line ends it
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                    break
            except (ValueError, KeyError, TypeError):   # not JSON, or not a record
                break
        f.truncate(sum(map(len, lines[:kept])))
    if kept < len(lines):
        print(f"{path}: cut {len(lines) - kept} line(s) written after step {step}" +
              ", the last one torn by a failed write" * (not lines[-1].endswith(b"\n")), flush=True)


def find_checkpoint(resume, run_dir=""):
    """(path, checkpoint, note): a file, or a run folder's ckpt.pt or, missing or damaged, the one before it (the note
    says why); (ckpt.pt, None, '') for a run stopped before its first. 'auto': --run-dir's, else the newest runs/*."""
    if resume == "auto":
        found = sorted(glob.glob(os.path.join(run_dir or "runs/*", "ckpt*.pt")), key=os.path.getmtime)
        resume = os.path.dirname(found[-1]) if found else run_dir
        if not (found or run_dir and os.path.isfile(os.path.join(run_dir, "args.json"))):
            return None, None, ""
    if not os.path.isdir(resume):
        return resume, load_checkpoint(resume), ""
    path, prev = os.path.join(resume, "ckpt.pt"), os.path.join(resume, "ckpt.prev.pt")
    if not (os.path.isfile(path) or os.path.isfile(prev)) and os.path.isfile(os.path.join(resume, "args.json")):
        return path, None, ""
    try:
        return path, load_checkpoint(path), ""
    except SystemExit as e:
        if not os.path.isfile(prev):
            raise
        return prev, load_checkpoint(prev), e.code.replace(path, "ckpt.pt").split(":")[0].split(";")[0]   # why, short


def load_checkpoint(path):
    """Our checkpoint at path (weights_only=True); else one line naming the file, never torch's unpickling advice."""
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # random bytes, a truncated write, or a pickle that wants to run code
        raise SystemExit(f"{path} cannot be read as a checkpoint ({type(e).__name__}): the file is damaged or "
                         f"truncated; start a new --run-dir")
    keys = ("step", "model", "ema", "optimizer", "net", "imm", "args")
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a train_cifar.py checkpoint (it has no {', '.join(missing)}); for the "
                         f"official CIFAR-10 model use --sample/--fid official")
    if not isinstance(ckpt["ema"], dict) or not ckpt["ema"]:
        raise SystemExit(f"{path} holds no EMA weights: the file was edited or is damaged")
    if torch.is_tensor(next(iter(ckpt["ema"].values()))):   # written before --ema took a list: one EMA
        rate = ckpt["args"]["ema"]
        ckpt["ema"], ckpt["args"]["ema"] = {f"{rate:g}": ckpt["ema"]}, (rate,)
    return ckpt


def parse_args(argv=None):
    """(args, ckpt, ckpt_path, changed, note); `changed`: [(name, saved, now)] for the options typed again."""
    parser = get_parser()
    args = parser.parse_args(argv)
    ckpt, path, saved, note = None, None, {}, ""
    if args.resume and not (args.sample or args.fid):
        path, ckpt, note = find_checkpoint(args.resume, args.run_dir)
        saved = ckpt["args"] if ckpt else {}
        if path and not ckpt:   # stopped before its first checkpoint
            with open(os.path.join(os.path.dirname(path), "args.json")) as f:
                saved = json.load(f)
            saved["ema"] = tuple(saved["ema"])
    if args.tiny:
        parser.set_defaults(**TINY)
    saved = {k: v for k, v in saved.items() if k in vars(args) and k not in RUNTIME_OPTIONS}
    parser.set_defaults(**saved)
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir or (os.path.dirname(path) if path else "")
    changed = [(k, v, getattr(args, k)) for k, v in saved.items() if getattr(args, k) != v]
    if not (args.sample or args.fid):   # --sample/--fid take these from the run they sample (evaluate)
        args.ema, args.seed, args.precision = args.ema or (0.9999,), args.seed or 0, args.precision or "bf16"
    if ckpt:
        fixed = [k for k, _, _ in changed if k in FIXED_OPTIONS or (k == "augment" and net_kwargs(args) != ckpt["net"])]
        if fixed:
            names = ", ".join(f"--{k.replace('_', '-')} {shown(getattr(args, k))}" for k in fixed)
            raise SystemExit(f"cannot resume with {names}: a resumed run keeps its network, method, EMA rates and "
                             f"seed; start a new --run-dir to change them")
    return args, ckpt, path, changed, note


def check_sampler(sampler, flow_matching):
    if sampler == "restart" and flow_matching:
        raise SystemExit("--sampler restart: a flow-matching model samples with Euler steps; restart sampling "
                         "(Algorithm 5) jumps to t_min in one call, which only an IMM model can do")


def check_args(args, world):
    """(per-process batch, micro-batch); impossible combinations end the run before any data or model is touched."""
    if args.sample and args.fid:
        raise SystemExit("choose one of --sample and --fid")
    if args.n and not (args.sample or args.fid or args.fid_every):
        raise SystemExit("--n is the number of samples of --sample, --fid or --fid-every: use it with one of them")
    if args.sample or args.fid:
        if args.ema and len(args.ema) > 1:
            raise SystemExit("--sample and --fid use one model: give one EMA rate (0: the live weights)")
        return None, None
    check_sampler(args.sampler, args.loss == "fm")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the {world} processes")
    per_rank = args.batch // world
    batch_gpu = args.batch_gpu or per_rank
    if per_rank % batch_gpu:
        raise SystemExit(f"--batch-gpu {batch_gpu} does not divide the per-process batch {per_rank} "
                         f"(= {args.batch} / {world})")
    if batch_gpu % args.M:
        raise SystemExit(f"the per-GPU micro-batch {batch_gpu} is not a multiple of M={args.M}: groups of M particles "
                         f"must not straddle GPUs (set --batch/--batch-gpu to multiples of {args.M})")
    return per_rank, batch_gpu


# -----------------------------------------------------------------------------------------------
# 2. Processes: torchrun's RANK / LOCAL_RANK / WORLD_SIZE (a plain `python` run is rank 0 of 1)
# -----------------------------------------------------------------------------------------------

class Env:
    """DDP set-up, the device, and what every rank needs to say, stop or download together."""

    def __init__(self):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank, self.local_rank, self.world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
                                                  if self.ddp else (0, 0, 1))
        self.cuda, self.master, self.lock = torch.cuda.is_available(), self.rank == 0, None   # lock: see main
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True       # fixed shapes: let cuDNN time its algorithms once per shape
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                    device_id=self.device if self.cuda else None)

    def say(self, *a, **k):   # rank 0 prints, flushed so that a redirected log shows progress
        if self.master:
            print(*a, **{**k, "flush": True})

    def stop(self, message):   # every rank stops with the same clear message
        self.close()
        raise SystemExit(message)

    def close(self):
        if self.lock:
            self.lock.close()
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    def rank0_first(self, fn):
        """Runs fn on each node's local rank 0 (to download), then on the others, which torchrun stops if it fails."""
        if self.ddp and self.local_rank != 0:
            dist.barrier()
        out = fn()
        if self.ddp and self.local_rank == 0:
            dist.barrier()
        return out


class StopSignals:
    """Ctrl-C and SIGTERM stop training after the current step, with a checkpoint; a second Ctrl-C exits at once."""
    signum = 0   # the first signal's number; 0: none yet

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            first = "second Ctrl-C" if self.signum == signum else f"Ctrl-C after {signal.Signals(self.signum).name}"
            print(f"{first}: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = self.signum or signum

    def agreed(self, env, pending):
        """The signal every rank stops for after this step (0: none). Under DDP the ranks all-reduce a flag each step;
        on a GPU it is copied to pinned memory and read two steps later (.item() would wait for all the queued work)."""
        if not env.ddp:
            return self.signum
        flag, ready = torch.full((), self.signum, device=env.device), None   # a fill kernel: no host-to-GPU copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if env.cuda:
            host, ready = torch.empty((), dtype=flag.dtype, pin_memory=True), torch.cuda.Event()
            host.copy_(flag, non_blocking=True)
            ready.record()
            flag = host
        pending.append((flag, ready))
        if len(pending) < 3:
            return 0
        flag, ready = pending.pop(0)
        if ready is not None:
            ready.synchronize()
        return int(flag)


# -----------------------------------------------------------------------------------------------
# 3. Data: the whole training set as one uint8 tensor [N, 3, 32, 32] on the device; augmentation; each step's draws
# -----------------------------------------------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `allowed` ({(module, name): object, None: the real one}); `unknown` gets others."""
    allowed = {}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            return self.unknown(module, name)
        return self.allowed[module, name] or super().find_class(module, name)

    def unknown(self, module, name):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


class CifarUnpickler(RestrictedUnpickler):
    """CIFAR-10 batches hold only dicts, lists, bytes and numpy arrays: a tampered file cannot run code."""
    allowed = dict.fromkeys([("numpy", "ndarray"), ("numpy", "dtype")] + [(f"numpy{core}.multiarray", name)
                            for core in (".core", "._core") for name in ("_reconstruct", "scalar")])


def load_cifar_python(folder):
    """data_batch_1..5 of the CIFAR-10 python release: pickled dicts with b'data' uint8 [N, 3072]."""
    parts = []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        if not os.path.isfile(path):
            raise SystemExit(f"{folder} is missing data_batch_{i}: delete the folder and run again to re-download "
                             f"CIFAR-10, or place the complete cifar-10-batches-py there")
        try:
            with open(path, "rb") as f:
                data = np.asarray(CifarUnpickler(f, encoding="bytes").load()[b"data"], dtype=np.uint8)
            assert data.ndim == 2 and data.shape[1] == 3 * 32 * 32, f"b'data' has shape {data.shape}, not [N, 3072]"
        except Exception as e:
            raise SystemExit(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                             f"delete {folder} and run again to re-download it")
        parts.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    return torch.cat(parts)


def load_dataset(data_dir):
    """CIFAR-10's python batches (downloaded into a new or empty folder) or a folder of 32x32 images, labels unused."""
    for folder in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if os.path.isfile(os.path.join(folder, "data_batch_1")):
            return load_cifar_python(folder)
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")))
    if paths:
        from PIL import Image
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    im = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise SystemExit(f"cannot read image {path} ({type(e).__name__}: {e})")
            if im.shape[:2] != (32, 32):
                raise SystemExit(f"{path} is {im.shape[1]}x{im.shape[0]}; this script trains on 32x32 images, "
                                 f"resize the folder first")
            images.append(im)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if not os.path.isdir(data_dir) or not os.listdir(data_dir) or os.path.isfile(
            os.path.join(data_dir, "cifar-10-python.tar.gz")):
        import torchvision
        created = os.path.abspath(data_dir)   # the outermost folder that the download creates, if any
        while not os.path.exists(os.path.dirname(created)):
            created = os.path.dirname(created)
        created = None if os.path.exists(created) else created
        try:
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            if created:   # a mistyped path must not leave folders behind
                shutil.rmtree(created, ignore_errors=True)
            raise SystemExit(f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); offline, place "
                             f"cifar-10-python.tar.gz or the extracted cifar-10-batches-py folder there")
        return load_cifar_python(os.path.join(data_dir, "cifar-10-batches-py"))
    raise SystemExit(f"no training data in {data_dir!r}: expected CIFAR-10 in the python format "
                     f"({os.path.join(data_dir, 'cifar-10-batches-py')}/data_batch_1..5) or a folder of 32x32 images; "
                     f"pass --data-dir, or a new or empty folder to download CIFAR-10 into")


# EDM's augmentation (Karras et al. 2022, App. F.2; README "Training CIFAR-10"), which the paper's CIFAR-10 recipe uses
# (Table 5), in EDM's CIFAR-10 setting (augment.py with xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
# translate_frac=1). The network samples with zero labels, i.e. un-augmented images: the augmentations do not leak.

def augment_params(n, p, g):
    """EDM's random choices for n images from the CPU generator g: [n] tensors, 0 where not applied (p = 0: x-flips)."""
    def gate(prob, v):
        return torch.where(torch.rand(v.shape[-1], generator=g) < prob, v, torch.zeros_like(v))
    params = dict(xflip=torch.randint(2, (n,), generator=g).double())
    if p == 0:
        return params
    params.update(yflip=gate(p, torch.randint(2, (n,), generator=g).double()),
                  scale=gate(p, torch.randn(n, generator=g, dtype=torch.float64)),
                  rotate=gate(p, (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi),
                  aniso=gate(p, torch.randn(n, generator=g, dtype=torch.float64)),
                  aniso_angle=gate(0.5, (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi),
                  translate=gate(p, torch.randn(2, n, generator=g, dtype=torch.float64)))
    # the axis of an anisotropy that is not applied is irrelevant: zero it, so untouched images stay exactly untouched
    params["aniso_angle"] = torch.where(params["aniso"] != 0, params["aniso_angle"], 0.0)
    return params


def augment_labels(params):
    """The [n, 9] augmentation labels of EDM's pipe, which the network is conditioned on."""
    rot, w, r = params["rotate"], params["aniso"], params["aniso_angle"]
    return torch.stack([params["xflip"], params["yflip"], params["scale"], rot.cos() - 1, rot.sin(), w * r.cos(),
                        w * r.sin(), *params["translate"]], 1).float()


def augment_matrix(params, size):
    """[n, 3, 3] inverse maps G^-1: an output pixel (coordinates centred on the image, in pixels) reads the input at
    G^-1 (x, y, 1), composed in EDM's order: isotropic scale, rotation, anisotropic scale, translation."""
    def mat(a, b, c, d, tx=None, ty=None):
        zero, one = torch.zeros_like(a), torch.ones_like(a)
        tx, ty = (zero if tx is None else tx), (zero if ty is None else ty)
        return torch.stack([a, b, tx, c, d, ty, zero, zero, one], 1).reshape(-1, 3, 3)

    def rotate(t):
        return mat(t.cos(), -t.sin(), t.sin(), t.cos())
    s, a, r = torch.exp2(0.2 * params["scale"]), torch.exp2(0.2 * params["aniso"]), params["aniso_angle"]
    one = torch.ones_like(s)
    return (mat(1 / s, 0 * s, 0 * s, 1 / s) @ rotate(params["rotate"])                     # scale, then rotation
            @ rotate(-r) @ mat(1 / a, 0 * a, 0 * a, a) @ rotate(r)                            # anisotropy along r
            @ mat(one, 0 * s, 0 * s, one, *(-0.125 * size * params["translate"])))           # translation


def augment(x, params):
    """Augment images x [n, C, H, W] by `params` (one entry per image, on x's device): flips as pixel blits, the rest
    as one bicubic resampling with reflected borders; images with no geometric transform stay untouched, in order."""
    x = torch.where(params["xflip"][:, None, None, None] > 0, x.flip(3), x)
    if "yflip" not in params:   # p = 0: x-flips only
        return x
    x = torch.where(params["yflip"][:, None, None, None] > 0, x.flip(2), x)
    G = augment_matrix(params, x.shape[-1])
    moved = (G - torch.eye(3, dtype=G.dtype, device=G.device)).abs().flatten(1).amax(1) > 0
    # pixel coordinates centred on the image, times 2 / size, are grid_sample's coordinates (align_corners=False)
    theta = G[:, :2].clone()
    theta[:, :, 2] *= 2 / x.shape[-1]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return torch.where(moved[:, None, None, None], warped, x)


def step_seed(seed, step, slot=0):   # slot 0: the draws that all ranks share; slot 1 + rank: that rank's dropout masks
    return (seed * 1_000_003 + step) * 65_536 + slot


def global_batch(step, seed, n_data, batch, cfg, augment_p, device, img_shape=(3, 32, 32)):
    """Step `step`'s draws for the global batch, identical on every rank; one (t, r, s) per group of M (App. C.7)."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    idx = torch.randint(n_data, (batch,), generator=g)
    times = sample_times(batch // cfg.M, cfg, generator=g)
    aug = augment_params(batch, augment_p, g)
    noise = torch.randn(batch, *img_shape, generator=torch.Generator(device).manual_seed(step_seed(seed, step)),
                        device=device) * cfg.sigma_d
    # non_blocking: a blocking host-to-GPU copy waits for all queued GPU work, a host sync in every step
    to_device = lambda v: v.to(device, non_blocking=True)   # noqa: E731
    return to_device(idx), Times(*map(to_device, times)), noise, {k: to_device(v) for k, v in aug.items()}


def micro_batches(data, draws, lo, batch_gpu, accum, M, labelled):
    """This rank's `accum` micro-batches, global positions lo .. lo + accum * batch_gpu, as (x, noise, times, labels):
    x in [-1, 1] (x / 127.5 - 1, as the official code decodes), the augmentation labels None unless `labelled`."""
    idx, times, noise, aug = draws
    for a in range(accum):
        sl = slice(lo + a * batch_gpu, lo + (a + 1) * batch_gpu)
        params = {k: v[..., sl] for k, v in aug.items()}
        x = augment(data[idx[sl]].float() / 127.5 - 1, params)
        yield x, noise[sl], Times(*(v[sl.start // M: sl.stop // M] for v in times)), (
            augment_labels(params) if labelled else None)


# -----------------------------------------------------------------------------------------------
# 4. Models from checkpoints: ours, and the official one read by a restricted unpickler
# -----------------------------------------------------------------------------------------------

# The official CIFAR-10 checkpoint is a raw pickle whose classes rebuild themselves by exec()ing source text stored in
# the file (official torch_utils/persistence.py). We read it without running any of it, keeping tensors and scalars.
DENIED_MODULES = {"builtins", "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil", "socket",
                  "ctypes", "pickle", "marshal", "code"}   # a file naming these is refused with a clear error


class RefusedGlobalError(pickle.UnpicklingError):
    """The checkpoint names a global that can only serve to run code."""


class Inert:
    """Stand-in for every other class or function the file names: keeps what it is given, runs nothing."""

    def __new__(cls, *args, **kwargs):    # REDUCE calls the stub, NEWOBJ calls only __new__
        self = super().__new__(cls)
        self.args, self.state, self.items = args, None, {}
        return self

    def __setstate__(self, state):        # BUILD (e.g. a ModuleDict's __dict__)
        self.state = state

    def __setitem__(self, key, value):    # SETITEMS on dict subclasses (EasyDict)
        self.items[key] = value


def persistent_record(meta):
    """persistence._reconstruct_persistent_obj(meta): a record of meta['state'], the class's source dropped unread."""
    record = Inert()
    record.state = meta.get("state") if isinstance(meta, dict) else None
    return record


class OfficialUnpickler(RestrictedUnpickler):
    """Tensors and plain containers resolve, persistent objects become records, code-running globals are refused."""
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): persistent_record,
        # a storage is a legacy torch.save blob (weights_only reads it); GPU-saved ones name 'cuda:0': use the CPU
        ("torch.storage", "_load_from_bytes"): lambda b: torch.load(io.BytesIO(b), map_location="cpu",
                                                                    weights_only=True),
        ("torch._utils", "_rebuild_tensor_v2"): lambda storage, offset, size, stride, *_: torch.empty(
            0, dtype=storage.dtype).set_(storage, offset, size, stride).clone(),
        ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
        ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
        ("collections", "OrderedDict"): dict,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,   # pickle protocols < 4 spell sets this way
    }

    def unknown(self, module, name):
        if module.split(".")[0] in DENIED_MODULES:
            raise RefusedGlobalError(f"refusing to load global {module}.{name}: it can run code, and an "
                                     f"IMM checkpoint never needs it (is this file malicious?)")
        return type(name, (Inert,), {"__module__": "imm._inert." + module})   # a fresh class per name


def flat_state_dict(obj, prefix=""):
    """The state_dict() of a pickled module tree, from its records' __dict__; skips what Module.state_dict() skips."""
    state, out = (obj.state if isinstance(obj, Inert) and isinstance(obj.state, dict) else {}), {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if torch.is_tensor(tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        out.update(flat_state_dict(child, prefix + name + "."))
    return out


def official_config(state):
    """IMMConfig from the official IMMPrecond's scalars (training/preconds.py); the paper's CIFAR values if absent."""
    ours = dict(sigma_data="sigma_d", T="T", eps="t_min", f_type="f_type", temb_type="temb",
                noise_schedule="schedule", time_scale="time_scale")
    scalar = lambda v: isinstance(v, (int, float, str)) and not isinstance(v, bool)   # noqa: E731
    return IMMConfig(**{mine: type(getattr(IMMConfig(), mine))(state[theirs]) for theirs, mine in ours.items()
                        if scalar(state.get(theirs))})


def load_official(path_or_url=OFFICIAL_CIFAR10_URL, cache_dir=None):
    """(model, cfg) from an official IMM CIFAR-10 checkpoint: IMMModel(DDPMpp()) with the EMA weights, in eval mode.
    A URL is downloaded once into cache_dir (default ~/.cache/imm); an interrupted download leaves no file."""
    path = str(path_or_url)
    if "://" in path:
        cache_dir = os.path.expanduser(cache_dir or "~/.cache/imm")
        url, path = path, os.path.join(cache_dir, os.path.basename(path))
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)   # into a temporary file, then renamed
    expected = (f"expected an official IMM CIFAR-10 checkpoint (a raw pickle of a dict with 'ema', like "
                f"{OFFICIAL_CIFAR10_URL})")
    with open(path, "rb") as f:
        head = f.read(2)
        if head[:1] != b"\x80":
            what = "a zip archive (torch.save format), not a raw pickle" if head == b"PK" else "not a pickle file"
            raise ValueError(f"{path} is {what}; {expected}")
        f.seek(0)
        try:
            data = OfficialUnpickler(f).load()
        except RefusedGlobalError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                RuntimeError) as e:
            raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); {expected}") from e
    if not isinstance(data, dict) or "ema" not in data:
        raise ValueError(f"{path} has no 'ema' entry; {expected}")
    root = data["ema"]
    model = IMMModel(DDPMpp(), official_config(root.state if isinstance(root, Inert) and isinstance(root.state, dict)
                                               else {}))
    found, want = flat_state_dict(root), model.state_dict()
    missing = [k for k in want if k not in found]
    wrong = [f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
             if k in found and found[k].shape != v.shape]
    if missing or wrong:
        extra = [k for k in found if k not in want]
        raise ValueError(f"{path} is not an IMM CIFAR-10 DDPM++ checkpoint: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(wrong)} shape mismatches {wrong[:5]}, {len(extra)} unexpected keys {extra[:5]}")
    # extra keys (e.g. model.map_augment.weight) are ignored, as the official misc.copy_params_and_buffers does
    model.load_state_dict({k: found[k] for k in want})
    return model.eval(), model.cfg


def load_model(source, rate=None, say=print):
    """(model, name, folder, run options) for --sample/--fid: 'official' or its pickle (path or URL), or our
    checkpoint's EMA `rate` (default: the slowest; 0: the live weights); name: 'official', 'ema0.9999' or 'live'."""
    official = source == "official" or "://" in source
    if not official and os.path.isfile(source):
        with open(source, "rb") as f:
            official = f.read(1) == b"\x80"   # a raw pickle; ours are zip archives
    if official:
        try:
            model = load_official(OFFICIAL_CIFAR10_URL if source == "official" else source)[0]
            return model, "official", "out", dict(precision="tf32")   # the paper trained and sampled in TF32
        except (OSError, ValueError, pickle.UnpicklingError) as e:   # offline, missing or not an official checkpoint
            raise SystemExit(f"cannot load the official checkpoint {source} ({type(e).__name__}: {e}); offline, "
                             f"download {OFFICIAL_CIFAR10_URL} elsewhere and pass its path")
    path, ckpt, note = find_checkpoint(source)
    if ckpt is None:
        raise SystemExit(f"--sample/--fid {source}: no checkpoint found")
    if note:
        say(f"using {path} ({note})")
    return (*model_from_checkpoint(ckpt, rate), os.path.dirname(path), ckpt["args"])


def model_from_checkpoint(ckpt, rate=None):
    """(IMMModel, name) of one of our checkpoints (load_checkpoint) with its EMA `rate` (default: the slowest; 0: the
    live weights); name: 'ema0.9999' or 'live'."""
    emas = ckpt["ema"]
    key = max(emas, key=float) if rate is None else f"{rate:g}"
    if rate != 0 and key not in emas:
        raise SystemExit(f"--ema {key}: the checkpoint keeps the EMAs {', '.join(emas)} (or 0, the live weights)")
    state, name = (ckpt["model"], "live") if rate == 0 else (emas[key], f"ema{key}")
    model = IMMModel(DDPMpp(**ckpt["net"]), IMMConfig(**ckpt["imm"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"the checkpoint's weights do not fit its own network settings {ckpt['net']} "
                         f"({str(e).splitlines()[0]}); the file was edited or is damaged")
    return model, name


# -----------------------------------------------------------------------------------------------
# 5. Sampling and FID (torch-fidelity, imported only here)
# -----------------------------------------------------------------------------------------------

def decode_images(x):
    """Float NCHW -> uint8 NHWC as the official code: +128 and truncation round half up (-1, 0, 1 -> 0, 128, 255)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(images, path, nrow=None):
    """Write uint8 NHWC images as one PNG, nrow images per row (default ~square), black cells after the last one."""
    from PIL import Image
    N, H, W, C = images.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    img = torch.cat([images, images.new_zeros(rows * nrow - N, H, W, C)])
    grid = img.reshape(rows, nrow, H, W, C).transpose(1, 2).reshape(rows * H, nrow * W, C)
    image = Image.fromarray(grid.squeeze(-1).numpy() if C == 1 else grid.numpy())
    write_atomically(path, lambda f: image.save(f, format="PNG"))   # a full disk leaves the grid before it whole


def sampling_times(steps, cfg):
    """The sampler's times T = t_0 > ... > t_steps = t_min: the official CIFAR-10 lists at 1 and 2 steps, else uniform
    in t (Eq. 117); flow matching: uniform Euler steps. README "Sampling" gives each list's source."""
    if steps <= 2 and cfg.f_type != "euler_fm":
        return timesteps(steps, "eta", cfg, mid_eta=(1.4,)[:steps - 1])
    return timesteps(steps, "uniform", cfg)


def sampler_name(sampler, cfg):   # in file names and logs: a flow-matching model's pushforward steps are Euler steps
    return "euler" if cfg.f_type == "euler_fm" else sampler


def progress_bar(items, desc, show):   # rank 0's bar on a terminal; a redirected log gets one line per stage instead
    return tqdm(items, desc=desc, unit="batch", leave=False, disable=not (show and sys.stderr.isatty()))


SAMPLE_BATCH = 500   # images per sampler call; the noise is seeded per batch, so this is part of what a seed means


def sample_images(model, n, steps=2, sampler="pushforward", seed=0, batch=SAMPLE_BATCH, rank=0, world=1,
                  progress=False, autocast=nullcontext()):
    """n samples as uint8 NHWC on the CPU, with Algorithm 2 (pushforward) or 5 (restart) at sampling_times(steps); with
    world > 1 (every rank calls it), this rank's batches rank, rank + world, ... (gather_images joins them). Batch b's
    noise is seeded by (seed, b), one row per image: a grid starts like any larger draw, on any number of ranks."""
    net, device, ts = model.model, next(model.parameters()).device, sampling_times(steps, model.cfg)
    shape, out = (net.in_channels, net.img_resolution, net.img_resolution), []
    for b in progress_bar(range(rank, math.ceil(n / batch), world), f"{steps}-step {sampler}", progress):
        seed_b = seed * 1_000_003 + b
        x = prior_sample((min(batch, n - b * batch), *shape), model.cfg, device, torch.Generator().manual_seed(seed_b))
        with autocast:   # the network's precision; the prior and the sampler's arithmetic stay float64
            x = (restart_sample(model, x, ts, generator=torch.Generator().manual_seed(2**63 + seed_b))
                 if sampler == "restart" else pushforward_sample(model, x, ts))
        out.append(decode_images(x))
    return torch.cat(out) if out else torch.empty(0, *shape[1:], shape[0], dtype=torch.uint8)


def gather_images(mine, n, env, batch=SAMPLE_BATCH):
    """All n images of sample_images, in order, on rank 0 from every rank's share (None on the other ranks)."""
    if not env.ddp:
        return mine
    shares = [None] * env.world if env.master else None
    dist.gather_object(mine, shares)
    if not env.master:
        return None
    shares = [list(share.split(batch)) for share in shares]
    return torch.cat([shares[b % env.world][b // env.world] for b in range(math.ceil(n / batch))])


def save_grids(model, out_dir, tag, steps, sampler, seed, autocast=nullcontext()):
    """A grid of 64 samples per step count, samples<tag>_<sampler>_<n>step.png, from the seed's first 64 noises."""
    for n in steps:
        save_image_grid(sample_images(model, 64, n, sampler, seed, autocast=autocast),
                        os.path.join(out_dir, f"samples{tag}_{sampler_name(sampler, model.cfg)}_{n}step.png"))


def fid_setup(say=print):
    """Import torch-fidelity and have its Inception weights on disk and intact before any sample is drawn: offline,
    its own torch.hub download fails late and obscurely, so try it here and else say exactly which file goes where."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    except ImportError:
        raise SystemExit("--fid needs torch-fidelity: pip install 'torch-fidelity>=0.4.0'")
    name = os.path.basename(url)
    path, prefix = os.path.join(torch.hub.get_dir(), "checkpoints", name), name.split("-")[-1].split(".")[0]
    if not os.path.isfile(path):   # the file's name carries the start of its SHA-256, which the download checks
        say(f"FID: downloading torch-fidelity's Inception weights (91 MB) from {url} to {path}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=sys.stderr.isatty())
        except Exception as e:
            raise SystemExit(f"FID needs torch-fidelity's Inception weights and could not download them "
                             f"({type(e).__name__}: {e}); fetch {url} elsewhere, place it at {path} (in $TORCH_HOME)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not digest.startswith(prefix):
        raise SystemExit(f"{path} is not torch-fidelity's Inception weights (SHA-256 {digest[:8]}..., expected "
                         f"{prefix}...): delete it and run again, or place the file from {url} there")


# fn: uint8 [N, 3, H, W] on the device -> [N, dim] features; name keys cached statistics
Extractor = NamedTuple("Extractor", [("name", str), ("dim", int), ("fn", object)])


@functools.lru_cache(maxsize=2)   # --fid-every calls it at every evaluation: load the weights once per device
def fid_feature_extractor(device):
    """torch-fidelity's TF-Inception and its 2048-d pool features (a function of its own: tests put a tiny one here)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
    return Extractor(f"torch-fidelity {torch_fidelity.__version__} (Inception-v3 2015-12-05 TF weights, 2048-d pool "
                     f"features, TF1 bilinear resize to 299)", 2048, lambda x: net(x)[0])


def fid_statistics(images, extractor, env, progress=False, batch=250):
    """torch-fidelity's FID statistics (mean, np.cov's unbiased covariance) of every rank's uint8 NCHW `images`: each
    rank sums its features and their outer products in float64; the ranks all_reduce the sums, never the images."""
    n, s1, s2 = (torch.zeros((extractor.dim,) * k, dtype=torch.float64, device=env.device) for k in range(3))
    n += len(images)
    with torch.no_grad():
        for i in progress_bar(range(0, len(images), batch), "FID features", progress):
            f = extractor.fn(images[i:i + batch].contiguous().to(env.device)).double()
            s1 += f.sum(0)
            s2 += f.T @ f
    if env.ddp:
        for total in (n, s1, s2):
            dist.all_reduce(total)
    mu = s1 / n
    return dict(mu=mu.cpu().numpy(), sigma=((s2 - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy())


def fid_reference(images, data_dir, env):
    """(statistics, count) of the training images (uint8 NCHW; statistics on rank 0 only), computed by every rank once
    and cached next to them, keyed by a hash of the images and the extractor, for --fid-every and later --fid calls."""
    extractor = fid_feature_extractor(env.device)
    key = hashlib.sha256(images.cpu().numpy().tobytes() + extractor.name.encode()).hexdigest() if env.master else ""
    path = os.path.join(data_dir, f"fid_reference_{key[:16]}.npz")
    cached = torch.tensor(float(env.master and os.path.isfile(path)), device=env.device)
    if env.ddp:   # rank 0's cache decides for every rank: computing the statistics is collective
        dist.broadcast(cached, 0)
    if cached.item():   # only rank 0 needs them: it computes the FID
        return (dict(np.load(path)) if env.master else None), len(images)
    env.say(f"FID: features of the {len(images)} training images, once (then cached in {path})")
    stats = fid_statistics(images[env.rank::env.world], extractor, env, progress=env.master)
    if env.master:
        try:
            write_atomically(path, lambda f: np.savez(f, **stats))
        except OSError as e:
            env.say(f"FID: could not cache the reference statistics in {path} ({e}); computing them each time")
    return stats, len(images)


def fid_of(model, args, env, reference, name, autocast=nullcontext()):
    """({fid_<sampler>_<steps>step: FID, fid_protocol: text}, one line per step count) of `model` (called `name`) at
    each of --steps: every rank samples its share of --n images and extracts their features; the values are rank 0's."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    (ref, n_ref), extractor = reference, fid_feature_extractor(env.device)
    sampler, n, rec, lines = sampler_name(args.sampler, model.cfg), args.n or 50_000, {}, []
    for steps in ints(args.steps):
        env.say(f"FID: {n} samples at {steps}-step {sampler} ({env.world} process(es))")
        x = sample_images(model, n, steps, args.sampler, args.seed, rank=env.rank, world=env.world, progress=env.master,
                          autocast=autocast)
        stats = fid_statistics(x.permute(0, 3, 1, 2), extractor, env, progress=env.master)
        if env.master:
            fid = rec[f"fid_{sampler}_{steps}step"] = fid_statistics_to_metric(stats, ref, False)[KEY_METRIC_FID]
            lines.append(f"{steps}-step {sampler} FID {fid:.3f} ({name})")
    what = f"FID-{n // 1000}k" if n % 1000 == 0 else f"FID ({n} samples)"
    rec["fid_protocol"] = (f"{what}: {n} samples vs {n_ref} training images, {extractor.name}, images decoded as "
                           f"clip(x * 127.5 + 128, 0, 255) uint8")
    return rec, lines


def fid_during_training(args, env, data):
    """(every, reference statistics) for --fid-every; (0, None) with one line, never fatal, when FID cannot be had."""
    reason = "--data-dir fake has no real images to compare with" if args.data_dir == "fake" else None
    try:
        reason or env.rank0_first(lambda: fid_setup(env.say))
    except SystemExit as e:
        reason = str(e)
    ok = torch.tensor(float(reason is None), device=env.device)
    if env.ddp:   # every rank must agree: sampling for FID is collective
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item():
        return args.fid_every, fid_reference(data, args.data_dir, env)
    env.say(f"--fid-every {args.fid_every}: skipped, training goes on without it: {reason or 'another rank failed'}")
    return 0, None


# -----------------------------------------------------------------------------------------------
# 6. One optimiser step
# -----------------------------------------------------------------------------------------------

N_TIME_BINS = 8   # the loss is logged per bin of t, like minRF, to show which times learn


def train_step(model, opt, batches, cfg, *, accum, autocast, scaler=None, loss_fn=imm_loss, bins=None):
    """One optimiser step: the gradient of the loss (imm_loss: mean over groups of w MMD^2, Eq. 12; or fm_loss, one time
    per image) accumulated over this rank's micro-batches and averaged over the ranks by DDP (equal micro-batches: the
    mean over the global batch), then RAdam. `scaler`: fp16's GradScaler. `bins`, if given: [3, N_TIME_BINS], adds up
    w MMD^2, MMD^2 and the groups per bin of t. Returns the mean loss as a device tensor (no host sync)."""
    loss_sum = 0
    for a, (x, noise, times, labels) in enumerate(batches):
        sync = a == accum - 1 or not isinstance(model, DDP)
        with nullcontext() if sync else model.no_sync():   # all-reduce the gradient once, after the last micro-batch
            if loss_fn is fm_loss:
                times = Times(*(v.repeat_interleave(cfg.M) for v in times))
            with autocast:
                loss, stats = loss_fn(model, x, cfg, times=times, noise=noise, labels=labels)
            (loss / accum if scaler is None else scaler.scale(loss / accum)).backward()
        loss_sum = loss_sum + loss.detach()
        if bins is not None:
            b = ((stats["t"] - cfg.t_min) / (cfg.T - cfg.t_min) * N_TIME_BINS).long().clamp(0, N_TIME_BINS - 1)
            err = stats["mmd2"] if "mmd2" in stats else stats["mse"]
            bins.index_add_(1, b, torch.stack([stats.get("w", 1) * err, err, torch.ones_like(err)]).to(bins.dtype))
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)   # skips the step if the scaled gradient overflowed
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss_sum / accum


def flops_per_image(net_cfg, cfg, loss_fn):
    """FLOPs of one training image, counted by FlopCounterMode on a weightless meta-device copy of the model: 169.5
    GFLOPs for the CIFAR DDPM++ under IMM (a forward with gradient, a target forward, a backward), 127 under FM."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model, x = IMMModel(DDPMpp(**net_cfg), cfg), torch.zeros(cfg.M, 3, 32, 32)
    times = sample_times(1 if loss_fn is imm_loss else cfg.M, cfg, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, x, cfg, times=times, noise=torch.zeros_like(x))[0].backward()
    return counter.get_total_flops() / cfg.M


def bench(step, n, batch, world, mfu, device, say):
    """--bench: n calls of step(i) after 5 warm-up steps (compilation, cuDNN autotuning, the allocator), timed with a
    synchronised clock; on CUDA also the profiler's top kernels over 3 steps. Returns the numbers it prints."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(5):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(n):
        step(i)
    sync()
    ms = (time.perf_counter() - t0) / n * 1000
    img_s = batch / ms * 1000
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    say(f"bench: {ms:.1f} ms/step, {img_s:.0f} img/s ({img_s / world:.0f} per process, {world} process(es)) at global "
        f"batch {batch}, mfu {mfu(img_s / world):.1%}, peak memory {mem:.1f} GB")
    if device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(i)
            sync()
        say("bench: top kernels over 3 steps\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=10))
    return dict(ms=ms, img_s=img_s, mfu=mfu(img_s / world), mem_gb=mem)


def progress(step, n_steps, loss, bins, seconds, args, cfg, world, mfu, device):
    """(log.jsonl record, console line) of one log interval: loss, speed, memory, and the loss per bin of t."""
    img_s = n_steps * args.batch / seconds
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    per_bin = [[v if n else None for v, n in zip(row, bins[2].tolist())]   # None: no group fell in the bin
               for row in (bins[:2] / bins[2].clamp_min(1)).tolist()]
    rec = dict(step=step, kimg=step * args.batch / 1000, loss=loss, img_s=img_s, img_s_gpu=img_s / world,
               mfu=mfu(img_s / world), mem_gb=mem, eta_h=(args.max_steps - step) * seconds / n_steps / 3600,
               t_bin_edges=[cfg.t_min + (cfg.T - cfg.t_min) * i / N_TIME_BINS for i in range(N_TIME_BINS + 1)],
               loss_per_t_bin=per_bin[0], mmd2_per_t_bin=per_bin[1], groups_per_t_bin=bins[2].tolist())
    line = (f"step {step} | kimg {rec['kimg']:.1f} | loss {loss:.4e} | w*mmd2 by t "
            f"[{' '.join('-' if v is None else f'{v:.1e}' for v in per_bin[0])}] | {img_s:.0f} img/s "
            f"({img_s / world:.0f}/gpu) | mfu {rec['mfu']:.1%} | mem {mem:.1f} GB | eta {rec['eta_h']:.1f} h")
    return rec, line


# -----------------------------------------------------------------------------------------------
# 7. --sample and --fid
# -----------------------------------------------------------------------------------------------

def evaluate(args, env):
    """--sample: a grid per step count, and with --n the samples as npz; --fid: the FID per step count. Every rank
    samples its share of the batches, with the run's seed and precision unless --seed/--precision are typed."""
    if args.fid:   # check everything FID needs before drawing any sample
        env.rank0_first(lambda: fid_setup(env.say))
        data = env.rank0_first(lambda: load_dataset(args.data_dir))
    rate = args.ema[0] if args.ema else None
    model, name, out_dir, run = env.rank0_first(lambda: load_model(args.sample or args.fid, rate, env.say))
    check_sampler(args.sampler, model.cfg.f_type == "euler_fm")
    args.seed = run.get("seed", 0) if args.seed is None else args.seed
    precision = (args.precision or run.get("precision", "bf16")) if env.cuda else "fp32"   # as the run's grids and FID
    autocast, _ = precision_setup(precision, env.device.type)
    out_dir, sampler, model = args.run_dir or out_dir, sampler_name(args.sampler, model.cfg), model.to(env.device)
    if args.compile:   # the raw network: its inputs are tensors (IMMModel's float times would recompile per step)
        model.model = torch.compile(model.model.to(memory_format=torch.channels_last))
    os.makedirs(out_dir, exist_ok=True)
    if args.fid:
        rec, lines = fid_of(model, args, env, fid_reference(data, args.data_dir, env), name, autocast)
        if env.master:
            lines = [f"{line}  [{rec['fid_protocol']}]" for line in lines]
            print("\n".join(lines), flush=True)
            with open(os.path.join(out_dir, "fid.txt"), "a") as f:
                f.write("\n".join(lines) + "\n")
    for steps in ints(args.steps) if args.sample else ():
        n, stem = args.n or 64, os.path.join(out_dir, f"samples_{name}_{sampler}_{steps}step")
        env.say(f"sampling {n} images at {steps}-step {sampler} ({env.world} process(es))")
        t0 = time.time()
        x = gather_images(sample_images(model, n, steps, args.sampler, args.seed, rank=env.rank, world=env.world,
                                        progress=env.master, autocast=autocast), n, env)
        seconds = time.time() - t0
        if env.master:   # the grid shows the first 64 samples; the npz layout is what ADM's evaluator suite reads
            save_image_grid(x[:64], stem + ".png")
            if args.n:
                write_atomically(f"{stem}_{n}.npz", lambda f: np.savez(f, arr_0=x.numpy()))
            env.say(f"wrote {stem}.png" + f" and {stem}_{n}.npz" * bool(args.n) +
                    f" (sampled in {seconds:.1f} s, {n / seconds:,.0f} img/s)")
    env.close()


# -----------------------------------------------------------------------------------------------
# 8. Main: set-up, then the training loop
# -----------------------------------------------------------------------------------------------

def main(argv=None):
    # Config: the command line, or a resumed run's checkpoint with the options typed again (parse_args)
    args, ckpt, ckpt_path, changed, note = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_rank, batch_gpu = check_args(args, world)
    env = Env()
    if args.sample or args.fid:
        return evaluate(args, env)
    device, say = env.device, env.say
    net_cfg, accum = net_kwargs(args), per_rank // batch_gpu
    cfg = IMMConfig.cifar(M=args.M, k=args.k, min_gap=args.min_gap, temb=args.temb,
                          f_type="euler_fm" if args.loss == "fm" else "simple_edm")
    loss_fn = fm_loss if args.loss == "fm" else imm_loss
    if ckpt and (ckpt["net"] != net_cfg or ckpt["imm"] != asdict(cfg)):
        env.stop(f"{ckpt_path} was written by another version of train_cifar.py (its network or IMM settings do not "
                 f"follow from its options): resume it with that version")

    # Data: rank 0 downloads if needed while the others wait; the whole set lives on the device as uint8
    if args.data_dir == "fake" or args.bench:
        data = torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        data = env.rank0_first(lambda: load_dataset(args.data_dir))
    data = data.to(device)

    # The run folder (section 1), before the model is built: rank 0 opens it; its name and verdict reach every rank
    shared = [args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")), ""]
    if env.master and not args.bench:
        try:
            env.lock = open_run_dir(shared[0], args, ckpt["step"] if ckpt else 0)
        except SystemExit as e:
            shared[1] = e.code
    if env.ddp:
        dist.broadcast_object_list(shared, src=0)
    run_dir, ckpt_file = shared[0], os.path.join(shared[0], "ckpt.pt")
    if shared[1]:
        env.stop(shared[1])

    # Model, EMAs and optimiser: fp32 master weights; the target pass uses the live weights (Sec. 4.1, stop-gradient)
    torch.manual_seed(args.seed)
    raw_model = IMMModel(DDPMpp(**net_cfg), cfg).to(device).train()
    emas = {rate: copy.deepcopy(raw_model).eval().requires_grad_(False) for rate in args.ema}
    opt = torch.optim.RAdam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    precision = args.precision if env.cuda else "fp32"
    autocast, scaler = precision_setup(precision, device.type)
    step = ckpt["step"] if ckpt else 0
    if ckpt:   # its live weights, EMAs, optimiser and fp16 loss scale
        raw_model.load_state_dict(ckpt["model"])
        for rate, ema in emas.items():
            ema.load_state_dict(ckpt["ema"][f"{rate:g}"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        say(f"resumed from {ckpt_path} at step {step}" + f" ({note})" * bool(note) + "".join(
            f"; --{k.replace('_', '-')} {shown(new)} (was {shown(old)})" for k, old, new in changed))
    elif args.resume:
        say(f"no checkpoint in {run_dir} yet: starting from step 0")
    compile_ = env.cuda if args.compile is None else args.compile
    if compile_:   # NHWC: no layout transposes around cuDNN's convolutions (eager mode is slower with it)
        for m in (raw_model, *emas.values()):
            m.to(memory_format=torch.channels_last)
    model = torch.compile(raw_model) if compile_ else raw_model
    model = DDP(model, device_ids=[env.local_rank] if env.cuda else None) if env.ddp else model
    flops_img = flops_per_image(net_cfg, cfg, loss_fn)
    mfu = lambda img_s_gpu: flops_img * img_s_gpu / (PEAK_TFLOPS[precision] * 1e12)   # noqa: E731
    say(f"run {run_dir}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, {world} process(es) on "
        f"{device.type}, batch {args.batch} = {world} x {accum} x {batch_gpu}, loss {args.loss}, {precision}, min gap "
        f"{cfg.min_gap:g}, temb {cfg.temb}, augment {args.augment:g}{', compiled, channels_last' * compile_}, "
        f"{flops_img / 1e9:.2f} GFLOPs/img, {len(data)} images, steps {step} -> {args.max_steps}")

    def train(step, bins=None):   # one step: the loss over this rank's micro-batches, RAdam
        try:   # the draws are identical on every rank, which takes its slice of them
            draws = global_batch(step, args.seed, len(data), args.batch, cfg, args.augment, device)
            batches = micro_batches(data, draws, env.rank * per_rank, batch_gpu, accum, cfg.M, args.augment > 0)
            return train_step(model, opt, batches, cfg, accum=accum, autocast=autocast, scaler=scaler,
                              loss_fn=loss_fn, bins=bins)
        except RuntimeError as e:   # CUDA's OutOfMemoryError, or the CPU allocator's
            if not (isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            env.stop(f"out of memory with a micro-batch of {batch_gpu} images on {device}: use --batch-gpu "
                     f"{max(cfg.M, batch_gpu // 2 // cfg.M * cfg.M)} (gradient accumulation), a GPU, or --tiny")

    if args.bench:
        bench(train, args.bench, args.batch, world, mfu, device, say)
        return env.close()
    fid_every, reference = fid_during_training(args, env, data) if args.fid_every else (0, None)

    def halt(why, resume=False):   # one line; the last good checkpoint stays (a non-finite step would come again)
        env.stop(f"{why}: training stopped; the last good checkpoint is {last_good or 'none (none was written yet)'}" +
                 f"; continue with --resume {run_dir} once it can be written there" * resume)

    def log(rec, text):   # to the console and log.jsonl
        say(text)
        if env.master:
            try:
                with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:   # what it wrote of the line is cut on resume
                halt(write_failed(run_dir, e), resume=True)

    # Training loop
    loss_sum, n_steps, t_last, last_good = torch.zeros((), device=device), 0, time.time(), ckpt_path if ckpt else None
    slowest, stop, pending = max(emas), 0, []   # slowest: the EMA of grids and FID; stop: a signal's number
    bins = torch.zeros(3, N_TIME_BINS, dtype=torch.float64, device=device)
    with StopSignals() as signals:   # Ctrl-C and SIGTERM end the loop after a step, with a checkpoint
        while step < args.max_steps and not stop:
            torch.manual_seed(step_seed(args.seed, step, 1 + env.rank))   # this rank's dropout masks for this step
            loss_sum += train(step, bins)
            for rate, ema in emas.items():   # each EMA warms up: decay min(rate, (1 + n) / (10 + n)) at step n
                ema_update(ema, raw_model, min(rate, (1 + step) / (10 + step)))
            step, n_steps, stop = step + 1, n_steps + 1, signals.agreed(env, pending)
            at_ckpt = step == args.max_steps or step % args.ckpt_every == 0 or stop
            if step % args.log_every == 0 or at_ckpt:   # a sync: sum the ranks' losses, check them, print and log
                if env.ddp:
                    dist.all_reduce(loss_sum)
                    dist.all_reduce(bins)
                loss = loss_sum.item() / (n_steps * world)
                if not math.isfinite(loss):
                    halt(f"loss is {loss} within steps {step - n_steps + 1}..{step}")
                log(*progress(step, n_steps, loss, bins, time.time() - t_last, args, cfg, world, mfu, device))
                loss_sum, n_steps, t_last = torch.zeros((), device=device), 0, time.time()
                bins.zero_()
            t_eval = time.time()   # checkpoints, grids and FID are not training: keep them out of img/s, mfu, eta
            if at_ckpt:   # a finite loss with non-finite weights (an inf gradient) must not overwrite a good file
                if not all(p.isfinite().all() for p in raw_model.parameters()):   # same on every rank
                    halt(f"weights became non-finite by step {step} (not saved)")
                if env.master:   # grids first: a kill before the checkpoint is in place draws them again on resume
                    state = dict(step=step, model=raw_model.state_dict(), optimizer=opt.state_dict(),
                                 ema={f"{r:g}": e.state_dict() for r, e in emas.items()}, net=net_cfg, imm=asdict(cfg),
                                 scaler=scaler.state_dict() if scaler else None, args=vars(args))
                    try:   # the checkpoint before stays as ckpt.prev.pt if it is known good (not one we fell back from)
                        save_grids(emas[slowest], run_dir, f"_{step:07d}_ema{slowest:g}", ints(args.steps),
                                   args.sampler, args.seed, autocast)
                        write_atomically(ckpt_file, lambda f: torch.save(state, f),
                                         os.path.join(run_dir, "ckpt.prev.pt") if last_good == ckpt_file else None)
                    except OSError as e:
                        halt(write_failed(run_dir, e), resume=True)
                last_good = ckpt_file
            if fid_every and step % fid_every == 0:
                rec, lines = fid_of(emas[slowest], args, env, reference, f"ema{slowest:g}", autocast)
                log(dict(step=step, fid_model=f"ema{slowest:g}", **rec),
                    "\n".join(f"step {step} | {line}" for line in lines))
            t_last += time.time() - t_eval
    env.close()
    if stop and step < args.max_steps:   # a stop during the last step finishes the run
        say(f"stopped at step {step} by {signal.Signals(stop).name}; checkpoint {last_good}; continue with "
            f"--resume {run_dir}")
        raise SystemExit(128 + stop)
    say(f"done: {step} steps, checkpoint {last_good}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:   # our one-line errors: printed once (by rank 0 under torchrun), every rank exits with 1
        if not isinstance(e.code, str):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(e.code, file=sys.stderr, flush=True)
        sys.exit(1)
