"""How the sharded replica's driver reaches its shard runtimes: the transport contract.

The driver (`ShardedDriver`) plans steps and reconfigurations; a transport starts shard runtimes
under names the driver picks, delivers one `Call` to each of several of them and gathers the
replies. Every call the driver makes may enter a collective that needs all its targets at once
(a pipeline hand-off, a tensor all-reduce, a migration), so a transport must DISPATCH every call
before it waits for any reply, and must raise as soon as one target fails or dies rather than wait
for the others (who may be blocked on the dead one until the group's timeout).

Two transports exist: local processes over pipes (`process.LocalProcessTransport`) and Dask
actors on worker processes (`elastic_llm.cluster.dask_sharded.DaskActorTransport`). `serve_call`
is the one place a runtime method is invoked on behalf of a driver, whichever transport carried it.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from elastic_llm.engine.replica.messages import ModelSource
from elastic_llm.engine.replica.wire import from_wire, to_wire

if TYPE_CHECKING:
    from elastic_llm.engine.replica.runtime import ShardRuntime

#: `ShardRuntime` methods a driver may call.
RUNTIME_METHODS = frozenset({"join", "leave", "step", "migrate", "export_kv", "import_kv",
                             "release", "kv_lengths", "describe", "read_weights"})


@dataclass(frozen=True)
class Call:
    """A method call on a shard's runtime (`release` is applied first, piggybacked)."""

    method: str  #: one of `RUNTIME_METHODS`, or "shutdown" (local processes only)
    kwargs: dict[str, Any] = field(default_factory=dict)  #: arguments, tensors packed by `to_wire`
    release: tuple[str, ...] = ()  #: request ids whose KV to drop before the call


@dataclass(frozen=True)
class Reply:
    """The result of a `Call` (or of starting up)."""

    ok: bool  #: False: `error` holds the shard's traceback
    value: Any = None  #: the method's return value, tensors packed by `to_wire`
    error: str = ""  #: formatted traceback when not ok


def serve_call(runtime: ShardRuntime, call: Call) -> Reply:
    """Run `call` on `runtime` (never raises: failures become a not-ok `Reply`)."""
    try:
        if call.method not in RUNTIME_METHODS:
            raise ValueError(f"unknown runtime method {call.method!r}")
        if call.release:
            runtime.release(call.release)
        value = getattr(runtime, call.method)(**from_wire(call.kwargs))
        return Reply(True, to_wire(value))
    except Exception:
        return Reply(False, error=traceback.format_exc())


class ShardTransport(Protocol):
    """Starts, calls and stops the shard runtimes of one replica (see the module docstring)."""

    #: the host every shard can reach the driver's rendezvous store on
    rendezvous_host: str

    def start(self, names: Sequence[str], source: ModelSource) -> None:
        """Start one runtime per name (fresh names) and wait until each is ready."""
        ...

    def call(self, calls: Sequence[tuple[str, Call]], what: str) -> list[Any]:
        """Dispatch every call, then gather; values (unpacked) in the given order. Raises
        `ReplicaWorkerError` as soon as one fails or its host dies, `ReplicaTimeoutError` when the
        transport's deadline passes first."""
        ...

    def stop(self, names: Sequence[str]) -> None:
        """Stop these runtimes (best effort, bounded time)."""
        ...

    def pids(self) -> dict[str, int | None]:
        """Runtime name -> process id of the process hosting it."""
        ...

    def handle(self, name: str) -> str:
        """How a shard of ANOTHER replica reaches runtime `name` to pull weights from it
        (`PeerShard.handle`); "" when this transport's runtimes cannot be reached that way."""
        ...

    def close(self) -> None:
        """Stop every runtime (idempotent, bounded time)."""
        ...
