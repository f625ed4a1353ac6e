"""Run plumbing shared by the five method scripts: distributed setup, precision, run folders, logs,
checkpoints that survive a kill, and the numbers behind `--bench`.

None of this is about a method; it is the part every training script needs and nobody wants to read five
times. Each method script keeps its own training loop (optimizer, schedule, steps) in plain sight and calls
these helpers for the boring bits.

Checkpoints are a folder per save, `ckpt/step_000123/` holding
    trainable.safetensors   the trainable tensors only (frozen weights come from the pretrained checkpoint)
    state.pt                optimizer / scheduler / RNG / step state; plain tensors and Python containers,
                            read back with torch.load(weights_only=True), so nothing is ever unpickled
and `ckpt/latest` names the newest complete one. The pointer is replaced atomically after the folder is
fully written, so a run killed at any moment leaves the previous checkpoint intact.
"""
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> Dist:
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set), else a single process.

    gloo on CPU, nccl on CUDA. `device` overrides the default choice (cuda:<local_rank> when CUDA exists).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return Dist(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    Assumes every rank has the same B (use drop_last=True for training loaders)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


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
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def make_scaler(precision: str, device: torch.device):
    """GradScaler only makes sense for fp16 (bf16 has fp32's exponent range). Disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))


# ----------------------------------------------------------------------------------------------------------
# run folders, logs, progress


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def make_run_dir(script: str, data: str, out: str | None = None, args: dict | None = None,
                 is_main: bool = True) -> Path:
    """runs/<script>/<data>/<YYYYmmdd-HHMMSS> unless --out is given; writes args.json and env.json there.

    Under DDP every rank must agree on the folder, so pass --out or let rank 0's timestamp be broadcast
    (we broadcast it here when torch.distributed is up)."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if dist.is_available() and dist.is_initialized():
            box = [stamp]
            dist.broadcast_object_list(box, src=0)
            stamp = box[0]
        out = REPO_ROOT / "runs" / script / data / stamp
    out = Path(out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args is not None:
            (out / "args.json").write_text(json.dumps(args, indent=2, default=str) + "\n")
        env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "git": _git_sha(), "argv": sys.argv}
        (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    return out


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
# RNG state and checkpoints


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


def save_checkpoint(run_dir: Path, tensors: dict, state: dict, keep: int = 2) -> Path:
    """Write ckpt/step_XXXXXX/{trainable.safetensors,state.pt}, then atomically point ckpt/latest at it.

    A kill at any point leaves either the old or the new checkpoint complete, never a half-written one."""
    root = Path(run_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(state['step']):07d}"
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # safetensors refuses shared or non-contiguous storage; trainables are small, a copy is cheap.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ptr = root / "latest.tmp"
    ptr.write_text(name + "\n")
    os.replace(ptr, root / "latest")
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path):
    """-> (tensors, state) from the newest complete checkpoint under run_dir/ckpt, or None if there is none."""
    root = Path(run_dir) / "ckpt"
    ptr = root / "latest"
    if not ptr.exists():
        return None
    d = root / ptr.read_text().strip()
    tensors = load_file(str(d / "trainable.safetensors"))
    state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    return tensors, state


class NonFiniteLoss(RuntimeError):
    """Raised when the loss is NaN/inf: the run stops, the last good checkpoint stays as it was."""


def check_finite(loss: torch.Tensor, step: int):
    if not torch.isfinite(loss).all():
        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}; stopping. The last good checkpoint is kept; "
                            "try a lower --lr, --precision fp32/bf16 instead of fp16, or check the data.")


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def bench(step_fn, *, items: int, flops_per_step: float, device: torch.device, dtype: torch.dtype,
          warmup: int = 1, steps: int = 3) -> dict:
    """Time `step_fn` (one full training step): median step ms, items/s, peak memory, MFU against the
    measured matmul peak for `dtype`."""
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
