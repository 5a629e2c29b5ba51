"""`ShardedExecutor`: one replica as P pipeline stages x M tensor ranks in P*M local processes.

The driver logic lives in `ShardedDriver`, which reaches its shards through a `ShardTransport`:
`ShardedExecutor` is the driver over local processes and pipes, and
`elastic_llm.cluster.dask_sharded.DaskShardedExecutor` the same driver over Dask actors.

It implements the engine's `Executor` contract, so ``LLMEngine(model, executor=ShardedExecutor(
model, ParallelConfig(D=1, P=2, M=2, B=8)))`` serves with it. The driver (this object, in the
engine's process) holds no weights: it splits each step into micro-batches, sends the step to
every worker over its pipe, and gathers the last stage's logits. Hidden states hop stage to stage
and the tensor-parallel all-reduce runs inside the workers' `torch.distributed` group.

`reconfigure` switches the live replica to another (P, M): a new configuration epoch in the same
processes (more are started or some stopped when P*M changes), the KM mapper and the migration
planner decide who sits where and which slices move, and the requests' KV stays without
recompute. Starting up is the same path from nothing: every slice comes from the checkpoint.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from elastic_llm.engine.executor import StepWork
from elastic_llm.engine.replica.errors import ReplicaConfigError, ReplicaError, ReplicaWorkerError
from elastic_llm.engine.replica.kv import full_kv_check, merge_kv, slice_kv
from elastic_llm.engine.replica.layout import ShardLayout, check_config, replica_layouts
from elastic_llm.engine.replica.messages import (
    GroupSpec,
    MicroBatch,
    MigrationOrders,
    MigrationStats,
    ModelSource,
    PeerShard,
    StepPlan,
)
from elastic_llm.engine.replica.process import LocalProcessTransport
from elastic_llm.engine.replica.reconfig import ReconfigurationPlan, plan_reconfiguration
from elastic_llm.engine.replica.report import (
    ReconfigurationReport,
    StageReady,
    TransferRecord,
    stage_ready,
    transfer_records,
)
from elastic_llm.engine.replica.transport import Call, ShardTransport
from elastic_llm.engine.replica.wire import to_wire
from elastic_llm.model.checkpoint import resolve_checkpoint
from elastic_llm.model.kv_cache import KVState
from elastic_llm.model.loader import LoadedModel, read_config
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Placement
from elastic_llm.planning.errors import MemoryBoundError
from elastic_llm.planning.slices import Slice

__all__ = ["ReconfigurationReport", "ShardedDriver", "ShardedExecutor", "StageReady",
           "TransferRecord", "model_source", "split_micro_batches"]

class ShardedDriver:
    """The driver of one sharded replica behind the engine's `Executor` contract, over any
    `ShardTransport` (it holds no weights).

    It splits each step into micro-batches, sends the step to every shard and gathers the last
    stage's logits; it assembles and slices KV for export and import; and `reconfigure` runs the
    KM mapping and the migration planner, forms each epoch's process groups on its own TCPStore
    (the rendezvous, hosted in this process on the transport's `rendezvous_host`) and hands every
    shard its migration orders. Subclasses pick the transport and how new shards are named.

    Args:
        source: where the shards read the model.
        transport: how the shards are started and called.
        parallel: the first configuration (D must be 1; B is not used here, the engine batches).
        workers: names of the shards to place it on (None: `_new_names` picks them).
        peers: shards of other live replicas the start takes weight slices from (what none of
            them holds is read from the checkpoint; see `reconfigure`).
        micro_batches: micro-batches per step (default P, capped at the step's works).
        timeout_s: limit on every collective (the transport has its own limit on answers).
    """

    def __init__(self, source: ModelSource, transport: ShardTransport, parallel: ParallelConfig, *,
                 workers: Sequence[str] | None = None, peers: Sequence[PeerShard] = (),
                 micro_batches: int | None = None, timeout_s: float = 120.0) -> None:
        self._source = source
        self.spec: ModelSpec = source.spec
        self.timeout_s = timeout_s
        #: micro-batches per step (None: P); may be changed between steps
        self.micro_batches = micro_batches
        self._backend = "nccl" if source.device == "cuda" else "gloo"
        self._transport = transport
        self._store: dist.TCPStore | None = None
        self._members: list[str] = []  # live shards, in the order they were started
        self._placement: Placement | None = None
        self._layouts: tuple[ShardLayout, ...] = ()
        self._lengths: dict[str, int] = {}
        self._released: list[str] = []
        self._epoch = 0
        self._failure: str | None = None
        self._closed = False
        try:
            self._store = dist.TCPStore(transport.rendezvous_host, 0, is_master=True,
                                        wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
            #: the start-up report (every slice from `peers` or the checkpoint)
            self.start_report = self.reconfigure(parallel, workers=workers, peers=peers)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ introspection
    @property
    def parallel(self) -> ParallelConfig:
        """The configuration running now."""
        assert self._placement is not None
        return self._placement.config

    @property
    def placement(self) -> Placement:
        """Which shard holds which position now."""
        assert self._placement is not None
        return self._placement

    @property
    def epoch(self) -> int:
        """The process-group epoch running now (grows with every reconfiguration)."""
        return self._epoch

    @property
    def transport(self) -> ShardTransport:
        """How this driver reaches its shards."""
        return self._transport

    def worker_pids(self) -> dict[str, int | None]:
        """Shard name -> id of the process hosting it."""
        return self._transport.pids()

    def describe(self) -> list[dict[str, object]]:
        """Each shard's layout and bytes held, in canonical position order."""
        return self._call("describe")

    def shard_sources(self) -> list[PeerShard]:
        """This replica's shards as another replica's `peers` (canonical position order); each
        serves pulls of the weights it holds now (`ShardRuntime.read_weights`)."""
        config = self.parallel
        return [PeerShard(name, (config.P, config.M), pos.stage, pos.rank, name,
                          self._transport.handle(name))
                for pos, name in self.placement.items()]

    # ------------------------------------------------------------------ Executor contract
    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token of one request over all shards (all layers, all KV heads)."""
        element = torch.empty((), dtype=getattr(torch, self._source.dtype)).element_size()
        return 2 * self.spec.num_layers * self.spec.num_kv_heads * self.spec.head_dim * element

    def execute(self, works: Sequence[StepWork]) -> torch.Tensor:
        """One replica step over `works`; logits ``[n_sampled, vocab]`` (float32, CPU) in order."""
        self._check_usable()
        if not works:
            return torch.empty(0, self.spec.vocab_size)
        if len({w.request_id for w in works}) != len(works):
            raise ValueError("a request appears twice in one step")
        for work in works:
            held = self._lengths.get(work.request_id, 0)
            if held != work.start_position:
                raise RuntimeError(f"request {work.request_id!r}: KV holds {held} positions, "
                                   f"work starts at {work.start_position}")
        plan = StepPlan(split_micro_batches(works, self.micro_batches or self.parallel.P))
        results = self._call("step", plan=plan)
        for work in works:
            self._lengths[work.request_id] = work.start_position + len(work.token_ids)
        heads = [r for r, layout in zip(results, self._layouts, strict=True) if layout.has_head]
        return torch.cat(heads, dim=1) if len(heads) > 1 else heads[0]

    def kv_length(self, request_id: str) -> int:
        """Positions cached for `request_id` (0 if none)."""
        return self._lengths.get(request_id, 0)

    def release(self, request_id: str) -> None:
        """Forget a request's KV; the shards drop it with the next call they get."""
        if self._lengths.pop(request_id, None) is not None:
            self._released.append(request_id)

    def export_kv(self, request_id: str) -> KVState | None:
        """The request's whole KV (all layers, all KV heads) assembled from the shards, on CPU."""
        self._check_usable()
        if not self._lengths.get(request_id):
            return None
        blocks = self._call("export_kv", request_id=request_id)
        return merge_kv([b for b in blocks if b is not None], range(self.spec.num_layers),
                        (0, self.spec.num_kv_heads), self.spec.head_dim)

    def import_kv(self, request_id: str, state: KVState) -> None:
        """Adopt a whole KV `state`: each shard gets its layers x KV heads."""
        self._check_usable()
        full_kv_check(state, self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim)
        state = state.to("cpu")
        per_worker = {name: {"request_id": request_id,
                             "state": slice_kv(state, layout.layers, layout.shard.kv_heads)}
                      for name, layout in zip(self.placement.workers, self._layouts, strict=True)}
        self._call("import_kv", per_worker=per_worker)
        self._lengths[request_id] = state.length

    # ------------------------------------------------------------------ reconfiguration
    def reconfigure(self, parallel: ParallelConfig, workers: Sequence[str] | None = None, *,
                    use_mapper: bool = True, progressive: bool = True,
                    memory_bytes: int | Mapping[str, int] | None = None,
                    peers: Sequence[PeerShard] = ()) -> ReconfigurationReport:
        """Switch the live replica to `parallel`, keeping every request's KV (no recompute).

        `workers`: the shards that may hold the new positions (at least P*M; new names start new
        shards; live shards not named only send what they hold, then stop). None: the live
        shards, plus new ones named by `_new_names` when P*M grows.

        Only the slices a new position lacks move (shard to shard, pulled from `peers`, shards
        of other live replicas, or from the checkpoint when none holds them); process groups are re-formed as a new epoch inside the same
        processes. The planner's whole plan is carried out: KV first, then layers front to back;
        each shard frees the old slices it no longer needs as the plan's releases say and is
        rebuilt as soon as its stage's last slice has landed, so that no shard holds more than
        `memory_bytes` (weights + KV; one bound for all or {shard: bytes}; None: unbounded).

        Ablations (SpotServe's): `use_mapper=False` places `workers` in the given order instead of
        by Kuhn-Munkres; `progressive=False` moves everything first, then rebuilds every shard
        (no early stage release, no bound, old slices freed only at the end).

        Raises:
            ReplicaConfigError: a bad configuration or worker list, or no transfer order keeps
                every shard within `memory_bytes` (the replica keeps running as it was).
        """
        self._check_usable()
        check_config(self.spec, parallel)
        candidates = self._candidates(parallel, workers)
        started = time.perf_counter()
        old = self._placement
        spawned = tuple(name for name in candidates if name not in self._members)
        try:
            self._transport.start(spawned, self._source)
            self._members.extend(spawned)
            spawn_done = time.perf_counter()
            kv_lengths = tuple(sorted((rid, n) for rid, n in self._lengths.items() if n > 0))
            plan = self._plan(old, parallel, candidates, sum(n for _, n in kv_lengths), spawned,
                              use_mapper=use_mapper, progressive=progressive,
                              memory_bytes=memory_bytes, peers=tuple(peers))
            plan_done = time.perf_counter()
            layouts = replica_layouts(self.spec, parallel)
            members = [*plan.placement.workers, *plan.leaving]
            group_seconds = self._join(members, parallel if not plan.leaving else None)
            migrate_began, migrate_wall = time.perf_counter(), time.time()
            orders = migration_orders(plan, layouts, members, kv_lengths, tuple(peers))
            stats: list[MigrationStats] = self._call("migrate", per_worker=orders, workers=members)
            migrate_seconds = time.perf_counter() - migrate_began
            self._placement, self._layouts = plan.placement, layouts
            if plan.leaving:
                self._members = [name for name in self._members if name not in plan.leaving]
                self._transport.stop(plan.leaving)
                group_seconds += self._join(list(plan.placement.workers), parallel)
        except ReplicaConfigError:
            raise
        except Exception as exc:
            self._fail(exc)
            raise
        return ReconfigurationReport(
            old=None if old is None else old.config, new=parallel, epoch=self._epoch,
            assignments=plan.assignments,
            transfers=transfer_records(plan.transfers, stats, {p.name for p in peers}), kv_requests=len(kv_lengths),
            received_bytes=sum(s.bytes_received + s.bytes_read for s in stats),
            started_workers=spawned, stopped_workers=plan.leaving,
            spawn_seconds=spawn_done - started, plan_seconds=plan_done - spawn_done,
            group_seconds=group_seconds, migrate_seconds=migrate_seconds,
            seconds=time.perf_counter() - started,
            stage_ready=stage_ready(plan, stats, migrate_wall),
            peak_bytes={s.worker: s.peak_bytes for s in stats},
            planned_peak_bytes={n: plan.planned_peak_bytes.get(n, 0) for n in members},
            start_bytes={s.worker: s.start_bytes for s in stats},
            end_bytes={s.worker: s.end_bytes for s in stats},
            memory_bytes=dict(plan.memory_bytes), progressive=progressive, use_mapper=use_mapper)

    def _plan(self, old: Placement | None, parallel: ParallelConfig, candidates: Sequence[str],
              kv_tokens: int, spawned: Sequence[str], **options: object) -> ReconfigurationPlan:
        """`plan_reconfiguration` over the live shards; a plan that cannot keep the memory bound
        (or names a peer like a member) stops the shards just started and raises
        `ReplicaConfigError` (nothing else changed)."""
        try:
            return plan_reconfiguration(self.spec, old, parallel, list(self._members), kv_tokens,
                                        candidates=candidates, **options)  # type: ignore[arg-type]
        except ValueError as exc:  # MemoryBoundError is one too
            if spawned:
                self._members = [name for name in self._members if name not in spawned]
                self._transport.stop(spawned)
            why = ("no migration order keeps every shard within its memory bound"
                   if isinstance(exc, MemoryBoundError) else "bad peers")
            raise ReplicaConfigError(f"{why}: {exc}") from exc

    def _candidates(self, parallel: ParallelConfig, workers: Sequence[str] | None) -> list[str]:
        """The shards that may hold `parallel`'s positions (checked, in order)."""
        if workers is None:
            missing = parallel.num_positions - len(self._members)
            workers = [*self._members, *self._new_names(missing)] if missing > 0 else self._members
        names = list(workers)
        if len(set(names)) != len(names):
            raise ReplicaConfigError(f"a worker is named twice in {names}")
        if len(names) < parallel.num_positions:
            raise ReplicaConfigError(f"{parallel.P}x{parallel.M} needs {parallel.num_positions} "
                                     f"workers, got {len(names)}")
        return names

    def _new_names(self, count: int) -> list[str]:
        """Names of `count` new shards when the caller named none."""
        raise ReplicaConfigError(f"{type(self).__name__} needs {count} more workers named")

    def _join(self, members: Sequence[str], parallel: ParallelConfig | None) -> float:
        """Form the next epoch's group of `members` (ranks in that order); with `parallel`, also
        its tensor-parallel groups (then `members` must be in canonical position order)."""
        assert self._store is not None
        began = time.perf_counter()
        self._epoch += 1
        groups: tuple[tuple[int, ...], ...] = ()
        if parallel is not None and parallel.M > 1:
            groups = tuple(tuple(range(s * parallel.M, (s + 1) * parallel.M)) for s in range(parallel.P))
        host = self._transport.rendezvous_host
        per_worker = {name: {"group": GroupSpec(host, self._store.port, self._epoch, rank,
                                                len(members), self._backend, groups, self.timeout_s)}
                      for rank, name in enumerate(members)}
        self._call("join", per_worker=per_worker, workers=members)
        return time.perf_counter() - began

    # ------------------------------------------------------------------ calls
    def _call(self, method: str, *, per_worker: dict[str, dict[str, object]] | None = None,
              workers: Sequence[str] | None = None, **kwargs: object) -> list:  # type: ignore[type-arg]
        """Call `method` on `workers` (default: the placement's, canonical order); one reply each,
        every call dispatched before any reply is awaited."""
        names = list(workers) if workers is not None else list(self.placement.workers)
        release, self._released = tuple(self._released), []
        calls = [(name, Call(method, to_wire(per_worker[name] if per_worker is not None else kwargs),
                             release)) for name in names]
        try:
            return self._transport.call(calls, method)
        except ReplicaError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: BaseException) -> None:
        self._failure = f"{type(exc).__name__}: {exc}"

    def _check_usable(self) -> None:
        if self._closed:
            raise ReplicaError("the sharded executor is closed")
        if self._failure is not None:
            raise ReplicaWorkerError(f"the replica failed earlier and must be closed: {self._failure}")

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop every shard and the rendezvous store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._transport.close()
        finally:
            self._members = []
            self._store = None

    def __enter__(self) -> ShardedDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedExecutor(ShardedDriver):
    """Runs one replica on P*M local worker processes behind the `Executor` contract.

    Args:
        model: a `LoadedModel` (its checkpoint directory, spec and dtype are used; the workers
            read their own slices) or a checkpoint name / directory / GGUF file (fp32).
        parallel: the configuration (D must be 1; B is not used here, the engine batches).
        device: "cpu" (gloo) or "cuda" (NCCL; worker i uses GPU i modulo the GPU count).
        micro_batches: micro-batches per step (default P, capped at the step's works).
        timeout_s: limit on every answer from a worker and on every collective.
        start_method: multiprocessing start method ("forkserver": fast starts after the first).
    """

    def __init__(self, model: LoadedModel | str | os.PathLike[str], parallel: ParallelConfig, *,
                 device: str = "cpu", micro_batches: int | None = None, timeout_s: float = 120.0,
                 start_method: str = "forkserver") -> None:
        self._names: Iterator[str] = (f"w{i}" for i in itertools.count())
        super().__init__(model_source(model, device), LocalProcessTransport(timeout_s, start_method),
                         parallel, micro_batches=micro_batches, timeout_s=timeout_s)

    def _new_names(self, count: int) -> list[str]:
        return [next(self._names) for _ in range(count)]

    def __enter__(self) -> ShardedExecutor:
        return self


def migration_orders(plan: ReconfigurationPlan, layouts: Sequence[ShardLayout],
                     members: Sequence[str], kv_lengths: tuple[tuple[str, int], ...],
                     peers: tuple[PeerShard, ...] = ()) -> dict[str, dict[str, object]]:
    """Every member's `MigrationOrders` (as call arguments): the global transfer list, its own
    releases, when to rebuild, and the `peers` the plan pulls from.

    Progressive: a shard is rebuilt right after its stage's last incoming transfer
    (`StageReadiness.after`), but not before the last KV transfer it takes part in (its old KV
    blocks are sent from the pieces it holds until then); a leaving shard only sends, then frees.
    Not progressive: every shard is rebuilt after the last transfer and frees nothing before.
    """
    ranks = tuple((name, i) for i, name in enumerate(members))
    last = len(plan.transfers) - 1
    last_kv: dict[str, int] = {}
    for index, t in enumerate(plan.transfers):
        if t.slice.is_kv:
            for name in (t.src, t.dst):
                if name is not None:
                    last_kv[name] = index
    releases: dict[str, list[tuple[int, Slice]]] = {name: [] for name in members}
    for release in plan.releases:
        releases[release.worker].append((release.after, release.slice))
    ready = {r.stage: r.after for r in plan.readiness}
    out: dict[str, dict[str, object]] = {}
    for name in members:
        position = plan.placement.position_of(name)
        layout = None if position is None else layouts[position.stage * plan.placement.config.M
                                                         + position.rank]
        build_after = last
        if plan.progressive and position is not None:
            build_after = max(ready[position.stage], last_kv.get(name, -1))
        out[name] = {"orders": MigrationOrders(layout, plan.transfers, ranks, kv_lengths,
                                               tuple(releases[name]), build_after, peers)}
    return out


def split_micro_batches(works: Sequence[StepWork], count: int) -> tuple[MicroBatch, ...]:
    """Cut `works` into at most `count` contiguous, non-empty micro-batches of similar token counts."""
    count = max(1, min(count, len(works)))
    total = sum(len(w.token_ids) for w in works)
    chunks: list[list[StepWork]] = [[]]
    done = 0
    for i, work in enumerate(works):
        if chunks[-1] and len(chunks) < count and (
                done >= total * len(chunks) / count or len(works) - i <= count - len(chunks)):
            chunks.append([])
        chunks[-1].append(work)
        done += len(work.token_ids)
    return tuple(MicroBatch(tuple(c)) for c in chunks)


def model_source(model: LoadedModel | str | os.PathLike[str], device: str = "cpu") -> ModelSource:
    """Where shards read `model` from: a loaded model's checkpoint and dtype, or a checkpoint."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if isinstance(model, LoadedModel):
        dtype = next(model.network.parameters()).dtype
        return ModelSource(str(model.checkpoint_dir), model.spec, dict(model.config),
                           str(dtype).removeprefix("torch."), device)
    path = resolve_checkpoint(model)
    config = read_config(path)
    spec = ModelSpec.from_hf_config(config, name=Path(os.fspath(model)).name, bytes_per_param=4)
    return ModelSource(str(path), spec, config, "float32", device)
