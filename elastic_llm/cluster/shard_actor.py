"""`ShardActor`: one position of a sharded replica on a Dask worker (a `ShardRuntime` behind an actor).

The runtime's calls block: a pipeline hand-off or a tensor all-reduce waits for the peers on other
workers, a migration waits for every sender. So they never run on the worker's event loop (which
must keep heartbeating) nor on the worker's one actor thread (shared by every actor on the worker):
each actor owns a thread that runs its runtime's calls one at a time, in arrival order. `call` is an
``async`` method: it runs on the event loop only long enough to queue the call, then awaits the
thread's answer, so many calls (and other actors) proceed meanwhile.

`torch.distributed`'s default process group is per process: one `ShardActor` per worker process.

Weights from another replica: a shard of a new replica pulls the slices its plan names a peer
shard for (`PeerShard`: the peer's worker address and actor key) with an actor call to that
peer's `call` (`read_weights`), worker to worker, made from this actor's own thread (not the
event loop, not the worker's actor thread: both stay free, and the call waits on the loop like
any blocking client call). The peer runs it in its own thread between its steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from elastic_llm.cluster.serialization import register_tensor_serializer
from elastic_llm.engine.replica.errors import ReplicaWorkerError
from elastic_llm.engine.replica.messages import ModelSource, PeerShard
from elastic_llm.engine.replica.transport import Call, Reply, serve_call
from elastic_llm.engine.replica.wire import from_wire, to_wire

if TYPE_CHECKING:
    import torch

    from elastic_llm.engine.replica.pieces import TensorPiece

#: How long the constructor waits for the runtime to be built in the actor's thread.
# Every process that holds this actor must decode tensors the way its callers encode them: a
# client process that registered our serializer (e.g. after an in-process worker ran) sending to
# a worker still on Dask's own made the actor call hang. So the serializer is registered as soon
# as the actor's class is imported (unpickling an actor imports it before any call arrives).
register_tensor_serializer()

_START_TIMEOUT_S = 120.0
#: How long one pull of weight pieces from a peer shard may take.
_PULL_TIMEOUT_S = 60.0


class ShardActor:
    """A `ShardRuntime` on this worker, driven by a `ShardedDriver` over `DaskActorTransport`.

    Args:
        name: the shard's name in transfer lists (the driver uses the worker's address).
        source: where to read the model's slices (a path every worker can read).
        device_index: GPU index on CUDA (ignored on CPU).
        threads: torch threads in this worker process (workers share few cores: 1 by default).
    """

    def __init__(self, name: str, source: ModelSource, device_index: int = 0, threads: int = 1) -> None:
        from distributed import get_worker

        self.name = name
        try:
            self._worker: Any = get_worker()  # the actor proxies of peers are bound to it
        except ValueError:  # not on a worker: no pulls from peers (their slices read the checkpoint)
            self._worker = None
        self._peers: dict[str, Any] = {}  # actor key -> proxy of a peer shard
        self._calls: queue.SimpleQueue[tuple[Call, concurrent.futures.Future[Reply]] | None] = \
            queue.SimpleQueue()
        self._finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(source, device_index, threads, started),
                                        name=f"shard-{name}", daemon=True)
        self._thread.start()
        started.result(_START_TIMEOUT_S)  # raises what the runtime's constructor raised

    async def call(self, call: Call) -> Reply:
        """Run `call` on the runtime in this actor's thread; its `Reply` (never raises for the
        runtime's own failures: they come back as a not-ok reply with the traceback)."""
        answer: concurrent.futures.Future[Reply] = concurrent.futures.Future()
        self._calls.put((call, answer))
        return await asyncio.wrap_future(answer)

    async def info(self) -> dict[str, object]:
        """The shard's name and the hosting process's id."""
        return {"name": self.name, "pid": os.getpid()}

    def _read_peer(self, peer: PeerShard, pieces: Sequence[TensorPiece]) -> list[torch.Tensor]:
        """(`PeerReader`, in this actor's thread) pull `pieces` from `peer`'s runtime."""
        from distributed.actor import Actor

        if not peer.address or not peer.handle or self._worker is None:
            raise ReplicaWorkerError(f"peer {peer.name} cannot be reached over Dask")
        actor = self._peers.get(peer.handle)
        if actor is None:
            actor = self._peers[peer.handle] = Actor(ShardActor, peer.address, peer.handle, worker=self._worker)
        reply: Reply = actor.call(Call("read_weights", to_wire({"pieces": list(pieces)}))).result(
            timeout=_PULL_TIMEOUT_S)
        if not reply.ok:
            raise ReplicaWorkerError(f"peer {peer.name} failed to send weights:\n{reply.error}")
        return from_wire(reply.value)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Let the thread finish its queued calls, leave the process group and exit; returns
        when it has (the caller bounds the wait: a thread stuck in a collective with a dead peer
        only gets here after the group's timeout)."""
        self._calls.put(None)
        await asyncio.wrap_future(self._finished)

    def _serve(self, source: ModelSource, device_index: int, threads: int,
               started: concurrent.futures.Future[None]) -> None:
        import torch

        from elastic_llm.engine.replica.runtime import ShardRuntime

        try:
            torch.set_num_threads(threads)
            runtime = ShardRuntime(self.name, source, device_index, peer_reader=self._read_peer)
        except BaseException as exc:
            started.set_exception(exc)
            self._finished.set_result(None)
            return
        started.set_result(None)
        try:
            while (item := self._calls.get()) is not None:
                call, answer = item
                if answer.set_running_or_notify_cancel():
                    answer.set_result(serve_call(runtime, call))
        finally:
            try:
                runtime.close()
            finally:
                self._finished.set_result(None)
