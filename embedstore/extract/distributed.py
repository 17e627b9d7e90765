"""Devices and ``torchrun``: which device this process encodes on, and the few collective
steps an extraction needs (rank 0 creates and finalises, every rank learns its result or its
error, the blocks are dealt round-robin, the times are gathered)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..errors import EmbedStoreError, InvalidInputError

__all__ = ["Ranks", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when there is one, else ``cpu``; refuses what cannot run here."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {device}: no CUDA device is available; use --device "
                                "cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidInputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


class Ranks:
    """This process's place under ``torchrun`` (``rank``, ``world``, ``local``); a single
    process is rank 0 of a world of 1 and every collective is a no-op.

    Use as a context manager: the process group is initialised on entry when ``WORLD_SIZE > 1``
    (gloo on CPU, NCCL with one GPU per local rank) and destroyed on exit if it was ours.
    """

    def __init__(self, device: str):
        self.device = device
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank = 0
        self._own_group = False

    def __enter__(self) -> Ranks:
        if self.world > 1:
            if not dist.is_initialized():
                cuda = self.device.startswith("cuda")
                if cuda:
                    torch.cuda.set_device(self.local)  # before NCCL starts: one GPU per rank
                dist.init_process_group(backend="nccl" if cuda else "gloo")
                self._own_group = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device == "cuda":
                self.device = f"cuda:{self.local}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
        self._own_group = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def share(self, items: list) -> list:
        """This rank's share of ``items`` (round-robin)."""
        return items[self.rank :: self.world]

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and hand every rank its (picklable) result -- or the
        library error it raised, so no rank is left waiting at a barrier. Also a barrier: ranks
        > 0 return only after rank 0 is done."""
        value, err = None, None
        if self.rank == 0:
            try:
                value = fn()
            except EmbedStoreError as e:
                err = e
        if self.world > 1:
            box = [(value, None if err is None else (type(err), str(err)))]
            dist.broadcast_object_list(box, src=0)
            value, sent = box[0]
            if err is None and sent is not None:
                err = sent[0](sent[1])
        if err is not None:
            raise err
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (also a barrier)."""
        if self.world <= 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out
