"""A new sharded replica takes its weight slices from shards of live peer replicas, and reads from
the checkpoint only what no peer holds.

In process: the peers are `ShardRuntime`s holding positions of other shapes (built from the
checkpoint, no process group needed to serve pulls), and the new replica is a `ShardedDriver`
over an in-process transport (one position, so its group is this process alone). The pulls go
through `serve_call` and the wire packing, as they do over Dask actors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from elastic_llm import LLMEngine, SamplingParams
from elastic_llm.engine.replica.errors import ReplicaWorkerError
from elastic_llm.engine.replica.layout import replica_layouts
from elastic_llm.engine.replica.messages import ModelSource, PeerShard
from elastic_llm.engine.replica.pieces import TensorPiece
from elastic_llm.engine.replica.reconfig import plan_reconfiguration
from elastic_llm.engine.replica.runtime import ShardRuntime
from elastic_llm.engine.replica.sharded_executor import ShardedDriver, migration_orders, model_source
from elastic_llm.engine.replica.transport import Call, serve_call
from elastic_llm.engine.replica.wire import from_wire, to_wire
from elastic_llm.model.loader import LoadedModel, load_model
from elastic_llm.planning.config import Position
from elastic_llm.planning.slices import Part, SliceAlgebra
from tests.replica.conftest import config

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


class InProcessTransport:
    """`ShardTransport` whose runtimes live in this process; pulls go to `peers` by name."""

    rendezvous_host = "127.0.0.1"

    def __init__(self, peers: dict[str, ShardRuntime]) -> None:
        self.peers = peers
        self.runtimes: dict[str, ShardRuntime] = {}
        self.pulls: list[tuple[str, int]] = []  #: (peer, pieces) of every pull

    def start(self, names: Sequence[str], source: ModelSource) -> None:
        for name in names:
            self.runtimes[name] = ShardRuntime(name, source, peer_reader=self.read)

    def read(self, peer: PeerShard, pieces: Sequence[TensorPiece]) -> list[torch.Tensor]:
        self.pulls.append((peer.name, len(pieces)))
        if peer.name not in self.peers:
            raise ConnectionError(f"peer {peer.name} is gone")
        reply = serve_call(self.peers[peer.name], Call("read_weights", to_wire({"pieces": list(pieces)})))
        if not reply.ok:
            raise RuntimeError(reply.error)
        return from_wire(reply.value)  # type: ignore[no-any-return]

    def call(self, calls: Sequence[tuple[str, Call]], what: str) -> list[object]:
        out = []
        for name, call in calls:
            reply = serve_call(self.runtimes[name], call)
            if not reply.ok:
                raise ReplicaWorkerError(f"{name} failed in {what!r}:\n{reply.error}")
            out.append(from_wire(reply.value))
        return out

    def stop(self, names: Sequence[str]) -> None:
        for name in names:
            runtime = self.runtimes.pop(name, None)
            if runtime is not None:
                runtime.close()

    def pids(self) -> dict[str, int | None]:
        return {name: None for name in self.runtimes}

    def handle(self, name: str) -> str:
        return name

    def close(self) -> None:
        self.stop(list(self.runtimes))


@pytest.fixture(scope="module")
def model(uneven_checkpoint: Path) -> LoadedModel:
    return load_model(uneven_checkpoint)


@pytest.fixture(scope="module")
def expected(model: LoadedModel, prompts: list[list[int]]) -> list[tuple[int, ...]]:
    return [c.token_ids for c in LLMEngine(model).generate(prompts, GREEDY)]


@pytest.fixture(scope="module")
def peer_replicas(model: LoadedModel) -> dict[tuple[int, int], list[tuple[PeerShard, ShardRuntime]]]:
    """Shards of a (2, 1) and a (1, 2) replica, each read from the checkpoint (no group)."""
    source = model_source(model)
    out = {}
    for shape in ((2, 1), (1, 2)):
        names = [f"peer{shape[0]}{shape[1]}-{i}" for i in range(shape[0] * shape[1])]
        plan = plan_reconfiguration(model.spec, None, config(*shape), names, 0)
        orders = migration_orders(plan, replica_layouts(model.spec, config(*shape)), names, ())
        shards = []
        for pos, name in plan.placement.items():
            runtime = ShardRuntime(name, source)
            runtime.migrate(orders[name]["orders"])  # type: ignore[arg-type]
            shards.append((PeerShard(name, shape, pos.stage, pos.rank, "here", name), runtime))
        out[shape] = shards
    return out


@pytest.fixture(scope="module")
def checkpoint_only(model: LoadedModel) -> int:
    """Bytes a (1, 1) start reads with no peers: all of them from the checkpoint."""
    with ShardedDriver(model_source(model), InProcessTransport({}), config(1, 1), workers=["new"]) as driver:
        report = driver.start_report
    assert report.peer_bytes == 0 and report.checkpoint_bytes > 0
    return report.checkpoint_bytes


@contextmanager
def _start(model: LoadedModel, peers: Sequence[tuple[PeerShard, ShardRuntime]]
           ) -> Iterator[tuple[ShardedDriver, InProcessTransport]]:
    transport = InProcessTransport({p.name: runtime for p, runtime in peers})
    with ShardedDriver(model_source(model), transport, config(1, 1), workers=["new"],
                       peers=[p for p, _ in peers]) as driver:
        yield driver, transport


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", [(2, 1), (1, 2)], ids=["from-2x1", "from-1x2"])
def test_peers_holding_every_slice_leave_nothing_to_read_from_the_checkpoint(
        model: LoadedModel, prompts: list[list[int]], expected: list[tuple[int, ...]],
        peer_replicas: dict[tuple[int, int], list[tuple[PeerShard, ShardRuntime]]], checkpoint_only: int,
        shape: tuple[int, int]) -> None:
    with _start(model, peer_replicas[shape]) as (driver, transport):
        report = driver.start_report
        assert report.checkpoint_bytes == 0
        assert report.peer_bytes == checkpoint_only  # the same bytes, from the peers instead
        assert {t.src for t in report.transfers} == {p.name for p, _ in peer_replicas[shape]}
        assert all(t.peer for t in report.transfers) and len(transport.pulls) == len(report.transfers)
        assert [c.token_ids for c in LLMEngine(model, executor=driver).generate(prompts, GREEDY)] == expected


@pytest.mark.timeout(60)
def test_what_no_peer_holds_comes_from_the_checkpoint_and_only_that(
        model: LoadedModel, prompts: list[list[int]], expected: list[tuple[int, ...]],
        peer_replicas: dict[tuple[int, int], list[tuple[PeerShard, ShardRuntime]]], checkpoint_only: int) -> None:
    """Only stage 0 of the (2, 1) peer: the new replica reads stage 1's layers and final norm
    from the checkpoint (its LM head is the tied embedding, which stage 0 holds)."""
    stage0 = [(p, r) for p, r in peer_replicas[(2, 1)] if p.stage == 0]
    algebra = SliceAlgebra(model.spec)
    missing = sum(algebra.nbytes(s) for s in algebra.weight_slices(config(2, 1), Position(0, 1, 0))
                  if s.part is not Part.HEAD)
    with _start(model, stage0) as (driver, _):
        report = driver.start_report
        assert 0 < report.checkpoint_bytes == missing
        assert report.peer_bytes == checkpoint_only - missing
        from_checkpoint = {t.slice.layer for t in report.transfers if t.src is None}
        layers = replica_layouts(model.spec, config(2, 1))[1].layers
        assert from_checkpoint == {*layers, model.spec.num_layers}  # stage 1's layers + final norm
        assert [c.token_ids for c in LLMEngine(model, executor=driver).generate(prompts, GREEDY)] == expected


@pytest.mark.timeout(60)
def test_a_peer_that_cannot_serve_falls_back_to_the_checkpoint(
        model: LoadedModel, prompts: list[list[int]], expected: list[tuple[int, ...]],
        peer_replicas: dict[tuple[int, int], list[tuple[PeerShard, ShardRuntime]]], checkpoint_only: int) -> None:
    """One (1, 2) rank is gone (the reader raises): its pieces come from the checkpoint."""
    (gone, _), kept = peer_replicas[(1, 2)][1], peer_replicas[(1, 2)][0]
    transport = InProcessTransport({kept[0].name: kept[1]})
    with ShardedDriver(model_source(model), transport, config(1, 1), workers=["new"],
                       peers=[kept[0], gone]) as driver:
        report = driver.start_report
        assert report.checkpoint_bytes > 0 and report.peer_bytes > 0
        assert report.checkpoint_bytes + report.peer_bytes == checkpoint_only
        assert all(t.src != gone.name for t in report.transfers)  # recorded as checkpoint reads
        assert any(name == gone.name for name, _ in transport.pulls)  # it was tried
        assert [c.token_ids for c in LLMEngine(model, executor=driver).generate(prompts, GREEDY)] == expected


def test_a_peer_named_like_a_member_is_refused(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="member"):
        plan_reconfiguration(model.spec, None, config(1, 1), ["a"], 0,
                             peers=[PeerShard("a", (1, 1), 0, 0)])
