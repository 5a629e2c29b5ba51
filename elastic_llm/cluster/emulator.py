"""Replay a spot trace on a `LocalCluster`: real worker processes join, get notices, and die.

Dask mechanisms used (all on the cluster's own event loop, so nothing races with it):

* **Acquire**: a `SpecCluster` (a `LocalCluster` is one) starts whatever its ``worker_spec`` dict
  names. The emulator adds an entry named after the instance, built from the cluster's
  ``new_spec`` (a `Nanny` when ``processes=True``) with `InstanceMetadata` among its plugins, and
  awaits the cluster, which starts the new worker process. The scheduler sees the instance's
  metadata in the worker's registration.
* **Preempt**: a `PreemptionNotice` with ``deadline = now + grace`` goes to the scheduler's
  `NoticeBoard` first; at the deadline the instance is killed.
* **Kill** (also without notice): the entry leaves ``worker_spec`` and ``cluster.workers`` in one
  step (so the cluster neither restarts it nor retires it gracefully), the nanny is told not to
  restart its worker (``Nanny.close_gracefully`` only sets that flag), the worker process gets
  SIGKILL, and the nanny then closes itself, as the whole machine would vanish. No data is moved,
  no worker says goodbye: the scheduler learns of the loss from the broken connection.

Times: trace offsets and the grace period are divided by ``time_scale`` (60 replays a minute of
trace per second). The initial fleet (offset 0) is started before the clock starts, so slow
process start-up does not shift the trace. Acquisitions later in the trace take as long as a
worker process takes to start (real instances take minutes too).

From synchronous code: `start` / `wait` / `stop` (the replay runs on the cluster's loop thread).
From asynchronous code on the cluster's loop: ``await emulator.run()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from distributed import Nanny
from distributed.deploy.spec import SpecCluster

from elastic_llm.cluster.contracts import UNBOUNDED_MEMORY, InstanceInfo, Market, PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError, EmulatorError
from elastic_llm.cluster.instance import instance_metadata_options
from elastic_llm.cluster.notices import NoticeBoard, post_notice
from elastic_llm.cluster.traces import SpotEvent, SpotTrace

logger = logging.getLogger(__name__)

RecordKind = Literal["acquiring", "acquired", "notice", "killed", "failed", "end"]


@dataclass(frozen=True)
class EmulatorRecord:
    """One thing the emulator did."""

    wall_time: float  #: ``time.time()`` when it happened
    offset_s: float  #: trace offset (seconds of trace time) when it happened
    kind: RecordKind  #: what happened
    instance_id: str = ""  #: the instance concerned
    address: str = ""  #: its worker address, once known
    pid: int = 0  #: its worker process id (acquired, killed)
    detail: str = ""  #: notice: deadline and the board's verdict; failed: the error


class SpotEmulator:
    """Replays ``trace`` on ``cluster`` (a `LocalCluster` with ``processes=True``).

    ``time_scale`` compresses time; ``grace_s`` is the notice length in trace seconds (AWS: 120);
    ``memory_bytes`` is every emulated instance's memory budget; ``worker_options`` override the
    cluster's worker options for the emulated workers. The trace's instance ids become the
    workers' names.
    """

    def __init__(self, cluster: SpecCluster, trace: SpotTrace, *, time_scale: float = 1.0,
                 grace_s: float = 120.0, memory_bytes: int = UNBOUNDED_MEMORY,
                 worker_options: Mapping[str, Any] | None = None, kill_timeout_s: float = 30.0,
                 operator_token: str | None = None) -> None:
        spec = getattr(cluster, "new_spec", None) or {}
        cls = spec.get("cls")
        if not (isinstance(cls, type) and issubclass(cls, Nanny)):
            raise ClusterConfigError("SpotEmulator needs a cluster whose workers are processes under "
                                     "a Nanny (LocalCluster(processes=True))")
        if time_scale <= 0 or grace_s < 0 or kill_timeout_s <= 0:
            raise ClusterConfigError("time_scale and kill_timeout_s must be > 0, grace_s >= 0")
        self.cluster = cluster
        self.trace = trace
        self.time_scale = float(time_scale)
        self.grace_s = float(grace_s)
        self.memory_bytes = memory_bytes
        self.worker_options = dict(worker_options or {})
        self.kill_timeout_s = kill_timeout_s
        #: the NoticeBoard's operator token (None: read from the cluster's in-process scheduler)
        self.operator_token = operator_token
        self._records: list[EmulatorRecord] = []
        self._records_lock = threading.Lock()
        self._up: dict[str, asyncio.Event] = {}
        self._live: set[str] = set()
        self._clock_start: float | None = None  # loop.time() at trace offset 0
        self._future: Future[None] | None = None
        self._finished = threading.Event()  # set when run() has returned or been cancelled

    # ---- synchronous control -------------------------------------------------------------------
    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        loop: asyncio.AbstractEventLoop = self.cluster.loop.asyncio_loop
        return loop

    def start(self) -> None:
        """Start replaying in the background (returns at once)."""
        if self._future is not None:
            raise EmulatorError("this emulator has already been started")
        self._future = asyncio.run_coroutine_threadsafe(self.run(), self._loop)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the replay has ended (re-raises its error; `TimeoutError` after ``timeout``)."""
        if self._future is None:
            raise EmulatorError("the emulator has not been started")
        self._future.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop replaying: no further events, pending kills cancelled; live workers stay."""
        if self._future is None or self._future.done():
            return
        self._future.cancel()
        if not self._finished.wait(timeout):
            raise EmulatorError(f"the replay did not stop within {timeout}s")

    def preempt(self, instance_id: str, *, notice: bool = True, timeout: float = 120.0) -> None:
        """Take ``instance_id`` away now (with a notice and the grace period, or SIGKILL at once);
        blocks until its process is dead. Raises `EmulatorError` if it is not live."""
        if not asyncio.run_coroutine_threadsafe(self._remove(instance_id, notice=notice),
                                                self._loop).result(timeout):
            raise EmulatorError(f"{instance_id!r} is not a live emulated instance")

    def acquire(self, instance_id: str, *, market: Market = "spot", price_per_hour: float = 0.0,
                timeout: float = 120.0) -> str:
        """Start a new instance now; blocks until it is up and returns its worker address."""
        event = SpotEvent(self.offset_now(), "acquire", instance_id, market, price_per_hour)
        address = asyncio.run_coroutine_threadsafe(self._acquire(event), self._loop).result(timeout)
        if not address:
            raise EmulatorError(f"could not start {instance_id!r}: {self.records[-1].detail}")
        return address

    def acquire_soon(self, instance_id: str, *, market: Market = "spot",
                     price_per_hour: float = 0.0) -> Future[str]:
        """Start a new instance without waiting: the future gives its worker address once it is
        up, or "" if it could not start (the reason is in `records`). Callable from any thread,
        the cluster's own loop included (a Dask topic handler)."""
        event = SpotEvent(self.offset_now(), "acquire", instance_id, market, price_per_hour)
        return asyncio.run_coroutine_threadsafe(self._acquire(event), self._loop)

    def release_soon(self, address: str) -> Future[bool]:
        """Give back the instance whose worker is at `address`, without a notice (its owner has
        drained it) and without waiting: the future gives False if no live instance has it."""
        name = self.instance_at(address)
        if name is None:
            future: Future[bool] = Future()
            self._fail(address, "cannot release: no live instance has this worker address")
            future.set_result(False)
            return future
        return asyncio.run_coroutine_threadsafe(self._remove(name, notice=False), self._loop)

    def instance_at(self, address: str) -> str | None:
        """The live instance whose worker is at `address` (None: none)."""
        for name in sorted(self._live):
            nanny = self.cluster.workers.get(name)
            if nanny is not None and nanny.worker_address == address:
                return name
        return None

    # ---- state --------------------------------------------------------------------------------
    @property
    def records(self) -> tuple[EmulatorRecord, ...]:
        """What the emulator did so far, oldest first."""
        with self._records_lock:
            return tuple(self._records)

    @property
    def live(self) -> frozenset[str]:
        """Instances the emulator started and has not killed."""
        return frozenset(self._live)

    def offset_now(self) -> float:
        """Current trace offset (0 before the clock started)."""
        if self._clock_start is None:
            return 0.0
        return max(0.0, (self._loop.time() - self._clock_start) * self.time_scale)

    def instance_info(self, event: SpotEvent) -> InstanceInfo:
        """The metadata an acquired instance carries (its grace in wall seconds)."""
        return InstanceInfo(instance_id=event.instance_id, market=event.market,
                            price_per_hour=event.price_per_hour, memory_bytes=self.memory_bytes,
                            grace_s=self.grace_s / self.time_scale)

    # ---- the replay (on the cluster's loop) ---------------------------------------------------
    async def run(self) -> None:
        """Replay the whole trace; returns after its end, once every started action finished."""
        tasks: set[asyncio.Task[Any]] = set()
        try:
            await asyncio.gather(*(self._acquire(e) for e in self.trace.initial))
            self._clock_start = asyncio.get_running_loop().time()
            for event in self.trace.churn:
                await self._sleep_until(event.offset_s)
                action = (self._acquire(event) if event.action == "acquire"
                          else self._remove(event.instance_id, notice=event.action == "preempt"))
                tasks.add(asyncio.create_task(action, name=f"spot-{event.action}-{event.instance_id}"))
            await self._sleep_until(self.trace.duration_s)
            await asyncio.gather(*tasks)
            self._record("end", detail=self.trace.name)
        finally:
            for task in tasks:
                task.cancel()
            self._finished.set()

    async def _sleep_until(self, offset_s: float) -> None:
        assert self._clock_start is not None
        delay = self._clock_start + offset_s / self.time_scale - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _acquire(self, event: SpotEvent) -> str:
        name = event.instance_id
        if name in self.cluster.worker_spec or name in self._up:
            return self._fail(name, "instance id already in use")
        up = self._up[name] = asyncio.Event()
        spec = self.cluster.new_spec
        options = instance_metadata_options(self.instance_info(event),
                                            {**spec.get("options", {}), **self.worker_options})
        self.cluster.worker_spec[name] = {"cls": spec["cls"], "options": options}
        self._record("acquiring", name)
        try:
            await self.cluster  # SpecCluster starts what worker_spec names and is not running yet
            nanny = self.cluster.workers.get(name)
            address = nanny.worker_address if nanny is not None else None
            if not address:
                raise EmulatorError("worker did not start")
        except Exception as exc:
            self.cluster.worker_spec.pop(name, None)
            return self._fail(name, f"start failed: {exc!r}")
        finally:
            up.set()
        self._live.add(name)
        self._record("acquired", name, address=address, pid=nanny.pid or 0)
        return str(address)

    async def _remove(self, name: str, *, notice: bool) -> bool:
        if name in self._up:
            await self._up[name].wait()
        nanny = self.cluster.workers.get(name)
        if name not in self._live or nanny is None:
            self._fail(name, "cannot remove an instance that is not live")
            return False
        address = nanny.worker_address or ""
        if notice:
            grace = self.grace_s / self.time_scale
            deadline = time.time() + grace
            try:
                verdict = await post_notice(self.cluster.scheduler_comm,
                                            PreemptionNotice(address, name, deadline, "emulator"),
                                            self._operator_token())
            except Exception as exc:  # no NoticeBoard: the instance dies all the same
                verdict = f"not delivered: {exc!r}"
            self._record("notice", name, address=address, detail=f"deadline={deadline:.3f} {verdict}")
            await asyncio.sleep(max(0.0, deadline - time.time()))
        if name not in self._live:  # removed by someone else during the grace period
            return False
        await self._kill(name, address)
        return True

    async def _kill(self, name: str, address: str) -> None:
        # One step, no await in between: the cluster must neither restart nor retire it.
        nanny = self.cluster.workers.pop(name)
        self.cluster.worker_spec.pop(name, None)
        self._live.discard(name)
        pid = nanny.pid or 0
        nanny.close_gracefully(reason="elastic_llm spot emulator: instance lost")  # no restart
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(nanny.finished(), self.kill_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("nanny of %s did not close after SIGKILL; closing it", name)
            await nanny.close(timeout=self.kill_timeout_s)
        self._record("killed", name, address=address, pid=pid)

    # ---- records ------------------------------------------------------------------------------
    def _operator_token(self) -> str | None:
        """The NoticeBoard's operator token: given, or read from the cluster's own scheduler."""
        if self.operator_token is not None:
            return self.operator_token
        scheduler = getattr(self.cluster, "scheduler", None)
        board = getattr(scheduler, "plugins", {}).get(NoticeBoard.name)
        return None if board is None else board.operator_token

    def _record(self, kind: RecordKind, instance_id: str = "", *, address: str = "", pid: int = 0,
                detail: str = "") -> None:
        record = EmulatorRecord(time.time(), self.offset_now(), kind, instance_id, address, pid, detail)
        logger.info("spot emulator: %s", record)
        with self._records_lock:
            self._records.append(record)

    def _fail(self, name: str, detail: str) -> str:
        self._record("failed", name, detail=detail)
        return ""
