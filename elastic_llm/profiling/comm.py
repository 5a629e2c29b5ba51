"""Timing communication between real processes: gloo all-reduce and stage-to-stage hops.

`measure_group` spawns ``world`` processes (``torch.multiprocessing``, spawn context) that join one
gloo group over TCP on the loopback interface and time, for every row count asked, an all-reduce
of a ``[rows, hidden]`` float32 tensor (what a tensor-parallel layer sums twice) and, between ranks
0 and 1, a send/recv of the same tensor (what a pipeline stage hands to the next). The row
counts are timed round-robin, every timed call after a few untimed ones of its shape and a
barrier, and a hop is timed as half a ping-pong round trip. Rank 0 reports medians through a
queue. Workers run ``threads`` torch threads each.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastic_llm.profiling.errors import CommProfilingError
from elastic_llm.profiling.timing import interleaved_medians

#: Seconds allowed for spawned workers to start (import torch) on top of the measuring timeout.
STARTUP_SECONDS = 60.0
#: Untimed operations on the largest tensor before any timing (gloo's first calls are slow).
CONNECTION_WARMUP = 5
#: Untimed operations of the same shape before each timed one.
SETTLE_CALLS = 3


@dataclass(frozen=True)
class CommJob:
    """What one group of worker processes measures."""

    world: int  #: processes in the group (>= 2)
    rows: tuple[int, ...]  #: row counts of the ``[rows, hidden]`` tensors
    hidden: int  #: hidden size (tensor width)
    hop: bool  #: also time rank 0 -> rank 1 send/recv
    repeats: int  #: timed repetitions (median kept)
    warmup: int  #: untimed repetitions first
    threads: int  #: torch threads per worker
    timeout: float  #: seconds for the collective operations (gloo timeout)


@dataclass(frozen=True)
class GroupTimes:
    """Median seconds measured by one group, by row count."""

    all_reduce: Mapping[int, float]  #: rows -> one all-reduce over the whole group
    hop: Mapping[int, float]  #: rows -> one-way send from rank 0 to rank 1 (empty if not asked)


def measure_group(job: CommJob) -> GroupTimes:
    """Spawn ``job.world`` gloo workers on loopback, run ``job``, return rank 0's medians.

    Raises:
        CommProfilingError: a worker exited with an error, or no result came within
            ``job.timeout + STARTUP_SECONDS`` seconds (the workers are then terminated).
    """
    if job.world < 2:
        raise CommProfilingError("a communication group needs at least 2 processes")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    workers = [ctx.Process(target=_worker, args=(rank, address, job, results), daemon=True,
                           name=f"elastic-llm-comm-{rank}") for rank in range(job.world)]
    for worker in workers:
        worker.start()
    try:
        message = _await_result(results, workers, job.timeout + STARTUP_SECONDS)
    finally:
        for worker in workers:
            worker.join(timeout=10)
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=10)
    if message[0] != "ok":
        raise CommProfilingError(f"communication worker failed: {message[1]}")
    return GroupTimes(all_reduce=message[1], hop=message[2])


def _await_result(results: Any, workers: Sequence[Any], timeout: float) -> tuple[Any, ...]:
    """Rank 0's message, or an error as soon as a worker dies without one, or at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return tuple(results.get(timeout=0.2))
        except queue.Empty:
            failed = [w for w in workers if w.exitcode not in (None, 0)]
            if failed:
                try:  # a failing worker reports its exception just before it exits
                    return tuple(results.get(timeout=1.0))
                except queue.Empty:
                    return ("error", f"{failed[0].name} exited with code {failed[0].exitcode}")
    raise CommProfilingError(f"no communication result within {timeout:.0f} s from the gloo "
                             f"group of {len(workers)} processes on 127.0.0.1")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, address: str, job: CommJob, results: Any) -> None:
    """Entry point of one spawned worker process."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(job.threads)
    try:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=job.world,
                                timeout=timedelta(seconds=job.timeout))
        try:
            _warm_up(job)
            reduce_times = _timed(job, _all_reduce)
            hop_times = ({rows: rtt / 2 for rows, rtt in _timed(job, _ping_pong).items()}
                         if job.hop else {})
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        results.put(("error", f"rank {rank}: {exc!r}"))
        raise
    if rank == 0:
        results.put(("ok", reduce_times, hop_times))


def _warm_up(job: CommJob) -> None:
    """A few untimed all-reduces and hops of the largest tensor (connections, buffers)."""
    tensor = torch.zeros(max(job.rows), job.hidden, dtype=torch.float32)
    for _ in range(CONNECTION_WARMUP):
        _all_reduce(tensor, dist.get_rank())
        if job.hop:
            _ping_pong(tensor, dist.get_rank())


def _timed(job: CommJob, operation: Callable[[torch.Tensor, int], None]) -> dict[int, float]:
    """Median seconds of ``operation`` on a ``[rows, hidden]`` tensor for each row count, the row
    counts timed round-robin. Each timed call follows `SETTLE_CALLS` untimed ones of the same shape
    and a barrier: right after a larger operation, small hops measured up to 8x slower."""
    rank = dist.get_rank()
    tensors = {rows: torch.zeros(rows, job.hidden, dtype=torch.float32)  # sums stay finite
               for rows in job.rows}
    calls = {rows: partial(operation, tensor, rank) for rows, tensor in tensors.items()}

    def settle(rows: int) -> None:
        for _ in range(SETTLE_CALLS):
            calls[rows]()
        dist.barrier()

    return interleaved_medians(calls, job.repeats, job.warmup, before=settle)


def _all_reduce(tensor: torch.Tensor, rank: int) -> None:
    dist.all_reduce(tensor)


def _ping_pong(tensor: torch.Tensor, rank: int) -> None:
    """Rank 0 sends to rank 1 and waits for it to send back; other ranks stay out."""
    if rank == 0:
        dist.send(tensor, 1)
        dist.recv(tensor, 1)
    elif rank == 1:
        dist.recv(tensor, 0)
        dist.send(tensor, 0)
