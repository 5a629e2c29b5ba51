"""Preemption notices: where they arrive on the scheduler, and how to send one.

`NoticeBoard` is a `SchedulerPlugin` that takes notices two ways, each checked:

- **from a worker about itself** (`MetadataWatcher`): on the worker's own stream to the scheduler
  (op ``elastic_llm_worker_notice``), which Dask tags with the sending worker; a notice naming any
  other worker is refused;
- **from an operator** (`send_preemption_notice`, `ServingClient.preempt`, the `SpotEmulator`): the
  scheduler handler ``elastic_llm_preemption_notice`` with the board's operator token (set with
  ``NoticeBoard(operator_token=...)`` or ``ELASTIC_LLM_OPERATOR_TOKEN`` on the scheduler, else
  generated there; `operator_token(client)` reads it). Dask trusts every client that can connect
  (any client can run code on the scheduler), so the token keeps out callers of our handlers that
  are not Dask operators, such as the HTTP gateway's users; TLS client certificates decide who
  connects at all.

Deadlines are clamped to [now, now + `MAX_NOTICE_S`]. The board keeps the pending notice of each
worker, tells its listeners (the
controller is one: a plain ``callable(notice)``, called on the scheduler's event loop, so it must
return quickly), logs each notice as a Dask event on topic ``elastic_llm.preemption`` (clients can
``subscribe_topic`` it), and forgets the notices of workers that have left.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.instance import instance_info

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler

logger = logging.getLogger(__name__)

#: Name of the scheduler handler that receives operators' notices.
NOTICE_HANDLER = "elastic_llm_preemption_notice"
#: Stream op on which a worker announces its own preemption.
WORKER_NOTICE_OP = "elastic_llm_worker_notice"
#: Name of the scheduler handler answering a worker's pending notice deadline (read only).
PENDING_HANDLER = "elastic_llm_notice_pending"
#: The latest deadline a notice may set, in seconds from its arrival (clouds give 30-120 s).
MAX_NOTICE_S = 900.0
#: Dask event topic each accepted notice is logged under.
NOTICE_TOPIC = "elastic_llm.preemption"

NoticeStatus = Literal["accepted", "duplicate", "unknown-worker", "invalid", "unauthorized"]
Listener = Callable[[PreemptionNotice], None]


class NoticeBoard(SchedulerPlugin):
    """Scheduler plugin receiving preemption notices and handing them to listeners.

    Register once with ``client.register_plugin(NoticeBoard())`` (idempotent: a second
    registration keeps the first board and its listeners). Code running in the scheduler finds it
    with `NoticeBoard.of(scheduler)`.

    A second notice for a worker that already has one is accepted only if its deadline is
    earlier (then listeners hear it again); otherwise it is a ``"duplicate"``.
    """

    name: ClassVar[str] = "elastic_llm.notice_board"
    idempotent = True

    def __init__(self, operator_token: str | None = None) -> None:
        self.scheduler: Scheduler | None = None
        self.operator_token = operator_token  #: what operators' notices must carry (set at start)
        self._pending: dict[str, PreemptionNotice] = {}
        self._history: list[PreemptionNotice] = []
        self._listeners: list[Listener] = []

    # ---- Dask hooks ---------------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        """Install the notice handler on the scheduler."""
        self.scheduler = scheduler
        self.operator_token = (self.operator_token or os.environ.get("ELASTIC_LLM_OPERATOR_TOKEN")
                               or secrets.token_urlsafe(24))
        scheduler.handlers[NOTICE_HANDLER] = self._handle
        scheduler.handlers[PENDING_HANDLER] = self._pending_deadline
        scheduler.stream_handlers[WORKER_NOTICE_OP] = self._handle_from_worker

    async def close(self) -> None:
        """Remove the handlers."""
        if self.scheduler is not None and self.scheduler.handlers.get(NOTICE_HANDLER) == self._handle:
            del self.scheduler.handlers[NOTICE_HANDLER]
            self.scheduler.handlers.pop(PENDING_HANDLER, None)
            self.scheduler.stream_handlers.pop(WORKER_NOTICE_OP, None)

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str,
                      **kwargs: Any) -> None:
        """Forget the pending notice of a worker that has left."""
        self._pending.pop(worker, None)

    # ---- API ----------------------------------------------------------------------------------
    @classmethod
    def of(cls, scheduler: Scheduler) -> NoticeBoard:
        """The board registered on ``scheduler`` (raises `LookupError` when there is none)."""
        board = scheduler.plugins.get(cls.name)
        if not isinstance(board, NoticeBoard):
            raise LookupError("no NoticeBoard registered on this scheduler: "
                              "client.register_plugin(NoticeBoard())")
        return board

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(notice)`` for every accepted notice; returns an unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def pending(self) -> dict[str, PreemptionNotice]:
        """``{worker address: notice}`` for workers noticed and still present."""
        return dict(self._pending)

    def history(self) -> tuple[PreemptionNotice, ...]:
        """Every accepted notice, oldest first (kept after the worker leaves)."""
        return tuple(self._history)

    def receive(self, notice: PreemptionNotice) -> NoticeStatus:
        """Accept ``notice`` (in the scheduler's event loop) and tell the listeners."""
        if self.scheduler is not None and notice.worker not in self.scheduler.workers:
            return "unknown-worker"
        current = self._pending.get(notice.worker)
        if current is not None and current.deadline <= notice.deadline:
            return "duplicate"
        self._pending[notice.worker] = notice
        self._history.append(notice)
        if self.scheduler is not None:
            self.scheduler.log_event(NOTICE_TOPIC, notice.to_dict())
        for listener in list(self._listeners):
            try:
                listener(notice)
            except Exception:  # a broken listener must not break the scheduler or the others
                logger.exception("preemption-notice listener %r failed on %s", listener, notice)
        return "accepted"

    # ---- handlers -----------------------------------------------------------------------------
    def _handle(self, worker: str | int, deadline: float, instance_id: str = "",
                source: str = "api", token: str | None = None) -> NoticeStatus:
        """Scheduler handler for operators: ``worker`` may be an address or a worker name."""
        assert self.scheduler is not None, "NoticeBoard handler called before start()"
        if token is None or not secrets.compare_digest(str(token), str(self.operator_token)):
            logger.warning("refused a preemption notice for %r without the operator token", worker)
            return "unauthorized"
        return self._accept(worker, deadline, instance_id, source)

    def _handle_from_worker(self, worker: str, notice: dict[str, Any]) -> None:
        """Stream handler: a worker (Dask names it) announcing its own preemption."""
        if notice.get("worker") != worker:
            logger.warning("worker %s sent a notice about %r: refused", worker, notice.get("worker"))
            return
        self._accept(worker, notice.get("deadline"), str(notice.get("instance_id", "")),  # type: ignore[arg-type]
                     str(notice.get("source", "")))

    def _pending_deadline(self, worker: str) -> dict[str, float | None]:
        """Scheduler handler (read only): ``{"deadline": the pending notice's deadline of
        `worker`, or None}`` (Dask answers None itself when there is no board)."""
        pending = self._pending.get(worker)
        return {"deadline": None if pending is None else pending.deadline}

    def _accept(self, worker: str | int, deadline: float, instance_id: str, source: str) -> NoticeStatus:
        assert self.scheduler is not None
        try:
            deadline = float(deadline)
            if not math.isfinite(deadline):
                raise ValueError(f"deadline {deadline}")
            address = self.scheduler.coerce_address(worker) if isinstance(worker, str) \
                else self.scheduler.aliases.get(worker, "")
        except (TypeError, ValueError, OSError) as exc:  # OSError: unresolvable host
            logger.warning("invalid preemption notice for %r: %s", worker, exc)
            return "invalid"
        ws = self.scheduler.workers.get(address)
        if ws is None:
            return "unknown-worker"
        now = time.time()
        deadline = min(max(deadline, now), now + MAX_NOTICE_S)
        notice = PreemptionNotice(worker=address, instance_id=instance_id or instance_info(ws).instance_id,
                                  deadline=deadline, source=source)
        status = self.receive(notice)
        logger.info("preemption notice %s: %s", status, notice)
        return status


def operator_token(client: Client) -> str:
    """The operator token of the NoticeBoard on `client`'s scheduler (a Dask client may run code
    on the scheduler, so it may read it)."""
    def read(dask_scheduler: Any) -> str:
        return str(NoticeBoard.of(dask_scheduler).operator_token)

    return client.run_on_scheduler(read)  # type: ignore[no-any-return]


async def post_notice(scheduler_rpc: Any, notice: PreemptionNotice, token: str | None) -> NoticeStatus:
    """Send ``notice`` as an operator through any rpc to the scheduler (``client.scheduler``,
    ``cluster.scheduler_comm``) with the operator `token`; returns the board's verdict.

    Raises `LookupError` when the scheduler has no `NoticeBoard`."""
    return await _call_board(scheduler_rpc, **notice.to_dict(), token=token)


async def _call_board(scheduler_rpc: Any, **fields: Any) -> NoticeStatus:
    status: NoticeStatus | None = await getattr(scheduler_rpc, NOTICE_HANDLER)(**fields)
    if status is None:  # Dask answers None to an op it has no handler for
        raise LookupError("no NoticeBoard registered on the scheduler: "
                          "client.register_plugin(NoticeBoard())")
    return status


def send_preemption_notice(client: Client, worker: str | int, *, deadline: float | None = None,
                           grace_s: float | None = None, instance_id: str = "",
                           source: str = "api", token: str | None = None) -> Any:
    """Announce from a client that ``worker`` (address or name) goes away at ``deadline``.

    Give either an absolute wall-clock ``deadline`` or ``grace_s`` seconds from now. The instance
    id defaults to the worker's. Returns the board's verdict (``"accepted"``, ``"duplicate"``,
    ``"unknown-worker"``, ``"invalid"``, ``"unauthorized"``), or an awaitable of it for an
    asynchronous client. `token`: the operator token (default: read with `operator_token`).
    Raises `LookupError` when the scheduler has no `NoticeBoard`.
    """
    if (deadline is None) == (grace_s is None):
        raise ClusterConfigError("give exactly one of deadline= and grace_s=")
    when = deadline if deadline is not None else time.time() + float(grace_s)  # type: ignore[arg-type]
    if token is None:
        if client.asynchronous:
            raise ClusterConfigError("an asynchronous client passes token= (see operator_token)")
        token = operator_token(client)
    return client.sync(_call_board, client.scheduler, worker=worker, deadline=when,
                       instance_id=instance_id, source=source, token=token)
