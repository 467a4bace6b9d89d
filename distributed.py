"""
distributed: what musicrnn.py train needs to run as N processes under torchrun.

    python musicrnn.py train --procs 2          # launched: torchrun's launcher, started for you
    torchrun --standalone --nproc_per_node=2 musicrnn.py train
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 musicrnn.py train

Holds launched (train --procs N: the command again, as N ranks of this machine), session (the
with-block a training runs in), exit_process (how a rank leaves) and World: this process's rank
among world size processes, started from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE), with gloo on CPU and NCCL on GPU; its share of a batch (rank_rows); the sums and broadcasts
that keep the ranks in step; and the thread count chosen so that the processes of one machine fill
its cores without oversubscribing them. Without torchrun, World() is one process and every call is a
no-op.

The gradients themselves are averaged by DistributedDataParallel; nothing here all-reduces
them by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cli import Terminated, UserError, torchrun_worker


class PeerLost(UserError):
    """Another process of the training stopped: this one cannot go on alone."""

    every_rank = True  # the rank that says so may be any one: the one that stopped may have said nothing


def launched(procs: int, command: list[str]) -> bool:
    """`musicrnn.py train --procs N`: True once the command has run as N processes of this machine,
    started by torchrun's own launcher (torch.distributed.run --standalone); False where this process
    is to train (N = 1, or it is one of the ranks). What a rank can tell the user it prints itself,
    as one line (rank 0 alone, cli.error_line); torchrun's report of a failed rank, a traceback of
    its own, is left out, and its exit code kept: 2 for a user's error."""
    worker = torchrun_worker()
    if worker:
        if procs not in (1, worker["LOCAL_WORLD_SIZE"]):
            raise UserError("--procs starts the processes itself: under torchrun, leave it out "
                            "(--nproc_per_node sets them)")
        return False
    if procs == 1:
        return False
    cores = usable_cores()
    if procs > cores:  # each rank trains on a core of its own: more ranks only wait on each other (64 on 2
        # cores: gloo's connections time out, measured)
        raise UserError(f"--procs {procs}: this command has {cores} cores to run on; give at most {cores}")
    import logging
    import sys

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):  # each has a level of its own (its LOGLEVEL)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's banner, else; start() sets each rank's threads
    try:
        torchrun.main(["--standalone", f"--nproc_per_node={procs}", *command])
    except ChildFailedError as e:
        sys.exit(2 if e.get_first_failure()[1].exitcode == 2 else 1)
    except SignalException as e:  # Ctrl-C or a kill reached the launcher, which stopped the ranks
        raise (Terminated if e.sigval == signal.SIGTERM else KeyboardInterrupt) from None
    return True


def rank_rows(batch, rank: int, size: int):
    """Rank's rows of a global batch split over size processes: every size-th, from its rank. Rows are
    sorted by length within a batch, so the shares' lengths are alike."""
    return batch[rank::size]


@dataclass
class World:
    rank: int = 0          # this process, 0..size-1; rank 0 alone writes checkpoints, logs and plots
    size: int = 1          # processes in the training
    local_rank: int = 0    # this process on its machine: its GPU with --device cuda
    local_size: int = 1    # processes on this machine, which share its cores

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch (rank_rows)."""
        return rank_rows(batch, self.rank, self.size)

    def sum(self, value: float) -> float:
        """value summed over the ranks (in float64: the same digits as one process)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return float(tensor.item())

    def from_writer(self, value: float) -> float:
        """Rank 0's value, on every rank: decisions made once (the clock, early stopping)."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def gather_shares(self, items: list) -> list:
        """Every rank's share(...) of a list, put back in order on every rank."""
        if self.size == 1:
            return items
        shares = [None] * self.size
        dist.all_gather_object(shares, items)
        whole = [None] * sum(len(share) for share in shares)
        for rank, share in enumerate(shares):
            whole[rank::self.size] = share
        return whole

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


# what a collective says when another process has died: gloo closes the connection, NCCL times out
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|timed? ?out|NCCL", re.I)


@contextlib.contextmanager
def session(device_name: str):
    """(World, device name) for the training inside: joined from torchrun's environment by
    start, left at the end. An all-reduce (DistributedDataParallel's, or ours) that fails
    because another process died becomes one clear error line instead of a traceback;
    torchrun then stops the job and names the process that failed first."""
    world, device = start(device_name)
    try:
        yield world, device
    except (RuntimeError, dist.DistBackendError) as e:
        if world.size == 1 or not _PEER_LOST.search(str(e)):
            raise
        raise PeerLost(f"rank {world.rank}: another process of this training stopped; `--resume` under torchrun "
                       f"continues from the last checkpoint") from None
    else:
        if world.size > 1:
            dist.barrier()  # ranks leave together: one gone early breaks another's last collective
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def start(device_name: str) -> tuple[World, str]:
    """The World torchrun describes (or one process), the device name to use, and the threads
    set for this process. Joins the process group when there are several ranks."""
    worker = torchrun_worker()
    if worker:  # started by torchrun, which sets OMP_NUM_THREADS=1
        torch.set_num_threads(threads_per_process(worker["LOCAL_WORLD_SIZE"]))
        end_with_launcher()
    if not worker or worker["WORLD_SIZE"] == 1:
        return World(), device_name
    world = World(worker["RANK"], worker["WORLD_SIZE"], worker["LOCAL_RANK"], worker["LOCAL_WORLD_SIZE"])
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return world, f"cuda:{world.local_rank}" if cuda else "cpu"


def end_with_launcher() -> None:
    """A rank ends when its launcher does, even one killed outright (a launcher killed by SIGKILL stops
    nobody: its ranks would train on, holding the run's lock). Linux's PR_SET_PDEATHSIG sends this rank
    SIGTERM then."""
    if sys.platform != "linux":
        return
    launcher = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FAILED_RANK_WAIT = 5.0  # seconds a failed rank other than 0 waits before it leaves (torchrun ends it sooner)


def exit_process(code: int) -> None:
    """sys.exit(code); a rank of several torchrun workers leaves without finalizing Python instead, once
    its exit handlers have run and its output is flushed. DistributedDataParallel keeps gloo's
    process group, and its worker threads, alive after destroy_process_group (torch 2.13). A worker
    thread that frees a finished collective's tensors while Python finalizes needs the GIL, cannot
    take it, and aborts the rank: SIGABRT, "terminate called without an active exception", a failed
    run after a complete one (measured: 4 of 130 of the tests' 2-process trainings beside two busy
    loops; see pytorch/pytorch#179291)."""
    worker = torchrun_worker()
    if not worker or worker["WORLD_SIZE"] == 1:
        sys.exit(code)
    if code and worker["RANK"]:  # rank 0 says why a training failed (cli.error_line), and torchrun stops every
        time.sleep(FAILED_RANK_WAIT)  # rank once one has failed: the others leave after it, not before it spoke
    atexit._run_exitfuncs()  # what the exit handlers do still happens (matplotlib removes its temporary folder)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or None (`>&-`): nothing to say
            stream.flush()
    os._exit(code)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or `taskset`'s share)."""
    return len(os.sched_getaffinity(0))


def threads_per_process(local_size: int, cores: int | None = None) -> int:
    """The machine's cores shared evenly by its processes, at least one each. torchrun sets
    OMP_NUM_THREADS=1 for safety; on a CPU-only run that would leave cores idle."""
    cores = cores or usable_cores()
    return max(1, cores // local_size)


def describe(world: World, device: torch.device) -> str:
    threads = f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"
    if world.size == 1:
        return f"1 process, {threads}, device {device}"
    return (f"{world.size} processes ({world.local_size} on this machine), {threads} each, {dist.get_backend()}, "
            f"device {device} on rank 0")


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The model that training steps through: DistributedDataParallel averages the gradients
    of every backward over the ranks (and starts every rank from rank 0's weights)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

