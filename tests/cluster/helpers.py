"""Helpers for the cluster tests: polling with a deadline, small clusters, a fake metadata server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.utils import format_datetime
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from distributed import Client, LocalCluster

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def results_or_report(llm: Any, futures: list[Any], timeout: float, context: Callable[[], Any] = lambda: None) -> list[Any]:
    """Every future's result within `timeout` seconds in all; when one is late, fail with what the
    controller reports (replicas, queue, operations, notices) and `context()`, so a hang seen once
    (in CI, say) says where it was."""
    deadline = time.monotonic() + timeout
    results = []
    for index, future in enumerate(futures):
        try:
            results.append(future.result(timeout=max(0.1, deadline - time.monotonic())))
        except TimeoutError:
            status = llm.status()
            keys = ("replicas", "queued", "running", "finished", "failed", "open_operations", "notices",
                    "commits_refused", "tokens_recomputed", "requests_restarted")
            report = {key: status.get(key) for key in keys}
            raise AssertionError(f"{len(futures) - index} of {len(futures)} requests unfinished after "
                                 f"{timeout} s; controller: {report}; context: {context()}") from None
    return results


@contextmanager
def local_cluster(n_workers: int = 1, *, processes: bool = False,
                  **kwargs: Any) -> Iterator[tuple[LocalCluster, Client]]:
    """A small LocalCluster (one thread per worker, no dashboard) and a client."""
    with LocalCluster(n_workers=n_workers, processes=processes, threads_per_worker=1,
                      dashboard_address=None, **kwargs) as cluster, Client(cluster) as client:
        yield cluster, client


class FakeMetadataServer:
    """Loopback HTTP server speaking enough of AWS IMDSv2, GCP and Azure metadata.

    ``announce(deadline)`` makes it report a preemption at ``deadline`` (epoch seconds);
    ``fail_next(n)`` answers the next ``n`` requests with HTTP 503. ``polls`` counts preemption
    queries (AWS: only those with a valid token).
    """

    TOKEN = "fake-imds-token"

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.deadline: float | None = None
        self.polls = 0
        self.tokens_issued = 0
        self.rejected_tokens = 0
        self.revoke_token = False
        self._failures = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_PUT(self) -> None:
                server._serve(self, "PUT")

            def do_GET(self) -> None:
                server._serve(self, "GET")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeMetadataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def announce(self, deadline: float) -> None:
        with self._lock:
            self.deadline = deadline

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._failures = n

    # ---- request handling ---------------------------------------------------------------------
    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        with self._lock:
            if self._failures:
                self._failures -= 1
                return self._reply(request, 503, b"unavailable")
            status, body = self._route(request, method)
        self._reply(request, status, body)

    def _route(self, request: BaseHTTPRequestHandler, method: str) -> tuple[int, bytes]:
        path, headers = request.path, request.headers
        if self.provider == "aws":
            if method == "PUT" and path == "/latest/api/token":
                if not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return 400, b"missing ttl"
                self.tokens_issued += 1
                self.revoke_token = False
                return 200, self.TOKEN.encode()
            if method == "GET" and path == "/latest/meta-data/spot/instance-action":
                if headers.get("X-aws-ec2-metadata-token") != self.TOKEN or self.revoke_token:
                    self.rejected_tokens += 1
                    return 401, b"unauthorized"
                self.polls += 1
                if self.deadline is None:
                    return 404, b"not found"
                when = datetime.fromtimestamp(self.deadline, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                return 200, json.dumps({"action": "terminate", "time": when}).encode()
        if self.provider == "gcp" and method == "GET" and path == "/computeMetadata/v1/instance/preempted":
            if headers.get("Metadata-Flavor") != "Google":
                return 403, b"missing Metadata-Flavor"
            self.polls += 1
            return 200, b"TRUE" if self.deadline is not None else b"FALSE"
        if (self.provider == "azure" and method == "GET"
                and path == "/metadata/scheduledevents?api-version=2020-07-01"):
            if headers.get("Metadata") != "true":
                return 400, b"missing Metadata header"
            self.polls += 1
            events = [{"EventId": "maint-1", "EventType": "Reboot", "ResourceType": "VirtualMachine",
                       "Resources": ["vm0"], "EventStatus": "Scheduled", "NotBefore": ""}]
            if self.deadline is not None:
                when = format_datetime(datetime.fromtimestamp(self.deadline, timezone.utc), usegmt=True)
                events.append({"EventId": "evict-1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                               "Resources": ["vm0"], "EventStatus": "Scheduled", "NotBefore": when})
            return 200, json.dumps({"DocumentIncarnation": 1, "Events": events}).encode()
        return 404, b"not found"

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)
