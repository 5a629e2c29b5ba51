"""Watch the cloud's instance metadata service for a spot preemption and tell the scheduler.

Three providers, polled over plain HTTP with the standard library (``urllib``, proxies bypassed:
the metadata service is link-local):

* ``aws``: IMDSv2. ``PUT /latest/api/token`` (header ``X-aws-ec2-metadata-token-ttl-seconds``) gives
  a session token; ``GET /latest/meta-data/spot/instance-action`` with header
  ``X-aws-ec2-metadata-token`` answers 404 until an interruption is scheduled, then
  ``{"action": "terminate"|"stop"|"hibernate", "time": "2026-01-01T12:00:00Z"}`` (about 2 minutes
  ahead). Every action ends the instance's service, so each one counts.
* ``gcp``: ``GET /computeMetadata/v1/instance/preempted`` with header ``Metadata-Flavor: Google``
  answers ``TRUE`` or ``FALSE``; the instance stops about 30 s after it turns ``TRUE``, so the
  deadline is the first time it was seen ``TRUE`` plus ``grace_s``.
* ``azure``: Scheduled Events, ``GET /metadata/scheduledevents?api-version=2020-07-01`` with header
  ``Metadata: true`` answers ``{"Events": [...]}``; an event with ``EventType`` ``Preempt`` is the
  notice, and its ``NotBefore`` (RFC 1123 date, may be empty) the deadline. Events are not
  acknowledged (an acknowledgement would let Azure evict earlier).

`MetadataWatcher` is a `WorkerPlugin`: on each worker it runs an asyncio task that calls the
(blocking) probe in a thread (``asyncio.to_thread``) so the worker's event loop never waits on the
network, and forwards the first notice it sees to the scheduler's `NoticeBoard`, once. Network
errors are logged, never raised; the watcher just polls again.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal, get_args

from distributed.diagnostics.plugin import WorkerPlugin

from elastic_llm.cluster.contracts import DEFAULT_GRACE_S, PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.instance import local_instance_info
from elastic_llm.cluster.notices import PENDING_HANDLER, WORKER_NOTICE_OP

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

Provider = Literal["aws", "gcp", "azure"]
PROVIDERS: tuple[Provider, ...] = get_args(Provider)

#: Where each cloud serves instance metadata.
DEFAULT_BASE_URLS: dict[Provider, str] = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"

#: A probe looks once: given the wall time ``now``, the deadline of a pending preemption or None.
#: It raises `OSError` (``urllib.error.URLError`` included) when the service cannot be read.
Probe = Callable[[float], "float | None"]

# The metadata service is link-local: never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None,
                 timeout_s: float = 2.0) -> bytes | None:
    """Body of ``url``, or None when it answers 404 (AWS: "no interruption scheduled")."""
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


# ---- parsing (pure) ---------------------------------------------------------------------------
def parse_aws_instance_action(body: bytes) -> float:
    """Deadline (epoch seconds) of an AWS ``spot/instance-action`` document."""
    document = json.loads(body)
    return _iso8601_to_epoch(str(document["time"]))


def parse_gcp_preempted(body: bytes) -> bool:
    """True when GCP's ``instance/preempted`` says ``TRUE``."""
    return body.strip().upper() == b"TRUE"


def parse_azure_events(body: bytes, now: float, grace_s: float = DEFAULT_GRACE_S) -> float | None:
    """Deadline of the earliest ``Preempt`` scheduled event, or None when there is none.

    An event with an empty ``NotBefore`` gets ``now + grace_s`` (Azure's minimum notice is 30 s).
    """
    document = json.loads(body) if body.strip() else {}
    deadlines = []
    for event in document.get("Events", []):
        if event.get("EventType") != "Preempt":
            continue
        not_before = str(event.get("NotBefore") or "").strip()
        deadlines.append(email.utils.parsedate_to_datetime(not_before).timestamp()
                         if not_before else now + grace_s)
    return min(deadlines, default=None)


def _iso8601_to_epoch(text: str) -> float:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


# ---- probes -----------------------------------------------------------------------------------
class AwsProbe:
    """IMDSv2 probe: keeps a session token and renews it when it expires or is refused."""

    TOKEN_TTL_S = 21600

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expires = 0.0

    def _session_token(self, now: float) -> str:
        if self._token is None or now >= self._token_expires:
            body = http_request(self.base_url + AWS_TOKEN_PATH, method="PUT", timeout_s=self.timeout_s,
                                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
            if body is None:
                raise urllib.error.URLError("IMDSv2 token endpoint answered 404")
            self._token = body.decode().strip()
            self._token_expires = now + self.TOKEN_TTL_S / 2
        return self._token

    def __call__(self, now: float) -> float | None:
        for attempt in (1, 2):
            headers = {"X-aws-ec2-metadata-token": self._session_token(now)}
            try:
                body = http_request(self.base_url + AWS_ACTION_PATH, headers=headers,
                                    timeout_s=self.timeout_s)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 1:  # token expired or revoked: renew once
                    self._token = None
                    continue
                raise
            return None if body is None else parse_aws_instance_action(body)
        return None  # pragma: no cover (the loop always returns or raises)


class GcpProbe:
    """GCP probe: the deadline is ``grace_s`` after the preempted flag was first seen."""

    def __init__(self, base_url: str, timeout_s: float, grace_s: float) -> None:
        self.url = base_url.rstrip("/") + GCP_PREEMPTED_PATH
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._first_seen: float | None = None

    def __call__(self, now: float) -> float | None:
        body = http_request(self.url, headers={"Metadata-Flavor": "Google"}, timeout_s=self.timeout_s)
        if body is None or not parse_gcp_preempted(body):
            return None
        if self._first_seen is None:
            self._first_seen = now
        return self._first_seen + self.grace_s


class AzureProbe:
    """Azure Scheduled Events probe."""

    def __init__(self, base_url: str, timeout_s: float, grace_s: float) -> None:
        self.url = base_url.rstrip("/") + AZURE_EVENTS_PATH
        self.timeout_s = timeout_s
        self.grace_s = grace_s

    def __call__(self, now: float) -> float | None:
        body = http_request(self.url, headers={"Metadata": "true"}, timeout_s=self.timeout_s)
        return None if body is None else parse_azure_events(body, now, self.grace_s)


def make_probe(provider: Provider, *, base_url: str | None = None, timeout_s: float = 2.0,
               grace_s: float = DEFAULT_GRACE_S) -> Probe:
    """The probe of ``provider`` against ``base_url`` (the cloud's own address by default)."""
    if provider not in PROVIDERS:
        raise ClusterConfigError(f"metadata provider must be one of {PROVIDERS}, got {provider!r}")
    url = base_url or DEFAULT_BASE_URLS[provider]
    if provider == "aws":
        return AwsProbe(url, timeout_s)
    if provider == "gcp":
        return GcpProbe(url, timeout_s, grace_s)
    return AzureProbe(url, timeout_s, grace_s)


# ---- the worker plugin ------------------------------------------------------------------------
class MetadataWatcher(WorkerPlugin):
    """Worker plugin: poll the metadata service, forward the first preemption notice, stop.

    ``client.register_plugin(MetadataWatcher("aws"))`` installs it on every worker, present and
    future. ``base_url`` points it elsewhere (a fake server in tests), ``poll_interval_s`` sets
    how often it looks (AWS suggests every 5 s), ``grace_s`` is GCP's notice length and Azure's
    fallback when an event has no ``NotBefore``.
    """

    name = "elastic_llm.metadata_watcher"

    def __init__(self, provider: Provider, *, base_url: str | None = None,
                 poll_interval_s: float = 5.0, timeout_s: float = 2.0,
                 grace_s: float = DEFAULT_GRACE_S) -> None:
        if provider not in PROVIDERS:
            raise ClusterConfigError(f"metadata provider must be one of {PROVIDERS}, got {provider!r}")
        if poll_interval_s <= 0 or timeout_s <= 0 or grace_s < 0:
            raise ClusterConfigError("poll_interval_s and timeout_s must be > 0, grace_s >= 0")
        self.provider = provider
        self.base_url = base_url
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._task: asyncio.Task[PreemptionNotice | None] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_task": None}  # a running task never travels with the plugin

    async def setup(self, worker: Worker) -> None:
        """Start watching on the worker's event loop."""
        self._task = asyncio.create_task(self.watch(worker), name=f"{self.name}-{worker.address}")

    async def teardown(self, worker: Worker) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def watch(self, worker: Worker) -> PreemptionNotice | None:
        """Poll until a notice has been forwarded to the scheduler; returns that notice."""
        probe = make_probe(self.provider, base_url=self.base_url, timeout_s=self.timeout_s,
                           grace_s=self.grace_s)
        failing = False
        while True:
            try:
                deadline = await asyncio.to_thread(probe, time.time())
            except (OSError, ValueError, KeyError) as exc:  # network or malformed answer
                log = logger.debug if failing else logger.warning
                log("%s metadata service unreadable from %s: %r", self.provider, worker.address, exc)
                failing = True
            else:
                if failing:
                    logger.info("%s metadata service readable again from %s", self.provider,
                                worker.address)
                failing = False
                if deadline is not None:
                    notice = PreemptionNotice(worker=worker.address,
                                              instance_id=local_instance_info(worker).instance_id,
                                              deadline=deadline, source=self.provider)
                    if await self._forward(worker, notice):
                        return notice
            await asyncio.sleep(self.poll_interval_s)

    @staticmethod
    async def _forward(worker: Worker, notice: PreemptionNotice) -> bool:
        """Announce the notice on the worker's own stream to the scheduler (the board checks it
        names this worker), then confirm the board holds it; False: try again next poll."""
        pending = getattr(worker.scheduler, PENDING_HANDLER)
        try:
            if await pending(worker=worker.address) is None:  # no NoticeBoard (yet): an unknown
                logger.warning("no NoticeBoard on the scheduler for %s; retrying", notice)  # stream op
                return False  # would break the worker's stream, so nothing is sent
            worker.batched_stream.send({"op": WORKER_NOTICE_OP, "notice": notice.to_dict()})
            for _ in range(20):  # bounded: up to 2 s for the board to take it
                await asyncio.sleep(0.1)
                deadline = (await pending(worker=worker.address))["deadline"]
                if deadline is not None:  # ours, or an earlier one: the board knows it is leaving
                    logger.warning("preemption notice forwarded: %s", notice)
                    return True
        except Exception as exc:  # scheduler unreachable or no NoticeBoard: try again next poll
            logger.warning("could not forward %s to the scheduler: %r", notice, exc)
            return False
        logger.warning("the scheduler did not take %s; retrying", notice)
        return False
