"""Train the DDPM++ IMM model on CIFAR-10 (paper Table 5, App. I.1; the README says where we differ),
then look at it (--sample) and measure it (--fid).

  python train_cifar.py                                   # one process, GPU or CPU
  torchrun --nproc_per_node=8 train_cifar.py              # DDP on 8 GPUs (several nodes: torchrun's rendezvous)
  python train_cifar.py --sample --ckpt runs/X/ckpt.pt    # 1- and 2-step grids of the EMA model
  torchrun --nproc_per_node=8 train_cifar.py --fid --official   # FID-50k of the released checkpoint

Randomness: every random choice of step n (data indices, flips and augmentations, times, noise) is drawn from a
generator
seeded by (seed, n), identically on every rank, and each rank takes its slice of the global batch. So a
checkpoint needs no RNG state, resuming is exact, and 1 or N GPUs with the same global batch optimise the
same loss up to float rounding. Dropout masks are seeded by (seed, n, rank): with dropout > 0, runs on
different numbers of GPUs draw different (equally valid) masks.
"""
import argparse
import collections
import copy
import datetime
import functools
import glob
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import time
import traceback
import urllib.parse
import urllib.request
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from imm import (ArgParser, DDPMpp, IMMConfig, IMMModel, Times, ema_update, fm_loss, imm_loss, int_at_least,
                 prior_sample, pushforward_sample, sample_times, timesteps)

# -----------------------------------------------------------------------------------------------
# Config: the paper's CIFAR-10 recipe as defaults; every value can be changed from the command line
# -----------------------------------------------------------------------------------------------

OFFICIAL_CIFAR10_URL = "https://huggingface.co/lumaai/imm/resolve/main/cifar10.pt"   # the released EMA model

# Precision policy (README "Precision"). The target y_r = f_{s,r}(x_r) differs from the online y_t = f_{s,t}(x_t)
# only through t - r, which near T is ~2e-7 (App. C.6, k = 15), and the Laplace kernel's gradient is the unit vector
# along y_r - y_t, so that difference must leave the network with its direction intact. Relative error of y_t - y_r
# against float64 (H200, compiled): bf16 2.2 at t = 0.9 and 600 at T; TF32 (the paper's) 0.75 at 0.95 and 42 at T;
# with the minimum gap of App. I.6, t - r >= 1e-3, bf16 stays at or below 0.11 for every t. On real images bf16 without
# a gap did not learn the 1-step map in 3,000 (small net) or 5,000 (full) steps; with the 1e-3 gap it matched TF32.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # mode -> autocast dtype
DEFAULT_PRECISION, DEFAULT_MIN_GAP, DEFAULT_TEMB = "bf16", 1e-3, "stride"


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):   # show defaults, except empty ones
    def _get_help_string(self, action):
        return action.help if action.default in ("", None, False) else super()._get_help_string(action)


def float_in(lo, hi, hi_open=True):
    """argparse type: a float in [lo, hi) (or [lo, hi])."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        if not (lo <= value and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}{')' if hi_open else ']'}, got {text}")
        return value
    return parse


def int_list(allow_empty):
    """argparse type: comma-separated positive integers such as '2,2,2'."""
    def parse(text):
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = None
        if values is None or any(v < 1 for v in values) or not (values or allow_empty):
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 2,2,2, got {text!r}")
        return ",".join(map(str, values))
    return parse


# --tiny: a network and batch that train on a laptop CPU (about 0.9M parameters); options given explicitly win
TINY_PRESET = dict(channels=32, channel_mult="1,2", num_blocks=1, attn="16", batch=32, n_grid=16, ckpt_every=100,
                   grid_every=100, log_every=10)
# options that describe how this process runs, not the run itself: a resumed run takes them from the command line
RUNTIME_OPTIONS = {"sample", "fid", "resume", "run_dir", "device", "compile", "compile_mode", "compile_ddp",
                   "channels_last", "bench",
                   "ckpt", "official", "fid_n", "fid_batch", "download"}


# what an option absent from an older checkpoint's saved options meant then
LEGACY_OPTIONS = {"augment": 0.0, "ema_warmup": False, "loss": "imm"}


def get_parser():
    p = ArgParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    pos, nonneg = int_at_least(1), int_at_least(0)
    # what to do (default: train)
    a("--sample", action="store_true", help="write 1- and 2-step EMA sample grids of --ckpt or --official, then exit")
    a("--fid", action="store_true", help="FID of 1- and 2-step EMA samples vs CIFAR-10 train, then exit")
    # data
    a("--data-dir", default="./data",
      help="CIFAR-10 root (holds cifar-10-batches-py), that folder itself, or a folder of 32x32 images")
    a("--download", action=argparse.BooleanOptionalAction, default=True,
      help="download CIFAR-10 into --data-dir if that folder is new or empty")
    a("--fake-data", action="store_true", help="random images instead of a dataset: smoke tests and benchmarks only")
    a("--xflip", action=argparse.BooleanOptionalAction, default=True,
      help="random horizontal flips, unlabelled (with --augment > 0 the augmentations' labelled x-flips replace them)")
    a("--augment", type=float_in(0, 1, hi_open=False), default=0.12,
      help="EDM augmentation probability (the paper's CIFAR-10 recipe, Table 5), with the 9 augmentation labels fed to "
           "the network; 0 turns it off")
    # network: DDPM++ (paper App. I.1); small values give the tiny networks of the tests
    a("--tiny", action="store_true", help="a tiny network and batch for a CPU smoke run: " +
      " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TINY_PRESET.items()) + " (explicit options win)")
    a("--channels", type=pos, default=128, help="DDPM++ base channels (model_channels)")
    a("--channel-mult", type=int_list(False), default="2,2,2",
      help="channel multiplier per resolution, comma separated")
    a("--num-blocks", type=pos, default=4, help="residual blocks per resolution")
    a("--attn", type=int_list(True), default="16",
      help="resolutions with self-attention, comma separated ('' for none)")
    a("--dropout", type=float_in(0, 1), default=0.2, help="dropout inside the residual blocks")
    # IMM (other settings are imm.IMMConfig's CIFAR defaults)
    a("--loss", choices=["imm", "fm"], default="imm",
      help="imm (Eq. 12), or the flow-matching baseline on the same network (euler_fm f-type; sample with many steps)")
    a("--M", type=pos, default=4, help="particles per group of the MMD estimate; micro-batches are multiples of it")
    a("--k", type=nonneg, default=15, help="r(s,t) step: delta eta = (eta(T) - eta(t_min)) / 2^k")
    a("--min-gap", type=float_in(0, 0.5), default=DEFAULT_MIN_GAP,
      help="App. I.6: keep t - r >= this (0 = the paper's CIFAR recipe); low precision cannot resolve smaller gaps")
    a("--temb", choices=["identity", "stride"], default=DEFAULT_TEMB,
      help="second time input of the network: s (identity, the released CIFAR model) or t - s (stride, App. I.6)")
    # optimisation
    a("--batch", type=pos, default=4096, help="global batch, split evenly over the processes")
    a("--batch-gpu", type=nonneg, default=0,
      help="micro-batch per process (0 = batch / processes); smaller means gradient accumulation")
    a("--lr", type=float_in(0, 1), default=1e-4, help="RAdam learning rate (constant after warmup)")
    a("--warmup-kimg", type=float_in(0, math.inf), default=0,
      help="linear LR warmup over this many thousand images (0 = none)")
    a("--ema", type=float_in(0, 1), default=0.9999,
      help="EMA decay per optimiser step (the EMA is used for samples only)")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
      help="EMA decay min(--ema, (1 + n) / (10 + n)) at step n, so short runs have a useful EMA")
    a("--max-steps", type=pos, default=400_000, help="stop after this many optimiser steps")
    a("--max-kimg", type=float_in(0, math.inf), default=0,
      help="also stop after this many thousand images (0 = no limit)")
    a("--precision", choices=list(PRECISIONS), default=DEFAULT_PRECISION,
      help="network arithmetic, fp32 master weights always: fp32 (strict), tf32 (fp32 with TF32 tensor cores, the "
           "paper's), bf16 or fp16 autocast (fp16 with loss scaling). CPU: always fp32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the model (default: on with CUDA, off on CPU; the first steps then take ~3 min)")
    a("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune",
                                                     "max-autotune-no-cudagraphs"], help="torch.compile mode")
    a("--compile-ddp", action=argparse.BooleanOptionalAction, default=False,
      help="with DDP, compile the DDP-wrapped model, so that DDPOptimizer splits the graph at the gradient buckets "
           "and the all-reduce can overlap the backward (off until measured on several GPUs)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None,
      help="NHWC memory layout: no layout transposes around cuDNN's convolutions (default: on when compiling; "
           "eager mode is slower with it)")
    a("--bench", type=nonneg, default=0, metavar="N", help="time N training steps on fake data after warm-up, print "
      "img/s, ms/step, MFU, memory and where the time goes (forward, target forward, backward, optimiser), then exit; "
      "writes no run folder")
    a("--seed", type=int, default=0, help="seed of the initialisation and of all random draws")
    a("--device", default="auto", choices=["auto", "cuda", "cpu"],
      help="auto: cuda:LOCAL_RANK if there is a GPU, else cpu")
    # logging and checkpoints
    a("--run-dir", default="",
      help="folder for logs, grids and checkpoints (default: runs/<date-time>, or the resumed run's folder); "
           "a folder that already holds a run is only continued with --resume")
    a("--resume", default="",
      help="checkpoint file or run folder to continue from, or 'auto' (--run-dir's ckpt.pt, else the newest "
           "runs/*/ckpt.pt; none found: start afresh). The run keeps every training option of the checkpoint "
           "except those given again on the command line; its network, method and seed cannot change")
    a("--log-every", type=pos, default=100, help="print and append to log.jsonl every this many steps "
                                                 "(also checks that the loss is finite)")
    a("--ckpt-every", type=nonneg, default=10_000, help="write ckpt.pt every this many steps (0 = only at the end)")
    a("--grid-every", type=nonneg, default=10_000, help="save 1- and 2-step EMA sample grids this often (0 = never)")
    a("--dump-every", type=nonneg, default=0, help="write --dump-n 1- and 2-step samples of the live and EMA weights "
      "as uint8 NHWC arrays in samples_<step>.npz this often, for offline scoring (0 = never)")
    a("--dump-n", type=pos, default=5000, help="samples per array in --dump-every")
    a("--fid-every", type=nonneg, default=0, help="FID of the EMA at 1 and 2 steps every this many steps, with "
      "--fid-every-n samples against the training images, to log.jsonl and the console (0 = never)")
    a("--fid-every-n", type=pos, default=10_000, help="samples per FID in --fid-every")
    a("--peak-tflops", type=float_in(0, math.inf), default=0,
      help="peak TFLOP/s per GPU for MFU; 0 = H100 SXM dense: 989 for bf16/fp16, 494 for TF32, 67 for fp32")
    # evaluation
    a("--ckpt", default="", help="checkpoint for --sample/--fid (default: --resume)")
    a("--official", nargs="?", const=OFFICIAL_CIFAR10_URL, default=None, metavar="PATH|URL",
      help="use the official released checkpoint for --sample/--fid (no value: download it)")
    a("--n-grid", type=pos, default=64, help="images per sample grid")
    a("--fid-n", type=pos, default=50_000, help="generated images per FID")
    a("--fid-batch", type=pos, default=500, help="images per sampling batch in --fid (each seeded by its index)")
    return p


def option(dest):
    return "--" + dest.replace("_", "-")


def parse_args(argv=None):
    """(args, given): the parsed options with the --tiny preset applied, and the options given on the command line."""
    args = get_parser().parse_args(argv)
    probe = get_parser()   # the same parser with every default suppressed: it returns only what was typed
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = vars(probe.parse_args(argv))
    if args.tiny:
        for k, v in TINY_PRESET.items():
            if k not in given:
                setattr(args, k, v)
    return args, given


def resumed_options(args, given, ckpt):
    """A resumed run's options: the checkpoint's, except runtime options and those given again on the command line.
    Returns (args, overridden: [(name, old, new)]). A given option that changes the network, the method or the seed
    is refused: the weights, the optimiser state and the step's random draws depend on them."""
    saved = ckpt["args"]
    merged = argparse.Namespace(**{k: saved[k] if k in saved and k not in given and k not in RUNTIME_OPTIONS else v
                                   for k, v in vars(args).items()})
    for k, v in LEGACY_OPTIONS.items():   # checkpoints from before an option existed ran without it
        if k not in saved and k not in given:
            setattr(merged, k, v)
    fixed = [k for k in ("channels", "channel_mult", "num_blocks", "attn", "dropout", "augment") if k in given
             and net_kwargs(merged) != {"augment_dim": 0, **ckpt["net"]}]
    fixed += [k for k in ("M", "k", "min_gap", "temb") if k in given and given[k] != ckpt["imm"][k]]
    fixed += [k for k, old in (("loss", saved.get("loss", "imm")), ("seed", saved["seed"]))
              if k in given and given[k] != old]
    if fixed:
        names = ", ".join(f"{option(k)} {given[k]}" for k in fixed)
        raise SystemExit(f"cannot resume with {names}: a resumed run keeps its network, method and seed; start a new "
                         f"--run-dir to change them")
    overridden = [(k, saved[k], v) for k, v in given.items()
                  if k in saved and k not in RUNTIME_OPTIONS and saved[k] != v]
    return merged, overridden


def check_args(args, world):
    """Impossible combinations end the run here, before any data or model is touched (ranges are argparse's)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but PyTorch sees no CUDA GPU here: use --device cpu (or auto)")
    if args.sample or args.fid:
        if args.sample and args.fid:
            raise SystemExit("choose one of --sample and --fid")
        if not (args.official or args.ckpt or args.resume):
            raise SystemExit("--sample and --fid need a model: --ckpt PATH or --official [PATH|URL]")
        if args.fid and args.fake_data:
            raise SystemExit("--fid compares with real CIFAR-10 and cannot use --fake-data")
        return None, None
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


def net_kwargs(args):
    ints = lambda s: tuple(int(v) for v in s.split(",") if v.strip())
    return dict(model_channels=args.channels, channel_mult=ints(args.channel_mult), num_blocks=args.num_blocks,
                attn_resolutions=ints(args.attn), dropout=args.dropout, augment_dim=AUGMENT_DIM if args.augment else 0)


def step_seed(seed, step, slot=0):
    """Seed of step `step`'s random draws. Slot 0: the data, times and noise shared by all ranks;
    slot 1 + rank: that rank's dropout masks."""
    return (seed * 1_000_003 + step) * 65_536 + slot


# -----------------------------------------------------------------------------------------------
# Data: the whole training set as one uint8 tensor [N, 3, 32, 32]; batches index it on the device
# -----------------------------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `allowed` ({(module, name): object, None = the real one}); every other global goes
    to `unknown`, which refuses it. Both files we unpickle (CIFAR-10 batches, the official checkpoint) use it."""
    allowed = {}

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            return self.unknown(module, name)
        return self.allowed[module, name] or super().find_class(module, name)

    def unknown(self, module, name):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


class CifarUnpickler(RestrictedUnpickler):
    """CIFAR-10 batches hold only dicts, lists, bytes and numpy arrays: any other global is refused,
    so a tampered file cannot run code."""
    allowed = dict.fromkeys([("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                             ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                             ("numpy._core.multiarray", "scalar")])

    def unknown(self, module, name):
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} (a CIFAR-10 batch holds only arrays)")


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


def load_image_folder(paths):
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


def load_dataset(data_dir, download=True):
    """CIFAR-10 train in the python format (downloaded with torchvision if absent) or a folder of 32x32 images
    (flat or one subfolder per class; labels are ignored: the model is unconditional)."""
    for folder in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        if os.path.isfile(os.path.join(folder, "data_batch_1")):
            return load_cifar_python(folder)
    images = sorted(os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files
                    if f.lower().endswith(IMAGE_EXTS))
    if images:
        return load_image_folder(images)
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    empty = not os.path.isdir(data_dir) or not os.listdir(data_dir)
    if (download and empty) or os.path.isfile(archive):
        import torchvision
        created = not os.path.exists(data_dir)
        try:
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            if created:   # a mistyped path must not leave a folder behind
                shutil.rmtree(data_dir, ignore_errors=True)
            raise SystemExit(f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); on a machine "
                             f"without internet, place cifar-10-python.tar.gz or the extracted cifar-10-batches-py "
                             f"folder there")
        return load_cifar_python(os.path.join(data_dir, "cifar-10-batches-py"))
    raise SystemExit(f"no training data in {data_dir!r}: expected CIFAR-10 in the python format "
                     f"({os.path.join(data_dir, 'cifar-10-batches-py')}/data_batch_1..5) or a folder of 32x32 images; "
                     f"pass --data-dir, or an empty/new folder with --download on a machine with internet")


# EDM's augmentation (Karras et al. 2022, App. F.2), which the paper's CIFAR-10 recipe uses (Table 5), in EDM's CIFAR-10
# setting (augment.py with xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1). Each transform is
# applied to an image with probability p, the x-flip to every image with probability 1/2, and the network sees the 9
# numbers that describe what was done. It samples with zeros, i.e. un-augmented images: the augmentations do not leak.
AUGMENT_DIM = 9   # x-flip, y-flip, log2 scale / 0.2, rotation (cos - 1, sin), anisotropy (w cos r, w sin r), shift


def augment_params(n, p, g):
    """EDM's random choices for n images from the CPU generator g: a dict of [n] tensors, all zero where a transform
    is not applied (so p = 0 gives the identity)."""
    def gate(prob, v):
        return torch.where(torch.rand(v.shape[-1], generator=g) < prob, v, torch.zeros_like(v))
    params = dict(xflip=gate(min(1.0, 1e8 * p), torch.randint(2, (n,), generator=g).double()),
                  yflip=gate(p, torch.randint(2, (n,), generator=g).double()),
                  scale=gate(p, torch.randn(n, generator=g, dtype=torch.float64)),
                  rotate=gate(p, (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi),
                  aniso=gate(p, torch.randn(n, generator=g, dtype=torch.float64)),
                  aniso_angle=gate(0.5, (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi),
                  translate=gate(p, torch.randn(2, n, generator=g, dtype=torch.float64)))
    # the axis of an anisotropy that is not applied is irrelevant: zero it, so untouched images stay exactly untouched
    params["aniso_angle"] = torch.where(params["aniso"] != 0, params["aniso_angle"], 0.0)
    return params


def augment_labels(params):
    """The [n, 9] augmentation labels of EDM's pipe for these parameters (what the network is conditioned on)."""
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
    """Apply the augmentations `params` (one entry per image, on x's device) to images x [n, C, H, W]: flips as pixel
    blits, the rest as one bicubic resampling with reflection at the borders. Images with no geometric transform are
    returned untouched; the batch order is kept (every particle keeps its image)."""
    x = torch.where(params["xflip"][:, None, None, None] > 0, x.flip(3), x)
    x = torch.where(params["yflip"][:, None, None, None] > 0, x.flip(2), x)
    G = augment_matrix(params, x.shape[-1])
    moved = (G - torch.eye(3, dtype=G.dtype, device=G.device)).abs().flatten(1).amax(1) > 0
    # pixel coordinates centred on the image, times 2 / size, are grid_sample's coordinates (align_corners=False)
    theta = G[:, :2].clone()
    theta[:, :, 2] *= 2 / x.shape[-1]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return torch.where(moved[:, None, None, None], warped, x)


def global_batch(step, seed, n_data, batch, cfg, xflip, device, img_shape=(3, 32, 32), augment_p=0.0):
    """Step `step`'s random draws for the whole global batch, identical on every rank: data indices (uniform,
    with replacement), x-flips (unlabelled; with augment_p > 0 the augmentations' own, labelled ones replace them), one
    (t, r, s) per group of M, the augmentations, and the noise (on the device: cheap even for 4096)."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    idx = torch.randint(n_data, (batch,), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5 if xflip and not augment_p else torch.zeros(batch, dtype=torch.bool)
    times = sample_times(batch // cfg.M, cfg, generator=g)
    aug = augment_params(batch, augment_p, g) if augment_p else None
    g_dev = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    noise = torch.randn(batch, *img_shape, generator=g_dev, device=device) * cfg.sigma_d
    # non_blocking: a blocking host-to-GPU copy waits for all queued GPU work, a host sync in every step
    to_device = lambda v: v.to(device, non_blocking=True)   # noqa: E731
    aug = {k: to_device(v) for k, v in aug.items()} if aug else None
    return to_device(idx), to_device(flip), Times(*map(to_device, times)), noise, aug


def micro_batches(data, draws, lo, batch_gpu, accum, M):
    """This rank's `accum` micro-batches, global positions lo .. lo + accum * batch_gpu, as (x, noise, times, labels)
    with x in [-1, 1] (x / 127.5 - 1, as the official code decodes) and the augmentation labels (None without)."""
    idx, flip, times, noise, aug = draws
    for a in range(accum):
        sl = slice(lo + a * batch_gpu, lo + (a + 1) * batch_gpu)
        x = data[idx[sl]].float() / 127.5 - 1      # idx, flip and times are already on data's device
        x = torch.where(flip[sl][:, None, None, None], x.flip(3), x)
        labels = None
        if aug is not None:
            params = {k: v[..., sl] for k, v in aug.items()}
            x, labels = augment(x, params), augment_labels(params)
        yield x, noise[sl], Times(*(v[sl.start // M: sl.stop // M] for v in times)), labels


# -----------------------------------------------------------------------------------------------
# One optimiser step (a function so that it can be timed on its own)
# -----------------------------------------------------------------------------------------------

N_TIME_BINS = 8   # the loss is logged per bin of t, like minRF, to show which times learn


def train_step(model, raw_model, ema, opt, batches, ema_decay, *, cfg, accum, autocast, scaler=None, loss_fn=imm_loss,
               bins=None):
    """One optimiser step: accumulate the gradient of mean_groups w * MMD^2 (Eq. 12) over the micro-batches (DDP
    averages the ranks: equal-sized micro-batches make this the mean over all groups of the global batch), then RAdam
    and the EMA. `scaler`: fp16's GradScaler. `loss_fn`: imm_loss, or fm_loss for the flow-matching baseline (one time
    per image). `bins`, if given, a [3, N_TIME_BINS] tensor that accumulates sum w MMD^2, sum MMD^2 and the group
    count per bin of t. Returns the mean loss as a device tensor (no host sync)."""
    loss_sum, ddp = 0, getattr(model, "_orig_mod", model)   # DDP itself, also when it is compiled (--compile-ddp)
    for a, (x, noise, times, labels) in enumerate(batches):
        last = a == accum - 1 or not isinstance(ddp, DDP)
        with nullcontext() if last else ddp.no_sync():   # all-reduce the gradient once, after the last micro-batch
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
    ema_update(ema, raw_model, ema_decay)
    return loss_sum / accum


def mfu(flops_img, img_s_per_gpu, peak_flops):
    """Model FLOPs utilisation: the FLOPs the step needs (flops_per_image) per second, over the GPU's peak."""
    return flops_img * img_s_per_gpu / peak_flops


class WallClockEvent:
    """torch.cuda.Event's record / elapsed_time for the CPU, where every op finishes before the next starts."""
    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000


PHASES = ("online_forward", "target_forward", "mmd_and_backward", "optimiser_and_ema", "other")


def phase_times(step, model, opt, device):
    """Milliseconds (GPU time on CUDA) of each phase of one call of step(), marked from outside the step by hooks:
    the outermost module's forwards (with gradients: online; without: target; the hooks run outside torch.compile's
    graph) and the optimiser's step. mmd_and_backward runs from the end of the target forward to the next mark;
    'other' is the rest (draws, augmentation, interpolants)."""
    cuda, marks = device.type == "cuda", []

    def mark(phase):
        event = torch.cuda.Event(enable_timing=True) if cuda else WallClockEvent()
        event.record()
        marks.append((phase, event))

    hooks = [model.register_forward_pre_hook(
                 lambda *_: mark("online_forward" if torch.is_grad_enabled() else "target_forward")),
             model.register_forward_hook(lambda *_: mark("other" if torch.is_grad_enabled() else "mmd_and_backward")),
             opt.register_step_pre_hook(lambda *_: mark("optimiser_and_ema"))]
    mark("other")
    try:
        step()
    finally:
        mark("end")
        for hook in hooks:
            hook.remove()
    if cuda:
        torch.cuda.synchronize()
    ms = dict.fromkeys(PHASES, 0.0)
    for (phase, start), (_, end) in zip(marks, marks[1:]):
        ms[phase] += start.elapsed_time(end)
    return ms, marks[0][1].elapsed_time(marks[-1][1])


def bench(step, model, opt, n, batch, world, flops_img, peak, device, say):
    """--bench: n calls of step(i) after 5 warm-up steps (compilation, cuDNN autotuning, allocator), timed with a
    synchronised clock; host syncs inside one step (CUDA); the time of each phase (median of 5); on CUDA the profiler's
    top kernels. Returns the numbers it prints."""
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
    out = dict(ms=ms, img_s=img_s, img_s_gpu=img_s / world, mfu=mfu(flops_img, img_s / world, peak), mem_gb=mem)
    say(f"bench: {ms:.1f} ms/step, {img_s:.0f} img/s ({img_s / world:.0f} img/s per process, {world} process(es)) at "
        f"global batch {batch}, mfu {out['mfu']:.1%}, peak memory {mem:.1f} GB")
    if device.type == "cuda":   # a host sync inside the step idles the GPU and stalls DDP's overlap
        syncs = []   # the Python stack (innermost 4 frames) where each one happened

        def record(message, *_, **__):
            if "called a synchronizing CUDA operation" in str(message):   # not the mode's own "prototype" warning
                stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in os.path.basename(f.filename)]
                syncs.append(" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack[:-5:-1]))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["host_syncs"] = len(syncs)
        say(f"bench: host syncs in one step: {len(syncs)}" + "".join(f"\n  {s}" for s in syncs[:5]))
    runs = [phase_times(lambda: step(i), model, opt, device)[0] for i in range(5)]
    out["phases_ms"] = {k: sorted(r[k] for r in runs)[2] for k in PHASES}
    say("bench: time per phase of one step (ms, median of 5): " +
        ", ".join(f"{k} {v:.1f}" for k, v in out["phases_ms"].items()))
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(i)
            sync()
        say("bench: top kernels over 3 steps\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    return out


def flops_per_image(net_cfg, cfg):
    """FLOPs of one training image (grad forward + no-grad target forward + backward, about 4 forwards), counted
    by FlopCounterMode on a weightless meta-device copy of the model: 169.5 GFLOPs for the CIFAR DDPM++."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model, x = IMMModel(DDPMpp(**net_cfg), cfg), torch.zeros(cfg.M, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        imm_loss(model, x, cfg, times=sample_times(1, cfg, device="meta"), noise=torch.zeros_like(x))[0].backward()
    return counter.get_total_flops() / cfg.M


# -----------------------------------------------------------------------------------------------
# Checkpoints: plain tensors and Python data only, so torch.load(..., weights_only=True) reads them
# -----------------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a broken ckpt.pt


CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "net", "imm", "args")


def load_checkpoint(path):
    """One of our checkpoints, read with weights_only=True; anything else ends the run with one line that names the
    file (never torch's advice to unpickle it with weights_only=False)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # random bytes, a truncated write, or a pickle that wants to run code
        raise SystemExit(f"{path} cannot be read as a checkpoint ({type(e).__name__}): the file is damaged or "
                         f"truncated; resume from another checkpoint or start a new --run-dir")
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SystemExit(f"{path} is not a train_cifar.py checkpoint (it has no {', '.join(missing)}); for the "
                         f"official CIFAR-10 model use --official")
    return ckpt


def run_files(run_dir):
    """The files that make a folder a run."""
    return [f for f in ("ckpt.pt", "log.jsonl", "args.json") if os.path.isfile(os.path.join(run_dir, f))]


def truncate_log(path, step):
    """Drop log lines past `step` (written after the checkpoint a run resumes from), atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def find_checkpoint(resume, run_dir):
    if resume == "auto":
        found = sorted(glob.glob(os.path.join(run_dir or "runs/*", "ckpt.pt")), key=os.path.getmtime)
        return found[-1] if found else None
    path = os.path.join(resume, "ckpt.pt") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise SystemExit(f"no checkpoint at {path}")
    return path


def official_model(path_or_url):
    try:
        return load_official(path_or_url)[0]
    except (OSError, ValueError, pickle.UnpicklingError) as e:   # offline, missing or not an official checkpoint
        raise SystemExit(f"cannot load the official checkpoint {path_or_url} ({type(e).__name__}: {e}); offline, "
                         f"download {OFFICIAL_CIFAR10_URL} elsewhere and pass --official PATH")


def model_from_checkpoint(ckpt, which="ema"):
    model = IMMModel(DDPMpp(**ckpt["net"]), IMMConfig(**ckpt["imm"]))
    try:
        model.load_state_dict(ckpt[which])
    except RuntimeError as e:
        raise SystemExit(f"the checkpoint's {which} weights do not fit its own network settings {ckpt['net']} "
                         f"({str(e).splitlines()[0]}); the file was edited or is damaged")
    return model


def activation_bytes_per_image(net_cfg, cfg):
    """Bytes that one training image keeps for the backward pass (eager), counted on a weightless meta-device copy."""
    saved = []
    with torch.device("meta"):
        model, x = IMMModel(DDPMpp(**net_cfg), cfg), torch.zeros(cfg.M, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        imm_loss(model, x, cfg, times=sample_times(1, cfg, device="meta"), noise=torch.zeros_like(x))
    return sum(saved) / cfg.M


def available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


# -----------------------------------------------------------------------------------------------
# The official CIFAR-10 checkpoint, read without running any of its code, and images. The released files are plain
# pickles whose classes rebuild themselves by exec()ing source text stored in the file (official torch_utils/
# persistence.py); we keep only tensors and a few scalars.
# -----------------------------------------------------------------------------------------------

# Globals that could only serve to run code. Everything else unknown becomes an inert stub, so
# this list is not what keeps loading safe; it turns an obviously malicious file into a clear error.
_DENIED_MODULES = {"builtins", "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil",
                   "socket", "ctypes", "pickle", "marshal", "code"}


class _Inert:
    """Stand-in for any class or function the checkpoint names: records arguments, runs nothing."""

    def __new__(cls, *args, **kwargs):  # REDUCE calls the stub, NEWOBJ calls only __new__
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.elements = args, kwargs, None, {}, []
        return self

    def __setstate__(self, state):      # BUILD (e.g. ModuleDict's __dict__)
        self.state = state

    def __setitem__(self, key, value):  # SETITEMS on dict subclasses (EasyDict)
        self.items[key] = value

    def append(self, value):            # APPENDS on list subclasses
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)


class _PersistentRecord:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes: the class name and
    the instance __dict__. meta['module_src'] (the class's source code) is dropped unread."""

    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name, self.state = meta.get("class_name"), meta.get("state")


def _storage_from_bytes(blob):
    # Each storage is a complete legacy (non-zip) torch.save blob; torch's weights_only unpickler
    # reads those and accepts nothing but storages and plain containers. Storages
    # saved from a GPU name 'cuda:0' as their location: map them to the CPU so no GPU is needed.
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return torch.empty(0, dtype=storage.dtype).set_(storage, offset, size, stride).clone()


def _rebuild_parameter(data, *unused):
    return data


class RefusedGlobalError(pickle.UnpicklingError):
    """The checkpoint names a global that can only serve to run code."""


class OfficialUnpickler(RestrictedUnpickler):
    """What the official checkpoint needs (tensor rebuilders, plain containers), its persistent objects as inert
    records, code-running globals refused, and any other global an inert stub."""
    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _PersistentRecord,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,            # pickle protocols < 4 spell sets this way
        ("builtins", "frozenset"): frozenset,
    }

    def unknown(self, module, name):
        if module.split(".")[0] in _DENIED_MODULES:
            raise RefusedGlobalError(f"refusing to load global {module}.{name}: it can run code, and an "
                                     f"IMM checkpoint never needs it (is this file malicious?)")
        return type(name, (_Inert,), {"__module__": "imm._inert." + module})   # a fresh class per name


def _module_state(obj):
    state = obj.state if isinstance(obj, (_PersistentRecord, _Inert)) else None
    return state if isinstance(state, dict) else {}


def _flat_state_dict(obj, prefix=""):
    """The state_dict() of a pickled module tree, read from its __dict__ records (_parameters, _buffers, _modules)."""
    state, out = _module_state(obj), {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if torch.is_tensor(tensor) and not (group == "_buffers" and name in skip):
                out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_flat_state_dict(child, prefix + name + "."))
    return out


def _download(url, cache_dir=None):
    """Fetch url into cache_dir once (temp file + rename, so an interrupted download leaves nothing)."""
    cache_dir = os.path.expanduser(cache_dir or "~/.cache/imm")
    path = os.path.join(cache_dir, os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url) as r:
                shutil.copyfileobj(r, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _official_config(state):
    """IMMConfig from the official IMMPrecond's scalars (training/preconds.py); CIFAR defaults where absent.
    Official names: sigma_data, T, eps (= t_min), f_type, temb_type, noise_schedule, time_scale;
    the values ('fm' | 'vp_cosine', 'identity' | 'stride', f-types) are spelled as in IMMConfig."""
    default = IMMConfig()

    def get(key, fallback, kind):
        v = state.get(key)
        return kind(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else fallback
    return IMMConfig(sigma_d=get("sigma_data", default.sigma_d, float), T=get("T", default.T, float),
                     t_min=get("eps", default.t_min, float), f_type=get("f_type", default.f_type, str),
                     temb=get("temb_type", default.temb, str), schedule=get("noise_schedule", default.schedule, str),
                     time_scale=get("time_scale", default.time_scale, float))


def load_official(path_or_url=OFFICIAL_CIFAR10_URL, cache_dir=None, map_location="cpu"):
    """(model, cfg) from an official IMM CIFAR-10 checkpoint: IMMModel(DDPMpp()) with the EMA weights,
    in eval mode. A URL is downloaded once into cache_dir (default ~/.cache/imm)."""
    path = _download(path_or_url, cache_dir) if "://" in str(path_or_url) else str(path_or_url)
    expected = (f"expected an official IMM CIFAR-10 checkpoint (a raw pickle of a dict with 'ema', "
                f"like {OFFICIAL_CIFAR10_URL})")
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"PK":
            raise ValueError(f"{path} is a zip archive (torch.save format), not a raw pickle; {expected}")
        if head[:1] != b"\x80":
            raise ValueError(f"{path} is not a pickle file; {expected}")
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

    cfg = _official_config(_module_state(root))
    model = IMMModel(DDPMpp(), cfg)
    found, want = _flat_state_dict(root), model.state_dict()
    missing = [k for k in want if k not in found]
    wrong = [f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}" for k, v in want.items()
             if k in found and found[k].shape != v.shape]
    if missing or wrong:
        extra = [k for k in found if k not in want]
        raise ValueError(f"{path} is not an IMM CIFAR-10 DDPM++ checkpoint: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(wrong)} shape mismatches {wrong[:5]}, {len(extra)} unexpected "
                         f"keys {extra[:5]}")
    # Extra keys (e.g. model.map_augment.weight if training fed EDM augment labels) are ignored,
    # as the official torch_utils/misc.py copy_params_and_buffers(require_all=True) does.
    model.load_state_dict({k: found[k] for k in want})
    return model.eval().to(map_location), cfg


def decode_images(x):
    """Float NCHW in about [-1, 1] -> uint8 NHWC, as the official (x * 127.5 + 128).clip(0, 255)
    cast to uint8. The +128 with truncation rounds half up: x = -1 -> 0, 0 -> 128, 1 -> 255."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_image_grid(x, path, nrow=None):
    """Write images x (float NCHW, about [-1, 1]) as one PNG, nrow images per row (default ~square)."""
    from PIL import Image
    img = decode_images(x)
    N, H, W, C = img.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    rows = math.ceil(N / nrow)
    img = torch.cat([img, img.new_zeros(rows * nrow - N, H, W, C)])   # black cells after the last image
    grid = img.reshape(rows, nrow, H, W, C).transpose(1, 2).reshape(rows * H, nrow * W, C)
    Image.fromarray(grid.squeeze(-1).numpy() if C == 1 else grid.numpy()).save(path)


def sample_images(model, n, steps=2, seed=0, generator=None, device=None, batch=500):
    """n images (float64 NCHW, about [-1, 1]) from IMMModel(DDPMpp) with the pushforward sampler and
    CIFAR-10's step lists: 1 step [T, t_min]; 2 steps [T, eta^-1(1.4), t_min] (official CIFAR config). The prior
    noise comes from `generator` (CPU) if given, else from a new one seeded with `seed`; it is moved
    to `device` (default: the model's), batch images at a time."""
    if steps not in (1, 2):
        raise ValueError(f"sample_images: steps must be 1 or 2 (CIFAR-10's lists), got {steps}; for other "
                         f"lists call timesteps() and pushforward_sample() directly")
    cfg, net = model.cfg, model.model
    device = device or next(model.parameters()).device
    ts = timesteps(steps, "eta", cfg, mid_eta=(1.4,)[:steps - 1])
    gen = generator or torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        shape = (min(batch, n - i), net.in_channels, net.img_resolution, net.img_resolution)
        out.append(pushforward_sample(model, prior_sample(shape, cfg, device, gen), ts).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------------------------
# Evaluation: sample grids and FID (torch-fidelity, imported only here)
# -----------------------------------------------------------------------------------------------

def generate(model, n, steps, seed, device, batch=500, batch_ids=None):
    """Samples as uint8 NHWC (pushforward; 2 steps go through eta = 1.4). Batch b is seeded by (seed, b), so
    the images do not depend on how the batches are shared out over ranks; `batch_ids` picks the batches."""
    out = [decode_images(sample_images(model, min(batch, n - b * batch), steps, seed=seed * 1_000_003 + b,
                                       device=device, batch=batch))
           for b in (range(math.ceil(n / batch)) if batch_ids is None else batch_ids)]
    return torch.cat(out) if out else torch.zeros(0, 32, 32, 3, dtype=torch.uint8)


def generate_sharded(model, n, steps, seed, device, batch, rank=0, world=1):
    """All n samples on rank 0: rank r makes batches r, r + world, ..., and rank 0 puts them back in order."""
    n_batches = math.ceil(n / batch)
    x = generate(model, n, steps, seed, device, batch, range(rank, n_batches, world))
    if world == 1:
        return x
    per = math.ceil(n_batches / world) * batch   # pad to one size for all_gather; only the last batch is short
    x = torch.cat([x, x.new_zeros(per - len(x), *x.shape[1:])]).to(device)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    chunks = [p.view(-1, batch, *x.shape[1:]).cpu() for p in parts]
    return torch.cat([chunks[b % world][b // world] for b in range(n_batches)])[:n]


def save_grids(model, out_dir, tag, n, device):
    """1- and 2-step samples from the same prior noise (seed 0), as two PNG grids."""
    paths = [os.path.join(out_dir, f"samples{tag}_{steps}step.png") for steps in (1, 2)]
    for steps, path in zip((1, 2), paths):
        save_image_grid(sample_images(model, n, steps, seed=0, device=device), path)
    return paths


def dump_samples(raw_model, ema, path, n, device):
    """1- and 2-step samples (seed 0) of the live and the EMA weights as uint8 NHWC arrays live_1, live_2, ema_1,
    ema_2 in one .npz (written atomically), for scoring outside the training run."""
    arrays = {f"{name}_{steps}": generate(m, n, steps, 0, device).numpy()
              for name, m in (("live", raw_model), ("ema", ema)) for steps in (1, 2)}
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def fid_setup():
    """Import torch-fidelity and make sure its Inception weights are on disk, before any sample is drawn.
    torch-fidelity fetches them with torch.hub into $TORCH_HOME/hub/checkpoints; offline that fails late and
    obscurely, so try the download here and otherwise say exactly which file to place where."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        raise SystemExit("--fid needs torch-fidelity: pip install torch-fidelity==0.4.0")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=False)
        except Exception as e:
            raise SystemExit(f"FID needs torch-fidelity's Inception weights and could not download them "
                             f"({type(e).__name__}: {e}). On a machine with internet fetch {URL_INCEPTION_V3} "
                             f"and place it at {path} (that is $TORCH_HOME/hub/checkpoints/"
                             f"{os.path.basename(URL_INCEPTION_V3)})")
    return path


@functools.lru_cache(maxsize=2)   # --fid-every calls it at every evaluation: load the weights once per device
def fid_feature_extractor(device):
    """torch-fidelity's TF-Inception (2015-12-05 weights): uint8 [N, 3, H, W] -> [N, 2048] pool features. A function
    of its own so that tests can put a tiny extractor in its place."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
    return lambda x: net(x)[0]


_REAL_FID_STATS = {}   # reference statistics per hash of the reference images: computed once per process


def fid_statistics(images, device, batch=250):
    """torch-fidelity's (mu, sigma) of the features of uint8 NCHW images."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    extract = fid_feature_extractor(device)
    with torch.no_grad():
        feats = torch.cat([extract(images[i:i + batch].to(device)).double().cpu()
                           for i in range(0, len(images), batch)])
    return fid_features_to_statistics(feats)


def compute_fid(fake, real, device):
    """(FID, protocol) of uint8 NHWC samples against uint8 NCHW reference images (--fid and --fid-every)."""
    import torch_fidelity
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    key = hashlib.sha1(real.numpy().tobytes()).hexdigest()
    if key not in _REAL_FID_STATS:
        _REAL_FID_STATS[key] = fid_statistics(real, device)
    fid = fid_statistics_to_metric(fid_statistics(fake.permute(0, 3, 1, 2).contiguous(), device),
                                   _REAL_FID_STATS[key], verbose=False)[KEY_METRIC_FID]
    name = f"FID-{len(fake) // 1000}k" if len(fake) % 1000 == 0 else f"FID ({len(fake)} samples)"
    return float(fid), (f"{name}: {len(fake)} EMA pushforward samples vs {len(real)} training images, torch-fidelity "
                        f"{torch_fidelity.__version__} (Inception-v3 2015-12-05 TF weights, 2048-d pool features, "
                        f"TF1 bilinear resize to 299), images decoded as clip(x * 127.5 + 128, 0, 255) uint8")


# -----------------------------------------------------------------------------------------------
# Main: DDP setup -> data -> model and optimiser -> training loop (or evaluation)
# -----------------------------------------------------------------------------------------------

class Env:
    """DDP setup from torchrun's RANK / LOCAL_RANK / WORLD_SIZE (a plain `python` run is rank 0 of 1), the device, and
    what every rank needs to say, stop or download together."""

    def __init__(self, device_opt):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.rank, self.local_rank, self.world = ((int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
                                                  if self.ddp else (0, 0, 1))
        self.cuda = device_opt == "cuda" or (device_opt == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        self.master = self.rank == 0
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
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()

    def rank0_first(self, fn, local=False):
        """Rank 0 (with local=True: each node's local rank 0) runs fn first, e.g. to download, while the others
        wait at a barrier; then the others run it. If it fails there, torchrun stops the waiting ranks."""
        first = (self.local_rank if local else self.rank) == 0
        if self.ddp and not first:
            dist.barrier()
        out = fn()
        if self.ddp and first:
            dist.barrier()
        return out


def main(argv=None):
    # Config: the command line, or a resumed run's checkpoint (which keeps its options; a new run never writes into a
    # folder that holds one)
    args, given = parse_args(argv)
    ckpt_path = ckpt = None
    overridden = []
    if args.resume and not (args.sample or args.fid):
        ckpt_path = find_checkpoint(args.resume, args.run_dir)
        if ckpt_path:
            ckpt = load_checkpoint(ckpt_path)
            args, overridden = resumed_options(args, given, ckpt)
    elif args.run_dir and not (args.sample or args.fid or args.bench) and run_files(args.run_dir):
        raise SystemExit(f"{args.run_dir} already holds a run ({', '.join(run_files(args.run_dir))}): continue it with "
                         f"--resume {args.run_dir}, or choose a new --run-dir")
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_rank, batch_gpu = check_args(args, world)

    # DDP
    env = Env(args.device)
    device, say = env.device, env.say
    if args.sample or args.fid:
        return evaluate(args, env)
    stamp = [time.strftime("%Y%m%d-%H%M%S")]   # rank 0's clock names a new run folder
    if env.ddp:
        dist.broadcast_object_list(stamp, src=0)
    run_dir = args.run_dir or (os.path.dirname(ckpt_path) if ckpt_path else os.path.join("runs", stamp[0]))

    # Network and method: the checkpoint's when resuming
    net_cfg = ckpt["net"] if ckpt else net_kwargs(args)
    method = ckpt["args"].get("loss", "imm") if ckpt else args.loss
    cfg = IMMConfig(**ckpt["imm"]) if ckpt else IMMConfig(M=args.M, k=args.k, min_gap=args.min_gap, temb=args.temb,
                                                          f_type="euler_fm" if method == "fm" else "simple_edm")
    seed = ckpt["args"]["seed"] if ckpt else args.seed
    if batch_gpu % cfg.M:
        env.stop(f"the checkpoint's M={cfg.M} does not divide the per-GPU micro-batch {batch_gpu}")
    if device.type == "cpu":   # eager CPU training keeps every activation: say so before the kernel kills the process
        need, have = activation_bytes_per_image(net_cfg, cfg) * batch_gpu, available_memory_bytes()
        if have and need > have:
            fit = max(cfg.M, int(have / need * batch_gpu) // cfg.M * cfg.M)
            env.stop(f"a micro-batch of {batch_gpu} images needs about {need / 2**30:.0f} GB for this network on the "
                     f"CPU, and {have / 2**30:.0f} GB are available: use a GPU, --batch-gpu {fit} (gradient "
                     f"accumulation), or --tiny")

    # Data: rank 0 downloads if needed while the others wait; the whole set lives on the device as uint8
    if args.fake_data or args.bench:
        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=g)
    else:
        data = env.rank0_first(lambda: load_dataset(args.data_dir, args.download), local=True)
    data = data.to(device)

    def batches_of(step):   # this rank's micro-batches of step `step`: draws identical on every rank (see top)
        draws = global_batch(step, seed, len(data), args.batch, cfg, args.xflip, device, augment_p=args.augment)
        return micro_batches(data, draws, env.rank * per_rank, batch_gpu, accum, cfg.M)

    # Model, EMA and optimiser: fp32 master weights; the target pass uses the live weights (Sec. 4.1, stop-gradient)
    torch.manual_seed(seed)
    raw_model = IMMModel(DDPMpp(**net_cfg), cfg).to(device).train()
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False)
    opt = torch.optim.RAdam(raw_model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    step = 0
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        say(f"resumed from {ckpt_path} at step {step}"
            + "".join(f"; {option(k)} {new} (was {old})" for k, old, new in overridden))
    elif args.resume:
        say("--resume auto: no checkpoint yet, starting from scratch")
    precision = args.precision if env.cuda else "fp32"
    autocast, scaler = precision_setup(precision, device.type)
    if scaler is not None and ckpt and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    compile_ = env.cuda if args.compile is None else args.compile
    channels_last = compile_ if args.channels_last is None else args.channels_last
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    ddp_args = dict(device_ids=[env.local_rank] if env.cuda else None)
    if env.ddp and compile_ and args.compile_ddp:   # compiled around DDP: the graph is cut at the gradient buckets
        model = torch.compile(DDP(raw_model, **ddp_args), mode=args.compile_mode)
    else:                                           # DDP around the compiled model: all-reduce after the backward
        model = torch.compile(raw_model, mode=args.compile_mode) if compile_ else raw_model
        model = DDP(model, **ddp_args) if env.ddp else model
    accum, n_params = per_rank // batch_gpu, sum(p.numel() for p in raw_model.parameters())
    flops_img = flops_per_image(net_cfg, cfg)
    peak = (args.peak_tflops or {"fp32": 67, "tf32": 494}.get(precision, 989)) * 1e12
    total_steps = min(args.max_steps, math.ceil(args.max_kimg * 1000 / args.batch)) if args.max_kimg else args.max_steps
    say(f"run {run_dir}: {n_params / 1e6:.2f}M params, {world} process(es) on {device.type}, batch {args.batch} = "
        f"{world} x {accum} x {batch_gpu}, loss {method}, {precision}, min gap {cfg.min_gap:g}, temb {cfg.temb}"
        f"{', compiled' if compile_ else ''}{', channels_last' if channels_last else ''}, {flops_img / 1e9:.2f} "
        f"GFLOPs/img, {len(data)} images, steps {step} -> {total_steps}")

    def train(batches, ema_decay=args.ema, bins=None):   # the step: Eq. 12 over the micro-batches, RAdam, EMA
        return train_step(model, raw_model, ema, opt, batches, ema_decay, cfg=cfg, accum=accum, autocast=autocast,
                          scaler=scaler, loss_fn=fm_loss if method == "fm" else imm_loss, bins=bins)

    if args.bench:
        bench(lambda i: train(batches_of(i)), model, opt, args.bench, args.batch, world, flops_img, peak, device, say)
        return env.close()
    fid_every, real = fid_during_training(args, env, data)
    if env.master:   # a resumed run forgets the log lines written after its checkpoint (e.g. before a kill -9)
        os.makedirs(run_dir, exist_ok=True)
        truncate_log(os.path.join(run_dir, "log.jsonl"), step)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    def log(rec):
        if env.master:
            with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # Training loop
    loss_acc, steps_acc, t_last, last_good = torch.zeros((), device=device), 0, time.time(), ckpt_path
    bins = torch.zeros(3, N_TIME_BINS, dtype=torch.float64, device=device)
    while step < total_steps:
        lr = args.lr * min(1.0, (step + 1) * args.batch / (args.warmup_kimg * 1000)) if args.warmup_kimg else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        ema_decay = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema
        torch.manual_seed(step_seed(seed, step, 1 + env.rank))  # this rank's dropout masks for this step
        loss_acc += train(batches_of(step), ema_decay, bins)
        step, steps_acc = step + 1, steps_acc + 1

        is_ckpt = step == total_steps or (args.ckpt_every and step % args.ckpt_every == 0)
        if step % args.log_every == 0 or is_ckpt:  # every check syncs: sum the ranks' losses, test them, log
            if env.ddp:
                dist.all_reduce(loss_acc)
                dist.all_reduce(bins)
            loss = loss_acc.item() / (steps_acc * world)
            if not math.isfinite(loss):
                env.stop(f"loss is {loss} within steps {step - steps_acc + 1}..{step}: training stopped; "
                         f"the last good checkpoint is {last_good or 'none (none was written yet)'}")
            dt, t_last = time.time() - t_last, time.time()
            img_s = steps_acc * args.batch / dt
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if env.cuda else 0.0
            per_bin = [[v if n else None for v, n in zip(row, bins[2].tolist())]   # None: no group fell in the bin
                       for row in (bins[:2] / bins[2].clamp_min(1)).tolist()]
            rec = dict(step=step, kimg=step * args.batch / 1000, loss=loss, lr=lr, ema_decay=ema_decay, img_s=img_s,
                       img_s_gpu=img_s / world, mfu=mfu(flops_img, img_s / world, peak), mem_gb=mem,
                       eta_h=(total_steps - step) * dt / steps_acc / 3600,
                       t_bin_edges=[cfg.t_min + (cfg.T - cfg.t_min) * i / N_TIME_BINS for i in range(N_TIME_BINS + 1)],
                       loss_per_t_bin=per_bin[0], mmd2_per_t_bin=per_bin[1], groups_per_t_bin=bins[2].tolist())
            say(f"step {step} | kimg {rec['kimg']:.1f} | loss {loss:.4e} | w*mmd2 by t "
                f"[{' '.join('-' if v is None else f'{v:.1e}' for v in per_bin[0])}] | {img_s:.0f} img/s "
                f"({img_s / world:.0f}/gpu) | mfu {rec['mfu']:.1%} | mem {mem:.1f} GB | eta {rec['eta_h']:.1f} h")
            log(rec)
            loss_acc, steps_acc = torch.zeros((), device=device), 0
            bins.zero_()

        if is_ckpt:  # a finite loss with non-finite weights (an inf gradient) must not overwrite a good file either
            if not all(p.isfinite().all() for p in raw_model.parameters()):   # same on every rank
                env.stop(f"weights became non-finite by step {step}: not saved; the last good checkpoint is "
                         f"{last_good or 'none (none was written yet)'}")
            if env.master:
                save_checkpoint(os.path.join(run_dir, "ckpt.pt"), dict(
                    step=step, model=raw_model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None, net=dict(net_cfg), imm=asdict(cfg),
                    args=dict(vars(args), seed=seed)))
            last_good = os.path.join(run_dir, "ckpt.pt")

        # Evaluation during training: grids and sample dumps (rank 0), FID (every rank samples its share)
        if env.master and args.grid_every and (step % args.grid_every == 0 or step == total_steps):
            save_grids(ema, run_dir, f"_{step:07d}", args.n_grid, device)
        if env.master and args.dump_every and step % args.dump_every == 0:
            dump_samples(raw_model, ema, os.path.join(run_dir, f"samples_{step:07d}.npz"), args.dump_n, device)
        if fid_every and step % fid_every == 0:
            rec = dict(step=step)
            for steps in (1, 2):
                x = generate_sharded(ema, args.fid_every_n, steps, seed, device, args.fid_batch, env.rank, world)
                if env.master:
                    rec[f"fid_{steps}step"], rec["fid_protocol"] = compute_fid(x, real, device)
            say(f"step {step} | FID 1 step {rec.get('fid_1step', 0):.2f} | 2 steps {rec.get('fid_2step', 0):.2f} | "
                f"{rec.get('fid_protocol')}")
            log(rec)

    say(f"done: {step} steps, checkpoint {last_good}")
    env.close()


# -----------------------------------------------------------------------------------------------
# Evaluation: --sample and --fid, and FID during training
# -----------------------------------------------------------------------------------------------

def evaluate(args, env):
    """--sample: 1- and 2-step grids; --fid: FID at 1 and 2 steps (every rank samples its share of the batches)."""
    if args.fid:  # check everything FID needs before drawing 2 x 50k samples
        env.rank0_first(fid_setup, local=True)
        real = load_dataset(args.data_dir, args.download) if env.master else None
    if args.official:
        model = env.rank0_first(lambda: official_model(args.official), local=True)
        out_dir = args.run_dir or "out"
    else:
        path = find_checkpoint(args.ckpt or args.resume, args.run_dir) or env.stop("--resume auto found no checkpoint")
        model = model_from_checkpoint(load_checkpoint(path))
        out_dir = args.run_dir or os.path.dirname(path)
    model = model.to(env.device).eval()
    os.makedirs(out_dir, exist_ok=True)
    if args.sample:
        if env.master:
            for p in save_grids(model, out_dir, "", args.n_grid, env.device):
                print(f"wrote {p}")
    else:
        for steps in (1, 2):
            x = generate_sharded(model, args.fid_n, steps, args.seed, env.device, args.fid_batch, env.rank, env.world)
            if env.master:
                fid, protocol = compute_fid(x, real, env.device)
                line = f"{steps}-step FID {fid:.3f}  [{protocol}]"
                print(line)
                with open(os.path.join(out_dir, "fid.txt"), "a") as f:
                    f.write(line + "\n")
    env.close()


def fid_during_training(args, env, data):
    """(every, reference images) for --fid-every; (0, None) with one line, never fatal, when FID cannot be had."""
    if not args.fid_every:
        return 0, None
    reason = "--fake-data has no real images to compare with" if args.fake_data else None
    if reason is None:
        try:
            env.rank0_first(fid_setup, local=True)
        except SystemExit as e:
            reason = str(e)
    ok = torch.tensor(float(reason is None), device=env.device)
    if env.ddp:   # every rank must agree: sampling for FID is collective
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        env.say(f"--fid-every {args.fid_every}: skipped, training goes on without it: "
                f"{reason or 'another rank failed'}")
        return 0, None
    return args.fid_every, data.cpu() if env.master else None


if __name__ == "__main__":
    main()
