"""Run the gateway: `GatewayServer` (uvicorn on a socket of our own, SIGTERM drains) and
`serve` (``elastic-llm serve``: connect to a Dask scheduler or start a LocalCluster, register
the controller, serve until stopped).

SIGTERM or Ctrl-C: the listening socket closes, new requests on open connections get 503,
running requests and streams finish up to `GatewaySettings.drain_timeout_s`, then whatever is
left is cancelled (on the cluster too) and the process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from sse_starlette.sse import AppStatus

from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.cluster.serving_client import ServingClient
from elastic_llm.errors import InvalidRequestError
from elastic_llm.scheduling.factory import SCHEDULER_NAMES, check_scheduler_name
from elastic_llm.serve.app import create_app
from elastic_llm.serve.settings import GatewaySettings


class _DrainingServer(uvicorn.Server):
    """uvicorn's server whose exit signal first marks the gateway as draining; the signal is
    not re-raised after the drain, so the caller can close the cluster and exit normally."""

    def __init__(self, config: uvicorn.Config, on_drain: Any) -> None:
        super().__init__(config)
        self._on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        self._on_drain()
        self.should_exit = True


class GatewayServer:
    """The HTTP gateway over `llm`, on `host`:`port` (0: a free port; see `url`)."""

    def __init__(self, llm: ServingClient, settings: GatewaySettings, host: str = "127.0.0.1",
                 port: int = 8000, log_level: str = "warning") -> None:
        # streams must outlive the exit signal while draining: sse-starlette would cut them at once
        AppStatus.disable_automatic_graceful_drain()
        self.app = create_app(llm, settings)
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise InvalidRequestError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="off",
                                timeout_graceful_shutdown=settings.drain_timeout_s, timeout_keep_alive=5)
        self._server = _DrainingServer(config, self.drain)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000`` (append ``/v1`` for OpenAI clients)."""
        host, port = self._socket.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def drain(self) -> None:
        """Refuse new requests with 503 from now on (running ones continue)."""
        self.app.state.gateway.draining = True

    def run(self) -> None:
        """Serve in this thread until SIGTERM / SIGINT (or `stop`), draining as described above."""
        self._server.run(sockets=[self._socket])

    def start_in_thread(self, timeout: float = 30.0) -> None:
        """Serve on a background thread (tests, benchmarks); returns once it accepts requests."""
        self._thread = threading.Thread(target=self.run, name="elastic-llm-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> None:
        """Drain and stop (as SIGTERM does) and wait for the server thread."""
        self.drain()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)


@dataclass(frozen=True)
class ClusterOptions:
    """Where the model runs: an existing scheduler, or a LocalCluster started here."""

    scheduler: str | None = None  #: address of a running Dask scheduler (None: start a LocalCluster)
    scheduler_file: str | None = None  #: or the scheduler file ``dask scheduler`` wrote
    local_workers: int = 1  #: LocalCluster workers (each holds a replica)
    local_processes: bool = True  #: LocalCluster workers as processes (False: threads here)
    model: str = "smollm2-135m-instruct"  #: embedded model name or checkpoint directory
    policy: str = "spotserve"  #: controller policy
    max_batch_size: int = 16  #: requests per replica iteration
    #: each replica's request policy (`elastic_llm.scheduling.SCHEDULER_NAMES`)
    request_scheduler: str = "fcfs"
    min_step_seconds: float = 0.0  #: pace replica iterations to at least this long (emulation)
    replicas_timeout_s: float = 600.0  #: how long to wait for the first ready replica
    #: cloud whose metadata service every worker (present and future) polls for preemption
    #: notices: "aws" | "gcp" | "azure"; None: no watcher
    metadata_provider: str | None = None

    def __post_init__(self) -> None:
        if self.scheduler and self.scheduler_file:
            raise InvalidRequestError("give --scheduler or --scheduler-file, not both")
        if type(self.local_workers) is not int or self.local_workers < 1:
            raise InvalidRequestError(f"--workers must be at least 1, got {self.local_workers!r}")
        if self.request_scheduler not in SCHEDULER_NAMES:
            raise InvalidRequestError(f"--request-scheduler must be one of {', '.join(SCHEDULER_NAMES)}, "
                                      f"got {self.request_scheduler!r}")


@contextlib.contextmanager
def dask_client(options: ClusterOptions) -> Iterator[Any]:
    """A `distributed.Client` of the chosen cluster (a LocalCluster is closed afterwards)."""
    from distributed import Client, LocalCluster

    if options.scheduler or options.scheduler_file:
        with Client(options.scheduler, scheduler_file=options.scheduler_file, timeout=30) as client:
            yield client
        return
    with LocalCluster(n_workers=options.local_workers, processes=options.local_processes, threads_per_worker=1,
                      dashboard_address=None, host="127.0.0.1") as cluster, Client(cluster) as client:
        yield client


def serve(cluster: ClusterOptions, settings: GatewaySettings, host: str, port: int,
          log_level: str = "info") -> None:
    """``elastic-llm serve``: register the controller, wait for a replica, serve until stopped."""
    with dask_client(cluster) as client:
        replica = ReplicaOptions(model=cluster.model, max_batch_size=cluster.max_batch_size,
                                 scheduler=check_scheduler_name(cluster.request_scheduler),
                                 min_step_seconds=cluster.min_step_seconds)
        llm = ServingClient(client, model=cluster.model, policy=cluster.policy, replica=replica, chat=True)
        if cluster.metadata_provider is not None:
            from elastic_llm.cluster.metadata import MetadataWatcher

            client.register_plugin(MetadataWatcher(cluster.metadata_provider))  # type: ignore[arg-type]
        try:
            server = GatewayServer(llm, settings, host, port, log_level)
            print(f"[elastic-llm] waiting for a replica of {cluster.model} ...", file=sys.stderr, flush=True)
            llm.wait_for_replicas(1, timeout=cluster.replicas_timeout_s)
            print(f"[elastic-llm] serving {settings.model_name!r} on {server.url}/v1", flush=True)
            server.run()
            print("[elastic-llm] stopped", file=sys.stderr, flush=True)
        finally:
            llm.close()
