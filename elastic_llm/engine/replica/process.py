"""Launching shard runtimes as local processes and talking to them over pipes.

This is the only module that knows about local processes: `worker_main` runs a `ShardRuntime`
behind a pipe (one call at a time, tensors packed by `wire`), `WorkerProcess` is the driver's
handle, `collect` waits for one reply from each of several workers with a deadline, watching the
processes' sentinels so that a dead child raises `ReplicaWorkerError` at once instead of hanging,
and `LocalProcessTransport` is the `ShardTransport` built from them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
import weakref
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from elastic_llm.engine.replica.errors import ReplicaTimeoutError, ReplicaWorkerError
from elastic_llm.engine.replica.messages import ModelSource
from elastic_llm.engine.replica.transport import Call, Reply, serve_call
from elastic_llm.engine.replica.wire import from_wire

#: Modules the forkserver imports once, so that each worker starts in milliseconds.
_PRELOAD = ["torch", "torch.distributed", "elastic_llm.engine.replica.runtime"]

def worker_main(conn: multiprocessing.connection.Connection, name: str, source: ModelSource,
                device_index: int) -> None:
    """Entry point of a worker process: serve `Call`s on `conn` until "shutdown" or EOF."""
    import torch

    from elastic_llm.engine.replica.runtime import ShardRuntime

    torch.set_num_threads(1)  # P*M processes share a few cores: one thread each
    try:
        runtime = ShardRuntime(name, source, device_index)
    except Exception:
        conn.send(Reply(False, error=traceback.format_exc()))
        return
    conn.send(Reply(True, os.getpid()))
    while True:
        try:
            call: Call = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            break
        if call.method == "shutdown":  # the driver joins the process; no reply
            break
        conn.send(serve_call(runtime, call))
    runtime.close()


class WorkerProcess:
    """The driver's handle on one worker process."""

    def __init__(self, name: str, context: BaseContext, source: ModelSource, device_index: int) -> None:
        self.name = name
        parent, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, name, source, device_index),
                                       name=f"elastic-llm-{name}", daemon=True)  # type: ignore[attr-defined]
        self.process.start()
        child.close()
        self.conn = parent

    def post(self, call: Call) -> None:
        """Send `call` (the reply is read by `collect`)."""
        try:
            self.conn.send(call)
        except (BrokenPipeError, OSError) as exc:
            raise ReplicaWorkerError(f"worker {self.name} is gone ({self.exit_text()}): {exc}") from None

    def exit_text(self) -> str:
        """How the process ended, for error messages."""
        code = self.process.exitcode
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to shut down; terminate, then kill it if it does not within the timeout."""
        if self.process.is_alive():
            try:
                self.conn.send(Call("shutdown"))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        self.conn.close()


def unguarded_main_script() -> str | None:
    """The running script's path when it has no ``if __name__ == "__main__":`` guard (None when it
    has one, or the program is not a script: a REPL, ``python -m``, a notebook)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return None if "__main__" in source else path


def died_message(worker: WorkerProcess, what: str) -> str:
    """Why a worker process died, with the likeliest cause when the script lacks a main guard."""
    message = f"worker {worker.name} died during {what!r} ({worker.exit_text()})"
    script = unguarded_main_script()
    if script is not None and worker.process.exitcode == 1:
        message += (f"; {script} has no `if __name__ == \"__main__\":` guard: every worker process "
                    f"imports the script again (multiprocessing's forkserver/spawn), so it must create "
                    f"the engine under that guard")
    return message


def collect(workers: Sequence[WorkerProcess], what: str, timeout_s: float) -> list[Any]:
    """One reply from each worker, in order. Raises `ReplicaWorkerError` as soon as a worker fails
    or dies, `ReplicaTimeoutError` when the deadline passes first."""
    values: dict[str, Any] = {}
    pending = {w.conn: w for w in workers}
    deadline = time.monotonic() + timeout_s
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(sorted(w.name for w in pending.values()))
            raise ReplicaTimeoutError(f"no answer to {what!r} from {names} within {timeout_s:.0f} s")
        sentinels = {w.process.sentinel: w for w in pending.values()}
        ready = multiprocessing.connection.wait([*pending, *sentinels], remaining)
        for handle in ready:
            worker = pending.get(handle) or sentinels[handle]  # type: ignore[call-overload]
            if worker.conn not in pending:
                continue
            if handle is not worker.conn and not worker.conn.poll():
                worker.process.join(1.0)
                raise ReplicaWorkerError(died_message(worker, what))
            try:
                reply: Reply = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(1.0)
                raise ReplicaWorkerError(died_message(worker, what)) from None
            if not reply.ok:
                raise ReplicaWorkerError(f"worker {worker.name} failed in {what!r}:\n{reply.error}")
            values[worker.name] = from_wire(reply.value)
            del pending[worker.conn]
    return [values[w.name] for w in workers]


class LocalProcessTransport:
    """`ShardTransport` over local worker processes and pipes.

    Args:
        timeout_s: limit on every answer from a worker.
        start_method: multiprocessing start method ("forkserver": fast starts after the first).
    """

    rendezvous_host = "127.0.0.1"

    def __init__(self, timeout_s: float = 120.0, start_method: str = "forkserver") -> None:
        self.timeout_s = timeout_s
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(_PRELOAD)  # type: ignore[attr-defined]
        self._workers: dict[str, WorkerProcess] = {}
        self._device_slots = itertools.count()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    def start(self, names: Sequence[str], source: ModelSource) -> None:
        """Start one process per name and wait until each is ready."""
        fresh = [WorkerProcess(name, self._context, source, next(self._device_slots)) for name in names]
        self._workers.update((w.name, w) for w in fresh)
        collect(fresh, "start", self.timeout_s)

    def call(self, calls: Sequence[tuple[str, Call]], what: str) -> list[Any]:
        """Post every call, then collect the replies in order."""
        handles = [self._workers[name] for name, _ in calls]
        for handle, (_, call) in zip(handles, calls, strict=True):
            handle.post(call)
        return collect(handles, what, self.timeout_s)

    def stop(self, names: Sequence[str]) -> None:
        """Shut these processes down (asked first, then terminated, then killed)."""
        for name in names:
            self._workers.pop(name).stop(self.timeout_s)

    def pids(self) -> dict[str, int | None]:
        """Worker name -> process id."""
        return {name: w.process.pid for name, w in self._workers.items()}

    def handle(self, name: str) -> str:
        """Always "": local processes have no channel for other replicas to pull weights over."""
        return ""

    def close(self) -> None:
        """Stop every worker process."""
        self._finalizer()


def _stop_all(workers: dict[str, WorkerProcess]) -> None:
    for worker in list(workers.values()):
        worker.stop(timeout_s=5.0)
    workers.clear()
