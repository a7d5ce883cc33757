"""Process-group helpers for torchrun/DDP training (NCCL on GPU, gloo on CPU).

`torchrun --nproc_per_node=G [--nnodes=N --node_rank=R --master_addr=A] -m m2f train ...` sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `m2f train` runs as a single process.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device_type: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Joins the process group described by the torchrun environment, if any; returns this rank's device.

    device_type: "cuda" or "cpu"; None picks cuda when available. The backend is NCCL for cuda and gloo for
    cpu. Without WORLD_SIZE > 1 in the environment nothing is initialized.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # Imported after the group exists (timm and torch.compile import it), torch._dynamo holds references
        # to the group that destroy_process_group does not drop; the group's gloo threads then outlive it, and
        # one that frees a collective's tensors while the interpreter exits aborts the process. Imported
        # first, it holds none.
        importlib.import_module("torch._dynamo")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return device


def pick_device(device: str | torch.device | None, index: int = 0) -> torch.device:
    """The device named by `device` ("cuda", "cuda:1", "cpu", a torch.device...); None picks cuda when there
    is a GPU. "cuda" without an index means GPU `index`. ValueError when there is no such GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be 'cuda', 'cpu' or another torch device, got {device!r}") from error
    if device.type != "cuda":
        return device
    index = index if device.index is None else device.index
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= found:
        raise ValueError(
            f"device 'cuda' needs GPU {index}, but torch sees {found} CUDA GPUs; use --device cpu"
        )
    return torch.device("cuda", index)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a tensor over all ranks in place (a no-op for one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages a dict of Python scalars over ranks (same keys on every rank)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    stacked /= get_world_size()
    return dict(zip(keys, stacked.tolist()))


def all_gather_object(obj: object) -> list[object]:
    """Gathers a picklable object from every rank; a one-element list for one process.

    Only used for objects this process created itself (RNG states, evaluator results), never for loading.
    """
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """Sends a picklable object from rank `src` to every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
]
