"""Data-parallel `ncguard train` with torch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node 2 -m training.ddp --data digits --out runs/digits-ddp
    (or: python -m torch.distributed.run --nproc_per_node 2 -m training.ddp ...)

Takes exactly the `ncguard train` flags. Backend: NCCL when every process gets a CUDA device,
gloo otherwise (CPU, or no CUDA present: a clean fallback, never an error). Replicas split each
global batch (see training.trainer); rank 0 writes the checkpoints and the run directory, and
metrics.json records a fingerprint of every replica's final parameters so that agreement can be
checked after the fact.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from ncguard.errors import ConfigError, NcguardError

from .cli import add_train_arguments, print_summary
from .train import TrainOptions, train

TIMEOUT = datetime.timedelta(minutes=10)


def choose_device_and_backend(requested: str, local_rank: int) -> tuple[str, str]:
    """(device for this process, process-group backend): CUDA + NCCL when usable, else CPU + gloo."""
    wants_cuda = requested == "auto" or requested.startswith("cuda")
    if wants_cuda and torch.cuda.is_available() and dist.is_nccl_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} CUDA device(s) for this node's processes"
            )
        return f"cuda:{local_rank}", "nccl"
    if requested.startswith("cuda"):
        raise ConfigError(f"--device {requested}: CUDA is not available here (use --device cpu or auto)")
    return "cpu", "gloo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun ... -m training.ddp", description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("training.ddp: launch me with torchrun (RANK and WORLD_SIZE are not set)", file=sys.stderr)
        return 2
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        device, backend = choose_device_and_backend(args.device, local_rank)
    except NcguardError as exc:
        print(f"training.ddp: error: {exc}", file=sys.stderr)
        return 2
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    args.device = device
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        summary = train(TrainOptions.from_args(args))
        if summary is not None:
            print_summary(summary)
    except NcguardError as exc:
        print(f"training.ddp (rank {dist.get_rank()}): error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
