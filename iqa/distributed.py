"""DDP from torchrun's environment variables and the few collectives the scripts use.

One node or several (``torchrun --nnodes N --node_rank R --master_addr HOST``, or a rendezvous
endpoint): ``RANK`` is the global rank (rank 0 alone writes the run directory), ``LOCAL_RANK``
picks this process's GPU on its node, ``LOCAL_WORLD_SIZE`` is the number of processes on it.
Every helper is the identity (or a no-op) in a plain single process, so callers never branch on
whether they run distributed."""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from iqa.runtime import UserError, resolve_device

# Set by torchrun (also for a single process); absent when a script is started with plain python.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1
    # Under torchrun the process group is up even for one process, so ``torchrun --nproc_per_node=1``
    # runs the DDP code path (and NCCL on a GPU) exactly as a multi-GPU launch does.
    torchrun: bool = False

    @property
    def enabled(self):
        return self.world_size > 1 or self.torchrun

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_flag="auto"):
    """Set up DDP from torchrun's variables (one or several nodes); a single process otherwise."""
    torchrun = all(name in os.environ for name in TORCHRUN_VARIABLES)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_flag, local_rank)
    if (torchrun or world_size > 1) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        if rank == 0:
            print(f"distributed: {world_size} process(es), {local_world_size} on this node, backend {backend}",
                  flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    local_world_size=local_world_size, torchrun=torchrun)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device_flag="auto"):
    """``init_distributed`` for the duration of a ``with`` block; the process group is destroyed when the
    block ends, after an error too (an entry script's ``main`` runs its work inside one)."""
    info = init_distributed(device_flag)
    try:
        yield info
    finally:
        cleanup_distributed()


def barrier(info):
    if info.enabled:
        dist.barrier()


def all_gather_cat(tensor, info):
    """Concatenate a 1-D/2-D tensor of possibly different length from every rank."""
    if not info.enabled:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def all_gather_objects(obj, info):
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` without DDP."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(values, info):
    """Average a dict of floats over ranks (for logging)."""
    if not info.enabled:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, info):
    """Rank 0's ``obj`` on every rank (e.g. a timestamped run directory); identity without DDP."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_on_main(check, info):
    """Run ``check()``, which raises ``UserError`` on bad input, on rank 0 alone and raise its error on every rank.

    Ranks that looked at a shared filesystem themselves could disagree (a rank on another node can see
    the run directory after rank 0 has begun to fill it, or a stale cached view) and one rank would
    then stop while the others wait for it."""
    error = None
    if info.is_main:
        try:
            check()
        except UserError as err:
            error = str(err)
    error = broadcast_object(error, info)
    if error is not None:
        raise UserError(error)
