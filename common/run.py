"""Run plumbing shared by the five method scripts: flags, distributed setup, precision, run folders, logs,
checkpoints that survive a kill, the optimizer step, and the numbers behind `--bench`.

None of this is about a method; it is the part every training script needs and nobody wants to read five
times. Each method script keeps its model, losses, optimizer construction, schedule and training loop in plain
sight and calls these helpers for the boring bits:

    world = R.setup_distributed(args.device)                       # rank, size, device
    run_dir = R.new_run_dir("cilmp", args.data, args.out, vars(args), world)
    ckpts = R.Checkpoints(run_dir / "ckpt", world)
    ck = ckpts.load(optimizer=opt, scaler=scaler)                   # None on a fresh run
    net = R.wrap_model(model, world, compile=args.compile)          # DDP over the trainable parameters
    for ...:
        with R.autocast(world.device, args.precision):
            loss = ...
        value = R.optimizer_step(loss, opt, scaler, world, step)    # finite check, backward, step: one host sync
        ckpts.save(step, trainable_tensors, optimizer=opt, scaler=scaler)

Checkpoints are a folder per save, `ckpt/step_0000123/` holding
    trainable.safetensors   the trainable tensors only (frozen weights come from the pretrained checkpoint)
    state.pt                {"step", "optimizer", "scheduler", "scaler", "rng": [one per rank], "extra"}: plain
                            tensors and containers, read back with torch.load(weights_only=True)
    manifest.json           byte size and sha256 of both files, checked before a checkpoint is used
A folder is written under a temporary name and renamed when complete, and `ckpt/latest` is replaced atomically
after it, so a run killed at any moment leaves the previous checkpoint intact; loading takes the newest folder
that verifies and says so when it had to skip a damaged one.

One resume rule for every script (restore_run_args): `--resume RUN` takes every flag that is not typed again
from RUN/args.json; flags that only say how to run (RUNTIME_FLAGS: device, precision, workers, ...) are always
today's; a typed flag that would change what is trained (data, model, sizes, recipe) and differs from the run's
is an error, not a silent mix of two configurations.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from common.data import DataError, _seed_worker
from common.weights import WeightsError, check_keys

REPO_ROOT = Path(__file__).resolve().parent.parent


class RunError(Exception):
    """A user-fixable problem with the run itself (its folder, its flags, its checkpoints): main prints the
    message and exits with .code (2), as for DataError and WeightsError."""
    code = 2


class Stopped(RunError):
    """Training stopped early (a non-finite loss: exit 3; Ctrl-C: exit 2). The message says only what is true
    about the checkpoints on disk and how to continue (stop_message)."""

    def __init__(self, exc: BaseException, run_dir, command: str = "", ckpt_dir=None):
        super().__init__(stop_message(exc, run_dir, ckpt_dir, command))
        self.code = 3 if isinstance(exc, NonFiniteLoss) else 2


USER_ERRORS = (DataError, WeightsError, RunError)

# ----------------------------------------------------------------------------------------------------------
# flags shared by every script


def add_common_args(p: argparse.ArgumentParser, *, datasets, data="demo", epochs=1, steps=0, batch_size=32,
                    lr=1e-3, seed=0, eval_batch_size=None, ckpt_every=None, help=None):
    """The flags every script has, with the literal defaults the script passes (so --help shows numbers).
    `help` adds the paper/demo note to a flag's help, e.g. {"lr": "paper: 2.5e-3, demo: 1e-2"}. A script that
    evaluates in batches or checkpoints every N steps passes eval_batch_size / ckpt_every to get those flags."""
    note = lambda k, text: text + (f" ({help[k]})" if help and k in help else "")
    p.allow_abbrev = False  # given_flags() must see exactly which flags were typed
    p.add_argument("--data", default=data, choices=list(datasets), help=note("data", "dataset (data/README.md)"))
    p.add_argument("--data-dir", default=None, help="dataset folder (default data/<data>)")
    p.add_argument("--out", default=None, help="new run folder (default runs/<script>/<data>/<time>-<id>)")
    p.add_argument("--epochs", type=int, default=epochs, help=note("epochs", "training epochs"))
    p.add_argument("--steps", type=int, default=steps, help=note("steps", "optimizer steps; 0 = as many as the epochs give"))
    p.add_argument("--batch-size", type=int, default=batch_size, help=note("batch_size", "training batch per process"))
    p.add_argument("--lr", type=float, default=lr, help=note("lr", "peak learning rate"))
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision: auto = bf16 on CUDA, fp32 on CPU; fp16 adds a GradScaler (CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=seed, help="random seed")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate the weights of --resume RUN_DIR, no training")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first step)")
    p.add_argument("--bench", action="store_true", help="time training steps at the paper's size with random weights")
    p.add_argument("--bench-steps", type=int, default=3, help="timed steps per --bench measurement (median reported)")
    p.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers; -1 = 8 on CUDA, 0 on CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    p.add_argument("--log-every", type=int, default=10, help="write the loss to metrics.jsonl every N steps")
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    if eval_batch_size is not None:
        p.add_argument("--eval-batch-size", type=int, default=eval_batch_size, help="evaluation batch per process")
    if ckpt_every is not None:
        p.add_argument("--ckpt-every", type=int, default=ckpt_every,
                       help=note("ckpt_every", "checkpoint every N optimizer steps (and at the end)"))
    return p


def check_flags(p: argparse.ArgumentParser, args, checks):
    """checks: (dest, ok, want) triples; the first that fails -> p.error("--dest VALUE: must be WANT"), which
    prints the usage and exits 2 before anything is written."""
    for flag, ok, want in checks:
        if not ok:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be {want}")


def given_flags(p: argparse.ArgumentParser, argv=None) -> set:
    """The dests of the flags typed on the command line (`--lr 1e-3` and `--lr=1e-3` alike)."""
    argv = sys.argv[1:] if argv is None else argv
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    return {a.dest for a in p._actions if typed & set(a.option_strings)}


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device, or RunError saying what this machine has."""
    have = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    m = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", name)
    if m is None:
        raise RunError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), int(m.group(2) or 0)
    if kind == "cuda" and index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: not available ({have}); use --device cpu")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RunError(f"--device {name}: not available on this machine; use --device cpu")
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, index)


def finish_common_args(p: argparse.ArgumentParser, args):
    """Check the shared flags and resolve the "auto" ones. Errors go through parser.error: usage + message,
    exit 2, no traceback, and nothing written yet. Call after the recipe and --resume have filled args."""
    check_flags(p, args, [("batch_size", args.batch_size >= 1, "at least 1"), ("lr", args.lr > 0, "above 0"),
                          ("epochs", args.epochs >= 1, "at least 1"), ("steps", args.steps >= 0, "0 or more"),
                          ("num_workers", args.num_workers >= -1, "-1 (auto) or more"),
                          ("bench_steps", args.bench_steps >= 1, "at least 1"),
                          ("threads", args.threads >= 0, "0 (torch's default) or more")]
                + [(f, getattr(args, f) >= 1, "at least 1") for f in ("eval_batch_size", "ckpt_every")
                   if isinstance(getattr(args, f, None), int)])
    try:
        device = resolve_device(args.device)
    except RunError as e:
        p.error(str(e))
    args.device = str(device)
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.precision == "fp16" and device.type != "cuda":
        p.error("--precision fp16 needs CUDA (it relies on a GradScaler); on this device use bf16 or fp32")
    if args.num_workers == -1:
        args.num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_only and not args.resume:
        p.error("--eval-only needs --resume RUN_DIR (the run whose weights to evaluate)")
    if args.out is not None and Path(args.out).is_file():
        p.error(f"--out {args.out}: that is a file; give a folder for the new run")
    return args


# flags that say how to run, not what is trained: a resumed run always takes today's values
RUNTIME_FLAGS = {"device", "precision", "num_workers", "threads", "compile", "print_every", "log_every",
                 "eval_batch_size", "ckpt_every", "resume", "eval_only", "bench", "bench_steps", "out"}


def _as_json(v):
    return json.loads(json.dumps(v, default=str))


def restore_run_args(args, given: set, free=()):
    """--resume RUN: every flag not typed again comes from RUN/args.json. RUNTIME_FLAGS and `free` may differ;
    any other typed flag that differs from the run's value changes what is trained -> RunError listing them."""
    saved_file = Path(args.resume) / "args.json"
    if not saved_file.is_file():
        raise RunError(f"--resume {args.resume}: not a run folder ({saved_file} not found)")
    saved = json.loads(saved_file.read_text())
    clashes = []
    for k, v in saved.items():
        if k in RUNTIME_FLAGS or not hasattr(args, k):
            continue
        if k in given:
            if k not in free and _as_json(getattr(args, k)) != _as_json(v):
                clashes.append(f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {v})")
        else:
            setattr(args, k, v)
    if clashes:
        raise RunError(f"--resume {args.resume}: these flags would change what the run trains:\n  " +
                       "\n  ".join(clashes) + "\nLeave them out to continue the run as it was, or start a new run.")
    return args


def restore_run_args_or_exit(p: argparse.ArgumentParser, args, given: set, free=()):
    """restore_run_args for a parse_args: its RunError becomes p.error (usage + message, exit 2)."""
    try:
        return restore_run_args(args, given, free)
    except RunError as e:
        p.error(str(e))

# ----------------------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class World:
    """Where this process sits: its rank among `size` processes, and its device."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def setup_distributed(device: str = "auto") -> World:
    """torch.distributed when launched by torchrun (RANK/WORLD_SIZE set), else a single process.
    gloo on CPU, nccl on CUDA (each rank on cuda:LOCAL_RANK)."""
    dev = resolve_device(device or "auto")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(device=dev)
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local, device=dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_main(work, device: str = "auto", tf32: bool = False) -> int:
    """A script's main() around its work: setup_distributed, work(world), exit code 0. A user-fixable error or a
    run stopped early (USER_ERRORS, Stopped among them) prints "error: ..." and returns its code, no traceback;
    Ctrl-C before training started is exit 2 (once training runs, the script turns Ctrl-C into Stopped).
    tf32: TF32 matmuls on CUDA for whatever still runs in fp32 (trainables, --precision fp32)."""
    world = setup_distributed(device)
    if tf32 and world.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        work(world)
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt:  # before training started: nothing of this run to keep
        print("error: interrupted before training started", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


def barrier(world: World):
    if world.enabled:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward routes each rank's slice of the gradient back to that rank.

    Every rank computes the same loss over the gathered batch, so the gradient of a rank's own features is the
    SUM over ranks of d(loss_r)/d(own features); we all_reduce the incoming gradient before slicing. DDP then
    averages parameter gradients over ranks, which makes the update equal to one process on the whole batch.
    """

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) everywhere, differentiable w.r.t. the local rows.
    Assumes every rank has the same B (epoch_batches gives every rank full batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap_model(model: nn.Module, world: World, compile: bool = False) -> nn.Module:
    """DDP over the trainable parameters only, then torch.compile if asked. Checkpoints use the raw model.

    Frozen weights (and the buffers of frozen modules) are identical on every rank (the same pretrained file),
    so DDP is told to ignore them:
    otherwise it broadcasts them from rank 0 at start-up (5 GB for an 8B LLM's worth of frozen weights) and
    registers hooks for parameters that never get a gradient."""
    net = model
    if world.enabled and any(p.requires_grad for p in model.parameters()):
        frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
        # buffers of modules with nothing to train (a frozen VQ codebook: 16 MB) would be broadcast from rank 0
        # before every forward; a trained BatchNorm keeps its running statistics synchronised as usual
        frozen += [f"{name}.{b}" if name else b for name, m in model.named_modules()
                   if not any(p.requires_grad for p in m.parameters(recurse=False))
                   for b, _ in m.named_buffers(recurse=False)]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[world.device.index]
                                                  if world.device.type == "cuda" else None)
    return torch.compile(net) if compile else net

# ----------------------------------------------------------------------------------------------------------
# seeds and precision


def seed_everything(seed: int, rank: int = 0):
    """Seed python, numpy and torch; ranks get different streams (data augmentation must differ per rank)."""
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The one mixed-precision context every script uses. fp32 -> no autocast at all.

    Always pass the dtype explicitly: autocast's CUDA default is fp16, which silently overflows in
    models trained in bf16 (a classic footgun)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def make_scaler(precision: str, device: torch.device):
    """GradScaler only makes sense for fp16 (bf16 has fp32's exponent range). Disabled otherwise."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=(precision == "fp16"))


FROZEN_CAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the frozen weights of Linear / Conv / Embedding modules (subclasses too: a LoRA layer's base
    weight) in `dtype`; trainables and every norm stay fp32. Halves the memory of the frozen backbone, like
    a bf16-true run, while the trained tensors keep full precision. Norms stay fp32 because CPU layer_norm
    refuses a bf16 weight on an fp32 input, and their cost is nothing."""
    if dtype == torch.float32:
        return model
    for m in model.modules():
        if isinstance(m, FROZEN_CAST_TYPES):
            for p in m.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    return model

# ----------------------------------------------------------------------------------------------------------
# the optimizer step


class NonFiniteLoss(RuntimeError):
    """The loss is NaN/inf: the run stops before the update, so the last checkpoint is the last good state."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss is {value} at step {step}; stopped before the update")
        self.step, self.value = step, value


def optimizer_step(loss: torch.Tensor, opt, scaler, world: World, step: int, clip_grad: float | None = None,
                   params=None) -> float:
    """Check, backward, (clip), step, zero_grad. Returns the loss averaged over ranks, as a float.

    The finite check costs one all-reduce and the step's one host sync (`.item()`), which the logged loss needs
    anyway. Every rank sees the same sum, so a NaN on one rank stops all of them together; a rank that stopped
    alone would leave the others waiting in their next collective forever."""
    value = loss.detach().float().reshape(()).clone()
    if world.enabled:
        dist.all_reduce(value)
        value /= world.size
    v = value.item()
    if not math.isfinite(v):
        raise NonFiniteLoss(step, v)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if clip_grad:
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        params = params if params is not None else [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return v

# ----------------------------------------------------------------------------------------------------------
# data order that --resume can replay


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: World) -> list:
    """This rank's batches of one epoch, as lists of indices: a function of (seed, epoch) only, so --resume
    replays the order from any step without loading the skipped items. Global batch i is
    order[i*B*W:(i+1)*B*W] and rank r takes its r-th slice: gathered over ranks, that IS one process's batch.
    The last partial batch is dropped (every rank must have the same B for the gathered losses)."""
    W = world.size
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    nb = n // (batch_size * W)
    if nb == 0:
        raise DataError(f"the training set has {n} items, fewer than one batch of {batch_size} x {W} process(es); "
                        "lower --batch-size")
    return order[:nb * batch_size * W].view(nb, W, batch_size)[:, world.rank].tolist()


def epoch_loader(ds, batches, world: World, num_workers: int, seed: int, epoch: int, collate_fn=None):
    """A DataLoader over `batches`. Its own generator: creating an iterator draws a seed, and from the global
    RNG that would shift every later random number on --resume (which creates its iterator elsewhere)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch + 7919 * world.rank)
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=num_workers, generator=g,
                                       worker_init_fn=_seed_worker, collate_fn=collate_fn,
                                       pin_memory=world.device.type == "cuda")


@torch.no_grad()
def predict(fn, ds, args, device) -> tuple:
    """-> (fn(x) for every (x, y) of `ds`, in order, fp32 on the CPU; the labels y). fn runs under --precision's
    autocast, in batches of --eval-batch-size. A plain loader over the whole set: the rank that evaluates sees all
    of it (a DistributedSampler would give it 1/world)."""
    outs, ys = [], []
    for x, y in torch.utils.data.DataLoader(ds, args.eval_batch_size, num_workers=args.num_workers):
        with autocast(device, args.precision):
            outs.append(fn(x.to(device)).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)

# ----------------------------------------------------------------------------------------------------------
# run folders, logs, progress


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def check_writable(path) -> str | None:
    """None if a folder can be made and written at `path`, else the problem in words (for a preflight that
    runs before anything expensive). Tries for real: os.access says yes to root on a read-only mount."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{path}: {probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write-test-")
        os.close(fd)
        os.remove(name)
    except OSError as e:
        return f"{path}: cannot write there ({e.strerror or e})"
    return None


RUN_MARKERS = ("args.json", "metrics.json", "metrics.jsonl", "trainable.safetensors", "ckpt")


def _claim_run_dir(script: str, data: str, out, args: dict | None) -> Path:
    if out is None:  # runs/<script>/<data>/<time>-<4 hex>: mkdir without exist_ok is the atomic claim
        base = REPO_ROOT / "runs" / script / data
        base.mkdir(parents=True, exist_ok=True)
        while True:
            path = base / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
    else:
        path = Path(out)
        if path.is_file():
            raise RunError(f"--out {path}: that is a file; give a folder for the new run")
        held = [m for m in RUN_MARKERS if (path / m).exists()]
        if held:
            raise RunError(f"--out {path} holds a run already ({', '.join(held)}); continue it with --resume {path}, "
                           "or give another --out")
        problem = check_writable(path)
        if problem:
            raise RunError(f"--out {problem}")
        path.mkdir(parents=True, exist_ok=True)
    try:  # "x": exclusive create, so two runs started with the same --out cannot both claim it
        with open(path / "args.json", "x") as f:
            f.write(json.dumps(args or {}, indent=2, default=str) + "\n")
    except FileExistsError:
        raise RunError(f"--out {path}: another run claimed this folder at the same moment") from None
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "git": _git_sha(), "argv": sys.argv}
    (path / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    return path


def new_run_dir(script: str, data: str, out=None, args: dict | None = None, world: World | None = None) -> Path:
    """Claim a folder for a NEW run and write args.json + env.json there (rank 0; the path or the error is
    broadcast so every rank agrees). Never a folder that holds a run: that is what --resume is for."""
    world = world or World()
    result = None
    if world.is_main:
        try:
            result = str(_claim_run_dir(script, data, out, args))
        except RunError as e:
            result = RunError(str(e))
    if world.enabled:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, RunError):
        raise result
    return Path(result)


def run_seeds(run_one, args, world: World) -> list:
    """--seeds 1,2,3: run_one(args, world) -> report, once per seed (args.seed set; args.out = --out/seed<k> when
    --out is given, else each run gets a new folder), then the mean +- std of the reports' headline figures
    (metrics.mean_std), as papers report them: printed by rank 0 and, with --out, written to --out/summary.json."""
    from common import metrics as M
    seeds, reports = [int(s) for s in args.seeds.split(",")], []
    base = Path(args.out) if args.out else None
    for seed in seeds:
        args.seed, args.out = seed, str(base / f"seed{seed}") if base else None
        reports.append(run_one(args, world))
    if world.is_main:
        summary = M.mean_std(reports)
        print(f"over seeds {', '.join(map(str, seeds))}: {M.format_mean_std(summary)}")
        if base:
            (base / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return reports


class JsonlLog:
    """Append-only metrics log, one JSON object per line (rank 0 only; other ranks get a no-op)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def log(self, **row):
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress report with rate and ETA, printed at most every `every` seconds (and at the end).
    Plain prints, not a carriage-return bar, so logs captured from a cluster job stay readable."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every: float = 10.0, start: int = 0):
        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.n = self.n0 = start
        self.t0 = self.last = time.time()

    def update(self, n: int = 1, **stats):
        self.n += n
        now = time.time()
        if not self.enabled or (now - self.last < self.every and self.n < self.total):
            return
        self.last = now
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        print(f"{self.desc} {self.n}/{self.total} | {extra} | {rate:.2f} it/s | elapsed "
              f"{_fmt_time(now - self.t0)} | eta {_fmt_time(eta) if eta != float('inf') else '?'}", flush=True)

# ----------------------------------------------------------------------------------------------------------
# RNG state, tensors and checkpoints


def rng_state() -> dict:
    """Every RNG that shapes a run, as tensors/containers that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    # random.setstate wants nested tuples; a round-trip through torch.save keeps them, but be lenient.
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_tensors(path, tensors: dict):
    """Atomic safetensors write: a temporary file renamed into place, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{secrets.token_hex(3)}")
    # safetensors refuses shared or non-contiguous storage; trainables are small, a copy is cheap.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(model: nn.Module, tensors: dict, source: str, required=()):
    """Copy a subset of the model's tensors in place: every name must exist in the model with the same shape
    (an unknown name is an error, not a silent skip), and every name in `required` must be there."""
    own = model.state_dict()
    expected = {k: own[k] for k in set(tensors) | set(required) if k in own}
    check_keys(expected, tensors, source=source)
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


def load_final(model: nn.Module, run_dir, device, required=(), name: str = "trainable.safetensors") -> nn.Module:
    """--eval-only: the finished run's trainable tensors (run_dir / name) into `model` as load_tensors checks
    them; RunError when the run has not finished (no such file yet)."""
    final = Path(run_dir) / name
    if not final.is_file():
        raise RunError(f"{final} not found: the run in {run_dir} has not finished (resume it first)")
    load_tensors(model, load_file(str(final), device=str(device)), str(final), required=required)
    return model


def cached_tensors(path, world: World, compute) -> dict:
    """Tensors that rank 0 computes once (compute() -> dict) and saves atomically at `path`; every rank then
    reads the file, so all ranks hold the same bytes. For frozen work worth keeping between runs (demo
    pre-training, frozen features). The caller names the file after what the tensors depend on."""
    path = Path(path)
    if not path.exists() and world.is_main:
        save_tensors(path, compute())
    barrier(world)
    return load_file(str(path))


def save_stage(folder, tensors: dict, spec: dict, world: World, name: str = "trainable.safetensors"):
    """A finished stage: its trainable tensors (atomically) + model.json, the architecture a later --init reads
    back. Rank 0 writes; every rank waits for it."""
    if world.is_main:
        save_tensors(Path(folder) / name, tensors)
        (Path(folder) / "model.json").write_text(json.dumps(_as_json(spec), indent=2) + "\n")
    barrier(world)


def find_stage(path, subfolders=(), name: str = "trainable.safetensors") -> Path:
    """The first of path, path/<subfolder>, ... that holds a finished stage (name + model.json), else RunError."""
    path = Path(path)
    for p in (path, *(path / s for s in subfolders)):
        if (p / name).is_file() and (p / "model.json").is_file():
            return p
    inside = f" or in its {' or '.join(s + '/' for s in subfolders)} subfolder" if subfolders else ""
    raise RunError(f"{path}: no finished stage here (expected {name} + model.json in it{inside}). "
                   "Is the run finished? Continue it with --resume.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Checkpoint(NamedTuple):
    tensors: dict
    step: int
    extra: dict
    path: Path


_STEP_DIR = re.compile(r"step_(\d+)$")


class Checkpoints:
    """The checkpoints of one run (or one stage of it) in `folder`. See the module docstring for the format.

    Only folders this object wrote are ever pruned: a resumed run keeps the checkpoints it started from, and
    nothing here deletes work that another process made."""

    def __init__(self, folder, world: World | None = None, keep: int = 2):
        self.folder, self.world, self.keep = Path(folder), world or World(), keep
        self.written: list[Path] = []

    def save(self, step: int, tensors: dict, *, optimizer=None, scheduler=None, scaler=None, extra=None) -> Path | None:
        """Collective under DDP (every rank's RNG state is gathered); rank 0 writes. Returns the folder (rank 0)."""
        rng = [rng_state()]
        if self.world.enabled:
            rng = [None] * self.world.size
            dist.all_gather_object(rng, rng_state())
        final = None
        if self.world.is_main:
            final = self._write(step, tensors, {
                "step": int(step), "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng, "extra": extra or {}})
        barrier(self.world)
        return final

    def _write(self, step: int, tensors: dict, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{int(step):07d}"
        tmp = self.folder / f"{name}.tmp-{secrets.token_hex(3)}"
        tmp.mkdir()
        try:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "state.pt")
            files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                     for f in ("trainable.safetensors", "state.pt")}
            (tmp / "manifest.json").write_text(json.dumps({"format": 1, "step": int(step), "files": files}, indent=1))
            final = self.folder / name
            if final.exists():  # the same step again: ours is replaced, anyone else's is kept aside, never deleted
                if final in self.written:
                    shutil.rmtree(final)
                else:
                    os.replace(final, self.folder / f"{name}.old-{secrets.token_hex(3)}")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ptr = self.folder / f"latest.tmp-{secrets.token_hex(3)}"
        ptr.write_text(name + "\n")
        os.replace(ptr, self.folder / "latest")
        self.written = [p for p in self.written if p != final] + [final]
        for old in self.written[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.written = self.written[-self.keep:]
        return final

    def folders(self) -> list[Path]:
        """Complete step folders, newest first (temporary and set-aside folders are not candidates)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    @staticmethod
    def verify(folder: Path) -> str | None:
        """None if the checkpoint in `folder` is intact, else what is wrong with it."""
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return "no manifest.json (incomplete, or written before checkpoints had one)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            return "manifest.json is damaged"
        for name, want in files.items():
            f = folder / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want["bytes"]:
                return f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
            if _sha256(f) != want["sha256"]:
                return f"{name} does not match its checksum (damaged)"
        return None

    def newest_intact(self) -> tuple[Path | None, list]:
        """(newest folder that verifies or None, [(folder, problem) for the newer ones that did not])."""
        skipped = []
        for folder in self.folders():
            problem = self.verify(folder)
            if problem is None:
                return folder, skipped
            skipped.append((folder, problem))
        return None, skipped

    def load(self, *, optimizer=None, scheduler=None, scaler=None, log=print, resuming=False) -> Checkpoint | None:
        """The newest intact checkpoint, with optimizer / scheduler / scaler state and this rank's RNG restored in
        place; None when the folder holds no checkpoint at all (with resuming=True that is said: the run
        stopped before its first checkpoint and starts again from step 0). Damaged ones are skipped with a
        warning naming them; if none is intact that is a RunError (starting over would silently lose the run)."""
        folder, skipped = self.newest_intact()
        if folder is None and not skipped and resuming and self.world.is_main:
            log(f"note: no checkpoint in {self.folder} yet (the run stopped before its first one): "
                "training starts from step 0 in the same folder")
        for bad, problem in skipped:
            if self.world.is_main:
                log(f"warning: skipping checkpoint {bad}: {problem}" +
                    (f"; using the older {folder}" if folder is not None else ""))
        if folder is None:
            if skipped:
                raise RunError(f"no intact checkpoint in {self.folder}: " +
                               "; ".join(f"{p.name}: {why}" for p, why in skipped))
            return None
        tensors = load_file(str(folder / "trainable.safetensors"), device=str(self.world.device))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if obj is not None and state.get(key) is not None:
                obj.load_state_dict(state[key])
        rng = state["rng"]
        if len(rng) != self.world.size and self.world.is_main:
            log(f"note: {folder} was written by {len(rng)} process(es), this run has {self.world.size}: "
                "the data order is the same, the random streams of augmentation and dropout are not")
        set_rng_state(rng[min(self.world.rank, len(rng) - 1)])
        if self.world.is_main:
            log(f"resuming from {folder} (step {state['step']})")
        return Checkpoint(tensors, int(state["step"]), state.get("extra") or {}, folder)


def stop_message(exc: BaseException, run_dir, ckpt_dir=None, command: str = "") -> str:
    """What to tell the user when a run stops early (non-finite loss, Ctrl-C): only what is true about the
    checkpoints on disk, and how to continue."""
    run_dir = Path(run_dir)
    folder, _ = Checkpoints(ckpt_dir or run_dir / "ckpt").newest_intact()
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
    if folder is not None:
        where = (f"The last good checkpoint is {folder}; continue with: {command or 'python <script>.py'} "
                 f"--resume {run_dir}")
    else:
        where = f"No checkpoint was written yet, so there is nothing to resume ({run_dir} holds the run's settings)."
    advice = ("" if isinstance(exc, KeyboardInterrupt) else
              " Try a lower --lr, --precision bf16 or fp32 instead of fp16, or check the data.")
    return f"{what}. {where}{advice}"

# ----------------------------------------------------------------------------------------------------------
# benchmarking


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Measured (not datasheet) dense matmul throughput of this machine, FLOP/s: the MFU denominator.
    Median over reps of an n x n x n matmul; on a shared CPU this moves by +-20%, so read MFU as a ratio."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def time_call(fn, device: torch.device, reps: int = 3) -> float:
    """Seconds per call of fn (no autograd), after one warm-up call: for inference timings beside bench()."""
    with torch.no_grad():
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
    return (time.perf_counter() - t) / reps


def saved_activation_bytes(forward, module: torch.nn.Module, layers) -> dict:
    """What autograd keeps for backward after `forward()` (one training forward of `module`), in bytes, counted on
    any device: every tensor the graph saved and still holds at the end (a branch the graph drops frees its own),
    once per storage, module's weights and buffers left out. -> {"all": that total, "per_layer": what each of
    `layers` saved inside it, "kept": the total with gradient checkpointing over `layers` (each keeps only its
    input; backward then recomputes one layer at a time, adding that layer's share once)}."""
    import weakref
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    packed, spans, inputs = [], [], []                 # (weakref, storage address, storage bytes) per saved tensor

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            packed.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t
    hooks = [h for m in layers for h in (
        m.register_forward_pre_hook(lambda m, a: spans.append([len(packed)]) or inputs.append(a[0].nbytes)),
        m.register_forward_hook(lambda m, a, out: spans[-1].append(len(packed))))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()                            # held, so is the graph
    finally:
        for h in hooks:
            h.remove()
    first = {}                                          # storage address -> (index of its first saver, bytes)
    for i, (ref, ptr, n) in enumerate(packed):
        if ref() is not None:
            first.setdefault(ptr, (i, n))
    del out
    span = lambda lo, hi: sum(n for i, n in first.values() if lo <= i < hi)  # noqa: E731
    per_layer, total = [span(lo, hi) for lo, hi in spans], span(0, len(packed))
    return {"all": total, "per_layer": per_layer, "kept": total - sum(per_layer) + sum(inputs)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def flops_of(fn) -> float:
    """FLOPs of one call of fn (forward and backward if fn does both), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def bench(step_fn, *, items: int, flops_per_step: float, device: torch.device, dtype: torch.dtype,
          warmup: int = 1, steps: int = 3) -> dict:
    """Time `step_fn` (one full training step): median step ms, items/s, peak memory, MFU against the
    measured matmul peak for `dtype`."""
    device = torch.device(device)
    for _ in range(warmup):
        step_fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step_fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    peak = matmul_peak_flops(device, dtype)
    return {"step_ms": 1000 * med, "items_per_s": items / med, "peak_mem_mb": peak_memory_mb(device),
            "tflops": flops_per_step / med / 1e12, "matmul_peak_tflops": peak / 1e12,
            "mfu": flops_per_step / med / peak}


BENCH_COLUMNS = "what | precision | batch | step ms | items/s | TFLOP/s | MFU | peak mem MB"


def bench_row(what: str, precision: str, batch: int, r: dict, unit: str = "img") -> str:
    """The one line every script's --bench prints per measurement, same columns everywhere."""
    return (f"{what:40s} | {precision:5s} | B={batch:<5d} | step {r['step_ms']:9.1f} ms | "
            f"{r['items_per_s']:9.2f} {unit}/s | {r['tflops']:7.3f} TFLOP/s | MFU {100 * r['mfu']:5.1f}% "
            f"(of {r['matmul_peak_tflops']:.1f} measured) | peak mem {r['peak_mem_mb']:.0f} MB")


def bench_step(what: str, step_fn, *, precision: str, batch: int, device, steps: int, items: int | None = None,
               label: str | None = None, unit: str = "img") -> dict:
    """bench() of one training step, its FLOPs counted by flops_of, printed as bench_row(label or what);
    -> the row a --bench run returns: what, precision, batch and bench()'s figures."""
    r = bench(step_fn, items=batch if items is None else items, flops_per_step=flops_of(step_fn), device=device,
              dtype=PRECISIONS[precision], warmup=1, steps=steps)
    print(bench_row(label or what, precision, batch, r, unit), flush=True)
    return dict(what=what, precision=precision, batch=batch, **r)


def bench_alternating(steps: dict, *, precision: str, batch: int, device, n_steps: int, unit: str = "img",
                      label: str = "{}") -> list:
    """Time step functions that do the same work in alternation (round 0 warms up, then the order flips every
    round: B A, A B, B A, ...) so that the load of a shared machine falls on all of them alike. Prints bench_row
    per function (its median step time, label.format(name)) and the wall / process-CPU ratio of the first to the
    second. -> the rows, as bench_step returns them."""
    device = torch.device(device)
    wall, cpu = {name: [] for name in steps}, {name: [] for name in steps}
    for i in range(1 + n_steps):
        for name in list(steps)[::1 if i % 2 else -1]:
            t, c = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            if i:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    peak, rows = matmul_peak_flops(device, PRECISIONS[precision]), []
    for name, step_fn in steps.items():
        sec, flops = float(np.median(wall[name])), flops_of(step_fn)
        r = dict(step_ms=1000 * sec, items_per_s=batch / sec, tflops=flops / sec / 1e12, mfu=flops / sec / peak,
                 matmul_peak_tflops=peak / 1e12, peak_mem_mb=peak_memory_mb(device))
        print(bench_row(f"{label.format(name)} ({1 / sec:.3g} steps/s)", precision, batch, r, unit), flush=True)
        rows.append(dict(what=label.format(name), precision=precision, batch=batch, **r))
    a, b = list(steps)[:2]
    print(f"{a} / {b} step time: wall {np.median(wall[a]) / np.median(wall[b]):.3f}, process CPU "
          f"{np.median(cpu[a]) / np.median(cpu[b]):.3f} (medians of {n_steps} alternating steps)", flush=True)
    return rows
