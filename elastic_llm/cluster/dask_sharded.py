"""A sharded (P x M) replica whose shards are `ShardActor`s on Dask workers.

`DaskShardedExecutor` is the sharded replica's driver (`ShardedDriver`: step plans, micro-batches,
KV export / import / release, reconfiguration with KM mapping and slice migration) over
`DaskActorTransport`: each shard is a `ShardActor` on its own worker process, named by the worker's
address. Activations, all-reduces and migrated slices go shard to shard over `torch.distributed`
(gloo on CPU); the driver only sends step plans and gathers the last stage's logits.

Every call of a step is dispatched to all shards before any answer is awaited (a collective needs
all of them inside it at once), and the gather returns as soon as one shard fails or its worker is
lost, raising `ReplicaWorkerError`; the rendezvous `TCPStore` lives in the driver's process, on the
address its host uses to reach the scheduler (so every worker can reach it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from distributed import Client
from distributed.actor import Actor, BaseActorFuture
from distributed.utils import get_ip

from elastic_llm.engine.replica.errors import ReplicaConfigError, ReplicaTimeoutError, ReplicaWorkerError
from elastic_llm.engine.replica.messages import ModelSource, PeerShard
from elastic_llm.engine.replica.sharded_executor import ShardedDriver, model_source
from elastic_llm.engine.replica.transport import Call, Reply
from elastic_llm.engine.replica.wire import from_wire
from elastic_llm.model.loader import LoadedModel
from elastic_llm.planning.config import ParallelConfig

from .shard_actor import ShardActor

#: Seconds a stop waits for the shards to acknowledge before their actors are dropped anyway.
_STOP_TIMEOUT_S = 5.0


def rendezvous_host(client: Client) -> str:
    """The address of this process that the cluster's workers can reach: loopback when the
    scheduler is on loopback, else the local interface that routes to the scheduler."""
    host = urlparse(client.scheduler.address).hostname or "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:  # a host name
        if host == "localhost":
            return "127.0.0.1"
    return get_ip(host)


class DaskActorTransport:
    """`ShardTransport` over `ShardActor`s: the shard named by a worker's address lives there.

    Args:
        client: a Dask client of the cluster (its event loop carries the calls).
        timeout_s: limit on every answer from a shard.
        threads: torch threads in each shard's worker process.
    """

    def __init__(self, client: Client, timeout_s: float = 120.0, threads: int = 1) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.threads = threads
        self.rendezvous_host = rendezvous_host(client)
        self._actors: dict[str, Actor] = {}
        self._futures: dict[str, Any] = {}  # the actors' futures: holding them keeps the actors alive
        self._pids: dict[str, int | None] = {}

    def start(self, names: Sequence[str], source: ModelSource) -> None:
        """Create a `ShardActor` on each named worker (all at once) and wait until each is ready."""
        known = set(self.client.scheduler_info(n_workers=-1)["workers"])
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ReplicaConfigError(f"not workers of this cluster: {unknown}")
        futures = {name: self.client.submit(ShardActor, name, source, 0, self.threads, actor=True,
                                            workers=[name], allow_other_workers=False, pure=False,
                                            key=f"shard-actor-{name}-{os.urandom(4).hex()}")
                   for name in names}
        self._futures.update(futures)
        for name, future in futures.items():
            try:
                actor = future.result(timeout=self.timeout_s)
            except TimeoutError:
                raise ReplicaTimeoutError(f"shard on {name} did not start within "
                                          f"{self.timeout_s:.0f} s") from None
            except Exception as exc:
                raise ReplicaWorkerError(f"shard on {name} failed to start: {exc!r}") from exc
            if actor._client is None and actor._worker is None:  # noqa: SLF001
                # the proxy binds itself to the default client or the current worker only: a
                # client that is neither (a replica's own) must be bound explicitly
                actor._client, actor._future = self.client, future  # noqa: SLF001
            self._actors[name] = actor
        infos = self._gather([(name, self._dispatch(name, "info")) for name in names], "start")
        self._pids.update((name, info["pid"]) for name, info in zip(names, infos, strict=True))

    def call(self, calls: Sequence[tuple[str, Call]], what: str) -> list[Any]:
        """Dispatch every call (each an `async` actor method: all are in flight at once), then
        gather; raises as soon as one shard fails or its worker is lost."""
        missing = [name for name, _ in calls if name not in self._actors]
        if missing:
            raise ReplicaWorkerError(f"no shard on {missing}")
        replies: list[Reply] = self._gather(
            [(name, self._dispatch(name, "call", call)) for name, call in calls], what)
        values = []
        for (name, _), reply in zip(calls, replies, strict=True):
            if not reply.ok:
                raise ReplicaWorkerError(f"worker {name} failed in {what!r}:\n{reply.error}")
            values.append(from_wire(reply.value))
        return values

    def stop(self, names: Sequence[str]) -> None:
        """Ask these shards to leave their group and exit, wait a few seconds at most, then drop
        their actors (a shard stuck in a collective with a dead peer exits after its timeout)."""
        pending = []
        for name in names:
            if name in self._actors:
                try:
                    pending.append((name, self._dispatch(name, "close")))
                except ReplicaWorkerError:
                    pass  # a lost worker took its shard with it
        try:
            self._gather(pending, "stop", timeout_s=_STOP_TIMEOUT_S)
        except ReplicaWorkerError:
            pass
        finally:
            for name in names:
                self._actors.pop(name, None)
                self._pids.pop(name, None)
                future = self._futures.pop(name, None)
                if future is not None:
                    future.release()

    def pids(self) -> dict[str, int | None]:
        """Worker address -> process id of that worker."""
        return dict(self._pids)

    def handle(self, name: str) -> str:
        """The key of the `ShardActor` on worker `name` (a peer's shard pulls from it by key)."""
        actor = self._actors.get(name)
        return "" if actor is None else str(actor.key)

    def close(self) -> None:
        """Stop every shard (and drop actors that never finished starting)."""
        self.stop(list(self._futures))

    def _dispatch(self, name: str, method: str, *args: Any) -> BaseActorFuture[Any]:
        """Start one actor call (it runs on the client's event loop; this returns at once)."""
        try:
            return getattr(self._actors[name], method)(*args)  # type: ignore[no-any-return]
        except RuntimeError as exc:  # Dask: "Worker holding Actor was lost"
            raise ReplicaWorkerError(f"worker {name} is lost: {exc}") from exc

    def _gather(self, pending: Sequence[tuple[str, BaseActorFuture[Any]]], what: str,
                timeout_s: float | None = None) -> list[Any]:
        """Wait for every already-dispatched actor call on the client's event loop, failing fast."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        names = [name for name, _ in pending]

        async def wait_all() -> list[Any]:
            async def one(future: BaseActorFuture[Any]) -> Any:
                return await future

            tasks = [asyncio.ensure_future(one(future)) for _, future in pending]
            try:
                done, waiting = await asyncio.wait(tasks, timeout=limit,
                                                   return_when=asyncio.FIRST_EXCEPTION)
                for name, task in zip(names, tasks, strict=True):
                    if task in done and task.exception() is not None:
                        exc = task.exception()
                        raise ReplicaWorkerError(f"worker {name} died or was lost during {what!r}: "
                                                 f"{type(exc).__name__}: {exc}") from exc
                if waiting:
                    late = ", ".join(n for n, t in zip(names, tasks, strict=True) if t in waiting)
                    raise ReplicaTimeoutError(f"no answer to {what!r} from {late} within {limit:.0f} s")
                return [task.result() for task in tasks]
            finally:
                for task in tasks:
                    task.cancel()

        if not pending:
            return []
        return self.client.sync(wait_all)  # type: ignore[no-any-return]


class DaskShardedExecutor(ShardedDriver):
    """One P x M replica over `ShardActor`s on `workers`, behind the engine's `Executor` contract.

    ``LLMEngine(model, executor=DaskShardedExecutor(client, model, ParallelConfig(D=1, P=2, M=1,
    B=8), workers=[a, b]))`` serves with it; ``reconfigure(parallel, workers=[...])`` switches the
    live replica to another (P, M) and / or another set of workers (at least P*M: workers not
    named hand over their slices and KV, then their shards stop) keeping every request's KV.

    Args:
        client: a Dask client of the cluster.
        model: a `LoadedModel` or a checkpoint directory that every worker can read.
        parallel: the first configuration (D must be 1).
        workers: worker addresses for it, one shard each, one shard per worker process.
        peers: shards of other live replicas (their `shard_sources()`) to take weight slices
            from; the checkpoint gives only what none of them holds (or a pull that fails).
        device: "cpu" (gloo) or "cuda" (NCCL, one GPU per worker).
        micro_batches: micro-batches per step (default P).
        timeout_s: limit on every answer from a shard and on every collective.
        threads: torch threads in each shard's worker process.
    """

    def __init__(self, client: Client, model: LoadedModel | str | os.PathLike[str],
                 parallel: ParallelConfig, *, workers: Sequence[str], peers: Sequence[PeerShard] = (),
                 device: str = "cpu", micro_batches: int | None = None, timeout_s: float = 120.0,
                 threads: int = 1) -> None:
        super().__init__(model_source(model, device), DaskActorTransport(client, timeout_s, threads),
                         parallel, workers=workers, peers=peers, micro_batches=micro_batches,
                         timeout_s=timeout_s)

    def __enter__(self) -> DaskShardedExecutor:
        return self
