"""Multi-process training with ``torchrun``: setup from the environment, rank helpers, cleanup.

``torchrun --nproc_per_node=N train.py ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python train.py`` has none of them and runs as a
single process (rank 0 of 1). Every helper below is a no-op in a single process.

    dist_info = setup("auto")           # DistInfo(rank, local_rank, world_size, device)
    if dist_info.is_main: ...           # logging, validation summary, checkpoints
    barrier(); cleanup()
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from core.errors import UserError

log = logging.getLogger(__name__)
# Generous: the first process of each node builds the data cache, rank 0 writes checkpoints, the others wait.
TIMEOUT = datetime.timedelta(minutes=120)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` if CUDA is available else ``cpu``; ``"cuda"`` -> ``cuda:<local_rank>``.

    ``UserError`` naming the config ``key`` for a CUDA device that is not available or an unknown name.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{key}: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}: {name!r} requested but CUDA is not available")
        if device.index is None:
            # cuda:LOCAL_RANK; where each process sees only its own GPU (SLURM --gpus-per-task=1), cuda:0
            device = torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"{key}: {device} does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise UserError(f"{key}: unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # config name -> autocast dtype


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``train.precision`` / ``infer.precision``: a key of
    ``PRECISIONS``) on ``device``, ``None`` for fp32 (a warning says so once when it changes):

    - CUDA: bf16 becomes fp16 on GPUs older than Ampere (compute capability < 8.0), where cuDNN has
      no bf16 convolutions;
    - CPU: fp16 runs fp32 (no fp16 CPU kernels worth having); bf16 runs fp32 on a CPU without
      native bf16 instructions (emulated bf16 is many times slower than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        _warn_once(f"{torch.cuda.get_device_name(device)} has no bf16 convolutions (needs compute capability "
                   ">= 8.0): using fp16 autocast instead (with loss scaling when training)")
        return torch.float16
    if device.type == "cpu" and dtype is torch.float16:
        return None
    if device.type == "cpu" and dtype is torch.bfloat16 and not cpu_has_native_bf16():
        _warn_once("bf16 was asked for, but this CPU has no native bf16 instructions (avx512_bf16 / amx_bf16): "
                   "running fp32, which is faster here")
        return None
    return dtype


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively: the avx512_bf16 or amx_bf16 flags on Linux, else
    what oneDNN reports."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = {word for line in info if line.startswith("flags") for word in line.split()}
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def setup(device_name: str = "auto") -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; with ``WORLD_SIZE > 1`` join the process group
    (NCCL on CUDA, gloo on CPU). Each process gets its own GPU (``cuda:LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and device_name.startswith("cuda:"):
        raise UserError(f"train.device: {device_name!r} would put all {world_size} processes on one GPU; "
                        "use auto or cuda with torchrun (each process takes cuda:LOCAL_RANK)")
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=TIMEOUT, store=attempt_store(), rank=rank,
                                world_size=world_size, **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def attempt_store() -> dist.Store:
    """The ``env://`` rendezvous store that ``init_process_group`` would use, with keys of its own
    for each torchrun attempt (``TORCHELASTIC_RESTART_COUNT``).

    torchrun's agent keeps one store across ``--max-restarts``: without the prefix the restarted
    workers can read the dead workers' entries (gloo then fails with "connectFullMesh failed ...
    Connection refused" to an old address; NCCL would read an old unique id)."""
    store, _, _ = next(rendezvous("env://", timeout=TIMEOUT))
    store.set_timeout(TIMEOUT)
    return dist.PrefixStore(f"default_pg/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)``; in a torchrun worker (``WORLD_SIZE > 1``), ``os._exit(code)`` once stdout,
    stderr and the log handlers are flushed.

    The process group outlives ``destroy_process_group`` (DistributedDataParallel keeps a reference
    in C++, torch 2.13), and so do gloo's worker threads. A worker still releasing the last
    collective's tensors needs the GIL; if the interpreter is finalizing by then, the finished run
    aborts ("terminate called without an active exception", SIGABRT). Skipping finalization loses
    nothing: checkpoints, metrics and TensorBoard files are written and closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is left alone)."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
