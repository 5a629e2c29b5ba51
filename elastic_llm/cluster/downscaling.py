"""Keep Dask from scaling down workers that hold model shards.

Shard actors cannot be moved by Dask, and `Adaptive` closes workers that `retire_workers` refused
(see ANCHORS.md). Dask asks every scheduler plugin's ``valid_workers_downscaling`` inside
``Scheduler.workers_to_close``, which both `Adaptive` and ``retire_workers(n=...)`` use to choose
victims; `ScaleDownVeto` removes the protected workers from the candidates there.
(``retire_workers(workers=[...])`` with explicit addresses is an operator's order and is not
vetoed.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from distributed.diagnostics.plugin import SchedulerPlugin

if TYPE_CHECKING:
    from distributed.scheduler import Scheduler, WorkerState


class ScaleDownVeto(SchedulerPlugin):
    """Scheduler plugin refusing to offer workers that hold shards for scale-down.

    The controller updates the protected set (`protect`, `release`, `set_protected`) as its
    placement changes; a worker that leaves is dropped from the set. It can be registered on its
    own (``client.register_plugin(ScaleDownVeto())``) or owned by another plugin that forwards its
    own ``valid_workers_downscaling`` to `filter`.
    """

    name: ClassVar[str] = "elastic_llm.scale_down_veto"
    idempotent = True

    def __init__(self, protected: Iterable[str] = ()) -> None:
        self._protected: set[str] = set(protected)
        self.vetoes = 0  #: how many times a candidate was refused (for tests and monitoring)

    @classmethod
    def of(cls, scheduler: Scheduler) -> ScaleDownVeto:
        """The veto registered on ``scheduler`` (raises `LookupError` when there is none)."""
        plugin = scheduler.plugins.get(cls.name)
        if not isinstance(plugin, ScaleDownVeto):
            raise LookupError("no ScaleDownVeto registered on this scheduler")
        return plugin

    @property
    def protected(self) -> frozenset[str]:
        """Addresses of the workers currently protected."""
        return frozenset(self._protected)

    def protect(self, addresses: Iterable[str]) -> None:
        """Protect more workers."""
        self._protected.update(addresses)

    def release(self, addresses: Iterable[str]) -> None:
        """Stop protecting these workers."""
        self._protected.difference_update(addresses)

    def set_protected(self, addresses: Iterable[str]) -> None:
        """Protect exactly these workers (e.g. every worker of the new placement)."""
        self._protected = set(addresses)

    def filter(self, workers: list[WorkerState]) -> list[WorkerState]:
        """The candidates that hold no shard."""
        allowed = [ws for ws in workers if ws.address not in self._protected]
        self.vetoes += len(workers) - len(allowed)
        return allowed

    def valid_workers_downscaling(self, scheduler: Scheduler,
                                  workers: list[WorkerState]) -> list[WorkerState]:
        """Dask hook (called by ``Scheduler.workers_to_close``)."""
        return self.filter(workers)

    def remove_worker(self, scheduler: Scheduler, worker: str, *, stimulus_id: str,
                      **kwargs: Any) -> None:
        """A worker that left needs no protection."""
        self._protected.discard(worker)
