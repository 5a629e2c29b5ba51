"""Preemption notices: where they arrive on the scheduler, and how to send one.

`NoticeBoard` is a `SchedulerPlugin` that installs the scheduler handler
``elastic_llm_preemption_notice``. Workers (`MetadataWatcher`), the `SpotEmulator` and clients
(`send_preemption_notice`) all call that one handler, with the fields of a `PreemptionNotice` as
keyword arguments. The board keeps the pending notice of each worker, tells its listeners (the
controller is one: a plain ``callable(notice)``, called on the scheduler's event loop, so it must
return quickly), logs each notice as a Dask event on topic ``elastic_llm.preemption`` (clients can
``subscribe_topic`` it), and forgets the notices of workers that have left.
"""

from __future__ import annotations

import logging
import math
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

#: Name of the scheduler handler that receives notices.
NOTICE_HANDLER = "elastic_llm_preemption_notice"
#: Dask event topic each accepted notice is logged under.
NOTICE_TOPIC = "elastic_llm.preemption"

NoticeStatus = Literal["accepted", "duplicate", "unknown-worker", "invalid"]
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

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self._pending: dict[str, PreemptionNotice] = {}
        self._history: list[PreemptionNotice] = []
        self._listeners: list[Listener] = []

    # ---- Dask hooks ---------------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        """Install the notice handler on the scheduler."""
        self.scheduler = scheduler
        scheduler.handlers[NOTICE_HANDLER] = self._handle

    async def close(self) -> None:
        """Remove the handler."""
        if self.scheduler is not None and self.scheduler.handlers.get(NOTICE_HANDLER) == self._handle:
            del self.scheduler.handlers[NOTICE_HANDLER]

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

    # ---- handler ------------------------------------------------------------------------------
    def _handle(self, worker: str | int, deadline: float, instance_id: str = "",
                source: str = "api") -> NoticeStatus:
        """Scheduler handler: ``worker`` may be an address or a worker name."""
        assert self.scheduler is not None, "NoticeBoard handler called before start()"
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
        notice = PreemptionNotice(worker=address, instance_id=instance_id or instance_info(ws).instance_id,
                                  deadline=deadline, source=source)
        status = self.receive(notice)
        logger.info("preemption notice %s: %s", status, notice)
        return status


async def post_notice(scheduler_rpc: Any, notice: PreemptionNotice) -> NoticeStatus:
    """Send ``notice`` through any rpc to the scheduler (``worker.scheduler``,
    ``client.scheduler``, ``cluster.scheduler_comm``); returns the board's verdict.

    Raises `LookupError` when the scheduler has no `NoticeBoard`."""
    return await _call_board(scheduler_rpc, **notice.to_dict())


async def _call_board(scheduler_rpc: Any, **fields: Any) -> NoticeStatus:
    status: NoticeStatus | None = await getattr(scheduler_rpc, NOTICE_HANDLER)(**fields)
    if status is None:  # Dask answers None to an op it has no handler for
        raise LookupError("no NoticeBoard registered on the scheduler: "
                          "client.register_plugin(NoticeBoard())")
    return status


def send_preemption_notice(client: Client, worker: str | int, *, deadline: float | None = None,
                           grace_s: float | None = None, instance_id: str = "",
                           source: str = "api") -> Any:
    """Announce from a client that ``worker`` (address or name) goes away at ``deadline``.

    Give either an absolute wall-clock ``deadline`` or ``grace_s`` seconds from now. The instance
    id defaults to the worker's. Returns the board's verdict (``"accepted"``, ``"duplicate"``,
    ``"unknown-worker"``, ``"invalid"``), or an awaitable of it for an asynchronous client.
    Raises `LookupError` when the scheduler has no `NoticeBoard`.
    """
    if (deadline is None) == (grace_s is None):
        raise ClusterConfigError("give exactly one of deadline= and grace_s=")
    when = deadline if deadline is not None else time.time() + float(grace_s)  # type: ignore[arg-type]
    return client.sync(_call_board, client.scheduler, worker=worker, deadline=when,
                       instance_id=instance_id, source=source)
