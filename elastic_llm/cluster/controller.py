"""`ElasticController`: the scheduler plugin that serves requests on a churning fleet of workers.

A thin enactor around the control state machine (`elastic_llm.control.FleetState`): Dask
membership (`add_worker`, `remove_worker`, `remove_client`), the client handlers
(`elastic_llm_submit`, `_cancel`, `_poll`, `_status`), preemption notices (`NoticeBoard`) and the
replicas' commits (stream handler `elastic_llm_commit`, one typed `ReplicaCommit` per replica per
iteration) become events; the state machine's instructions are carried out by the `Enactor`
(actor calls under deadlines), whose outcomes come back as events. Every decision is the state
machine's; this class only translates, keeps the dollar ledger, and answers queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from elastic_llm.cluster import dashboard_page, metrics
from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.cost import CostLedger
from elastic_llm.cluster.enactor import Enactor
from elastic_llm.cluster.instance import fleet_info, instance_info
from elastic_llm.cluster.notices import NoticeBoard
from elastic_llm.cluster.replica_actor import COMMIT_OP, ReplicaOptions
from elastic_llm.control import FleetConfig, FleetPolicy, FleetState, policy_by_name
from elastic_llm.control import events as ev
from elastic_llm.control.history import FleetHistory
from elastic_llm.control.messages import ReplicaCommit
from elastic_llm.control.policies import POLICY_NAMES
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import InstanceProfile
from elastic_llm.control.requests import ClientEvent, EventsLostError
from elastic_llm.errors import InvalidRequestError, UnauthorizedError
from elastic_llm.sampling import SamplingParams, check_prompt_ids, validate_request

logger = logging.getLogger(__name__)

PLUGIN_NAME = "elastic_llm"
#: The policies a controller can run (`elastic_llm.control.policies`).
POLICIES = POLICY_NAMES
#: Seconds between the `Tick`s that let the state machine check deadlines and timers.
TICK_S = 0.5


class ElasticController(SchedulerPlugin):
    """Controller of elastic LLM serving on the Dask scheduler (register with `Client.register_plugin`).

    Args:
        model: embedded model name or checkpoint directory (every worker must see the same path).
        policy: a name of `POLICIES` ("spotserve", "reroute", "reparallelize", or one of
            SpotServe's ablations) or a `FleetPolicy`; an unknown name raises `UnknownPolicyError`.
        replica: engine settings of each replica.
        migration_margin_s: fixed part of a migration's time estimate (seconds): pausing, the
            actor calls, resuming; the KV part is its bytes over `kv_bandwidth`.
        kv_bandwidth: bytes/s at which KV moves between workers (for the grace-period arrangement).
        prefill_seconds_per_token: estimate of recompute cost per cached token (arrangement).
        on_demand_price_per_hour: price of the on-demand counterfactual in the cost report.
        profile: timings the planning core chooses sharded replicas' shapes with (with
            ``ReplicaOptions.parallel="auto"``): a JSON file of ``elastic-llm profile``, an
            `InstanceProfile`, or None for a CPU roofline.
        load_check_s: seconds between checks of the arrival rate (adaptive shapes).
        vocab_size, max_context: the model's, to check submitted requests against (None: only
            their types and signs are checked).
        unknown_price_per_hour: what a worker without instance metadata (market "unknown") is
            billed per hour; None: `on_demand_price_per_hour` (never $0, which would flatter spot).
        history: the fleet's history over time (None: one sample per second, the last hour).
        fleet_settings: further `FleetConfig` fields (e.g. client_reconnect_s, max_finished_records).
    """

    name = PLUGIN_NAME

    def __init__(self, model: str, policy: str | FleetPolicy = "spotserve", replica: ReplicaOptions | None = None,
                 migration_margin_s: float = 2.0, kv_bandwidth: float = 2e8,
                 prefill_seconds_per_token: float = 2e-3, on_demand_price_per_hour: float = 3.912,
                 profile: str | os.PathLike[str] | InstanceProfile | None = None, load_check_s: float = 5.0,
                 vocab_size: int | None = None, max_context: int | None = None,
                 unknown_price_per_hour: float | None = None, history: FleetHistory | None = None,
                 **fleet_settings: Any) -> None:
        fleet_policy = policy_by_name(policy)
        self.model = model
        self.policy = fleet_policy.name
        self.vocab_size, self.max_context = vocab_size, max_context
        self.replica_options = options = replica or ReplicaOptions(model=model)
        parallel = None if options.auto_parallel else (int(options.parallel[0]), int(options.parallel[1]))
        config = FleetConfig(parallel=parallel, max_batch_size=options.max_batch_size,
                             memory_budget_bytes=options.memory_budget_bytes, migration_margin_s=migration_margin_s,
                             kv_bandwidth=kv_bandwidth, prefill_seconds_per_token=prefill_seconds_per_token,
                             load_check_s=load_check_s, **fleet_settings)
        if profile is not None and not isinstance(profile, InstanceProfile):
            profile = MeasuredProfile.from_json(profile)
        self.fleet = FleetState(fleet_policy, config, profile)  #: the state machine
        self.table = self.fleet.table  #: the request table (committed tokens: the source of truth)
        self.ledger = CostLedger()
        self.on_demand_price = on_demand_price_per_hour
        self.unknown_price = on_demand_price_per_hour if unknown_price_per_hour is None else unknown_price_per_hour
        self.history = history or FleetHistory()  #: samples and events since the start (bounded)
        self.enactor: Enactor | None = None
        self._client: Client | None = None
        self._client_events: dict[str, asyncio.Event] = {}
        self._sessions: dict[str, str] = {}  # client session -> its token (bound at its first call)
        self._ticker: asyncio.Task[None] | None = None
        self._unregister_metrics: Callable[[], None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the loop: events in, instructions out
    def apply(self, event: ev.Event) -> None:
        """Hand one event to the state machine and carry out what it decides."""
        instructions = self.fleet.handle(event, time.time())
        if self.enactor is None:
            return
        for instruction in instructions:
            self.enactor.carry_out(instruction)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.apply(ev.Tick())
                self._observe()
            except Exception:  # noqa: BLE001 - the next tick tries again
                logger.exception("elastic_llm: tick failed")

    def _observe(self) -> None:
        """Feed the history what changed (and a sample once its interval has passed)."""
        now = time.time()
        report = self.ledger.report(now, on_demand_price_per_hour=self.on_demand_price)
        self.history.observe(self.fleet, now, report.total_usd, report.on_demand_only_usd)

    # ------------------------------------------------------------------ plugin hooks
    async def start(self, scheduler: Any) -> None:
        """Install handlers, connect an internal client (with the scheduler's own `Security`, so
        TLS clusters work), and take in the current workers. A start that fails undoes what it
        did, so registering the plugin again works."""
        self.scheduler = scheduler
        handlers = {
            "elastic_llm_submit": self._handler(self.submit),
            "elastic_llm_cancel": self._handler(self.cancel),
            "elastic_llm_poll": self.poll,
            "elastic_llm_status": self._handler(self.status),
        }
        try:
            self._client = await Client(scheduler.address, asynchronous=True, security=scheduler.security,
                                        name="elastic-llm-controller")
            scheduler.handlers.update(handlers)
            scheduler.stream_handlers[COMMIT_OP] = self.on_commit
            with contextlib.suppress(LookupError):  # notices arrive through the NoticeBoard plugin
                self._unsubscribe = NoticeBoard.of(scheduler).subscribe(self.on_notice)
            self._unregister_metrics = metrics.register(self.status)
        except BaseException:
            for name in handlers:
                scheduler.handlers.pop(name, None)
            scheduler.stream_handlers.pop(COMMIT_OP, None)
            await self.close()
            raise
        self.enactor = Enactor(self._client, self.replica_options, self._report, self._notify)
        try:  # the fleet page on the Dask dashboard: a view, never a reason not to serve
            dashboard_page.add_to_dashboard(scheduler)
        except Exception:  # noqa: BLE001
            logger.exception("elastic_llm: could not add the %s page to the dashboard", dashboard_page.ROUTE)
        for address, info in fleet_info(scheduler).items():
            self._join(address, info)
        self._ticker = asyncio.ensure_future(self._tick())

    async def close(self) -> None:
        """Stop background work, the metrics collector and the internal client."""
        if self._unregister_metrics is not None:
            self._unregister_metrics()
            self._unregister_metrics = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._ticker is not None:
            self._ticker.cancel()
        if self.enactor is not None:
            await self.enactor.close()
        if self._client is not None:
            await self._client.close()

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined."""
        self._join(worker, instance_info(scheduler.workers[worker]))

    def _join(self, address: str, info: Any) -> None:
        price = self.unknown_price if info.market == "unknown" else info.price_per_hour
        self.ledger.join(address, info.market, price, time.time())
        self.apply(ev.WorkerJoined(address, info.market, price, info.memory_bytes))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A worker left (with or without notice)."""
        with contextlib.suppress(KeyError, ValueError):
            self.ledger.leave(worker, time.time())
        self.apply(ev.WorkerLost(worker))

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A Dask client disconnected: its sessions' unfinished requests are aborted unless it
        calls again within `FleetConfig.client_reconnect_s`."""
        for session in [s for s in self._sessions if s == client or s.startswith(f"{client}#")]:
            self.apply(ev.ClientGone(session))
            self._client_events.pop(session, None)

    def valid_workers_downscaling(self, scheduler: Any, workers: list[Any]) -> list[Any]:
        """Workers that hold no replica may be retired (actors cannot be moved by Dask)."""
        held = {w for r in self.fleet.replicas.values() for w in (*r.workers, *r.reserved)}
        return [ws for ws in workers if ws.address not in held]

    def on_notice(self, notice: PreemptionNotice) -> None:
        """A preemption notice (from the NoticeBoard)."""
        self.apply(ev.WorkerNoticed(notice.worker, notice.deadline))

    def on_commit(self, commit: dict[str, Any] | None = None, worker: str | None = None, **_: Any) -> None:
        """One replica's iteration (a `ReplicaCommit` on the wire). Dask names the worker whose
        stream carried it; a commit on a client's stream (no `worker`) is refused as forged."""
        if worker is None:
            self.fleet.commits_refused += 1
            logger.warning("elastic_llm: refused a commit that did not come from a worker's stream")
            return
        try:
            self.apply(ev.TokensCommitted(ReplicaCommit.from_wire(commit or {}), origin=worker))
        except Exception:  # noqa: BLE001 - a bad message must not break the scheduler's stream
            logger.exception("elastic_llm: a commit failed")

    def _report(self, event: ev.Event) -> None:
        try:
            self.apply(event)
        except Exception:  # noqa: BLE001 - one bad transition must not stop the enactor
            logger.exception("elastic_llm: handling %s failed", type(event).__name__)

    # ------------------------------------------------------------------ client handlers
    def submit(self, client: str, requests: list[dict[str, Any]], token: str | None = None) -> list[str]:
        """Accept requests: [{request_id, prompt_token_ids, params}], all or none: every item is
        checked again here (a caller may bypass `ServingClient`) before any is accepted; a bad
        one raises `InvalidRequestError` naming it. `client`'s first call binds its `token`."""
        self._authorize(client, token)
        submitted = [self._checked(client, item) for item in requests]
        ids = [event.request_id for event in submitted]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("request ids must be distinct within one submit")
        self._client_events.setdefault(client, asyncio.Event())
        for event in submitted:
            self.apply(event)
        return ids

    def cancel(self, request_ids: list[str], client: str = "", token: str | None = None) -> int:
        """Abort `client`'s own requests among `request_ids`; returns how many were still running."""
        self._authorize(client, token)
        own = [i for i in request_ids if i in self.table and self.table.get(i).client == client]
        running = [i for i in own if self.table.get(i).status.value in ("queued", "running")]
        self.apply(ev.RequestsCancelled(tuple(own)))
        return len(running)

    async def poll(self, client: str, cursor: int, timeout: float = 1.0,
                   token: str | None = None) -> list[dict[str, Any]]:
        """Events of `client`'s requests from `cursor` on; waits up to `timeout` s for the first.
        If events it had not read were dropped, one event of kind "lost" says so (and where the
        log resumes)."""
        self._authorize(client, token)
        events = self._events_since(client, cursor)
        if not events:
            event = self._client_events.setdefault(client, asyncio.Event())
            event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), max(0.0, min(float(timeout), 30.0)))
            events = self._events_since(client, cursor)
        return [e.to_wire() for e in events]

    def _events_since(self, client: str, cursor: int) -> list[ClientEvent]:
        try:
            return self.table.events_since(client, int(cursor))
        except EventsLostError as exc:
            return [ClientEvent(exc.resume_at - 1, "", "lost", error=str(exc))]

    def _authorize(self, client: str, token: str | None) -> None:
        """A client session's first call binds its token; later calls must carry the same."""
        if not isinstance(client, str) or not client or not isinstance(token, str) or not token:
            raise UnauthorizedError("a client id and its token are required")
        known = self._sessions.setdefault(client, token)
        if not secrets.compare_digest(known, token):
            raise UnauthorizedError(f"client {client!r} belongs to another session")
        if client in self.fleet.clients.away:  # it reconnected: its requests carry on
            self.apply(ev.ClientBack(client))

    def status(self, history_since: int | None = None) -> dict[str, Any]:
        """Deployment, per-replica load, queue, latency, counters and cost; with `history_since`
        (a cursor: 0 for everything kept) also ``"history"``, `FleetHistory.to_dict(history_since)`."""
        now = time.time()
        status = self.fleet.status(now)
        report = self.ledger.report(now, on_demand_price_per_hour=self.on_demand_price,
                                    tokens=status["tokens_finished"])
        status["cost"] = {"spot_usd": report.spot_usd, "on_demand_usd": report.on_demand_usd,
                          "spot_instance_seconds": report.spot_instance_seconds,
                          "on_demand_instance_seconds": report.on_demand_instance_seconds,
                          "on_demand_only_usd": report.on_demand_only_usd,
                          "usd_per_1k_tokens": report.usd_per_1k_tokens,
                          "on_demand_only_usd_per_1k_tokens": report.on_demand_only_usd_per_1k_tokens,
                          "savings_vs_on_demand": report.savings_vs_on_demand}
        status["cost"]["unknown_usd"] = report.unknown_usd
        status["window"] = self.history.latest()  # the newest windowed sample (latency, tokens/s)
        status["capacity_requests"] = list(self.enactor.capacity_requests) if self.enactor else []
        if history_since is not None:
            status["history"] = self.history.to_dict(history_since)
        return status

    def _checked(self, client: str, item: Any) -> ev.RequestSubmitted:
        """One submitted item as an event, or `InvalidRequestError`."""
        if not isinstance(item, dict) or set(item) != {"request_id", "prompt_token_ids", "params"}:
            raise InvalidRequestError("each request is {request_id, prompt_token_ids, params}")
        request_id, params = item["request_id"], item["params"]
        if not isinstance(request_id, str) or not request_id or len(request_id) > 256:
            raise InvalidRequestError("request_id must be a non-empty str of at most 256 characters")
        if request_id in self.table:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not isinstance(params, dict):
            raise InvalidRequestError("params must be a dict of SamplingParams fields")
        vocab, context = self.vocab_size or 2**31, self.max_context or 2**31
        prompt = check_prompt_ids(item["prompt_token_ids"], vocab, context)
        try:
            sampling = SamplingParams(**params)
        except TypeError as exc:  # an unknown field
            raise InvalidRequestError(f"params: {exc}") from None
        if self.vocab_size is not None and self.max_context is not None:
            validate_request(sampling, self.vocab_size, self.max_context)
        return ev.RequestSubmitted(request_id, client, prompt, sampling)

    # ------------------------------------------------------------------ small utilities
    def _handler(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """A scheduler handler around `method`: keyword arguments only, the comm dropped."""
        def handle(comm: Any = None, **kwargs: Any) -> Any:
            return method(**kwargs)
        return handle

    def _notify(self, clients: tuple[str, ...]) -> None:
        for client in clients:
            event = self._client_events.get(client)
            if event is not None:
                event.set()
