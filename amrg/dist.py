"""Data-parallel training on N processes: the same stage code on 1 CPU, 1 GPU or N GPUs.

- Under a launcher (``torchrun``, ``accelerate launch``: both set ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``)
  :func:`init` joins the process group (NCCL on CUDA, gloo on CPU) and pins ``cuda:LOCAL_RANK``.
- Without one, a training stage whose ``runtime.num_processes`` is N > 1 re-executes itself under
  ``python -m torch.distributed.run --standalone --nproc_per_node N`` (:func:`relaunch`), so
  ``dvc repro`` and the Prefect flow start multi-GPU training from params alone.
- :func:`amrg.train.fit` wraps the model in ``DistributedDataParallel``, splits every global batch
  across the ranks and weights each rank's loss by its share of the batch's items (samples or
  tokens), so N processes compute the gradient of exactly the loss one process computes on the same
  global batch. Rank 0 writes checkpoints and stage outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(num_processes: int, module: str, argv: list[str] | None) -> None:
    """Run ``python -m module argv`` under torchrun with ``num_processes`` workers and exit with its
    status, unless already launched or ``num_processes == 1`` (then return and run in this process)."""
    if num_processes <= 1 or launched():
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
           "-m", module, *(sys.argv[1:] if argv is None else argv)]
    sys.exit(subprocess.run(cmd).returncode)


def init(device: torch.device) -> torch.device:
    """Join the process group when launched; return the device this rank uses."""
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def context() -> Context:
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return Context()
    return Context(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in one process); ``x`` is not modified."""
    if context().world == 1:
        return x
    y = x.clone()
    torch_dist.all_reduce(y)
    return y


def barrier() -> None:
    if context().world > 1:
        torch_dist.barrier()


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
