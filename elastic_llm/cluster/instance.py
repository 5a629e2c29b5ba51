"""How a Dask worker carries its `InstanceInfo`, and how the scheduler reads it.

Dask mechanism: a worker sends ``Worker.startup_information`` (a mapping of callables) in its
registration message, and the scheduler keeps the result as ``WorkerState.extra``. The
`InstanceMetadata` worker plugin adds one entry there. Plugins given to the worker's constructor
(``Worker(plugins=...)``, also through a `Nanny` or a `SpecCluster` worker spec) are set up *before*
the worker registers, so the scheduler, and every `SchedulerPlugin.add_worker` hook, sees the info
from the first moment. A CLI worker gets the same through ``dask worker --preload
elastic_llm.cluster.instance`` with ``ELASTIC_LLM_*`` environment variables (`dask_setup`).

A worker without metadata (a plain `LocalCluster` worker) reads as an instance of market
"unknown" named after the worker, whose memory budget is its Dask memory limit; the controller
bills it at its ``unknown_price_per_hour`` (by default the on-demand price), never at $0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from distributed import Client
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from elastic_llm.cluster.contracts import DEFAULT_GRACE_S, UNBOUNDED_MEMORY, InstanceInfo, parse_market
from elastic_llm.cluster.errors import ClusterConfigError

if TYPE_CHECKING:
    from distributed import Worker
    from distributed.scheduler import Scheduler, WorkerState

logger = logging.getLogger(__name__)

#: Key of the instance metadata in ``Worker.startup_information`` and ``WorkerState.extra``.
EXTRA_KEY = "elastic_llm.instance"

#: Environment variables read by `InstanceInfo` for CLI workers (see `info_from_env`).
ENV_PREFIX = "ELASTIC_LLM_"


class InstanceMetadata(WorkerPlugin):
    """Worker plugin that holds this worker's `InstanceInfo` and announces it at registration.

    Pass it to the worker's constructor: ``Nanny(..., plugins=(InstanceMetadata(info),))`` or the
    ``options`` of a `SpecCluster` worker spec. Registering it later with `Client.register_plugin`
    would give every worker the same info and arrive after registration, so that is refused with
    a warning and has no effect on the scheduler.
    """

    name = EXTRA_KEY
    idempotent = False

    def __init__(self, info: InstanceInfo) -> None:
        self.info = info

    def setup(self, worker: Worker) -> None:
        """Add the info to the worker's start-up information (before it registers)."""
        if worker.status not in (Status.init, Status.created, Status.starting):
            logger.warning("InstanceMetadata(%s) set up on an already registered worker %s: the "
                           "scheduler will not see it; pass it to the worker's constructor instead",
                           self.info.instance_id, worker.address)
        payload = self.info.to_dict()
        worker.startup_information[EXTRA_KEY] = lambda _worker: payload


def _default_info(name: object, memory_limit: int | None) -> InstanceInfo:
    return InstanceInfo(instance_id=str(name), market="unknown", memory_bytes=memory_limit or UNBOUNDED_MEMORY)


def instance_info(ws: WorkerState) -> InstanceInfo:
    """Scheduler side: the `InstanceInfo` of one worker (defaults when it carries none)."""
    data = ws.extra.get(EXTRA_KEY) if ws.extra else None
    if isinstance(data, Mapping):
        try:
            return InstanceInfo.from_dict(dict(data))
        except (ClusterConfigError, TypeError) as exc:
            logger.warning("worker %s sent invalid instance metadata %r: %s", ws.address, data, exc)
    return _default_info(ws.name, ws.memory_limit)


def fleet_info(dask_scheduler: Scheduler) -> dict[str, InstanceInfo]:
    """Scheduler side: ``{worker address: InstanceInfo}`` for every worker.

    Usable inside the scheduler (plugins) and through ``client.run_on_scheduler(fleet_info)``.
    """
    return {address: instance_info(ws) for address, ws in dask_scheduler.workers.items()}


def get_fleet_info(client: Client) -> dict[str, InstanceInfo]:
    """Client side: every worker's `InstanceInfo`, read from the scheduler."""
    result: dict[str, InstanceInfo] = client.run_on_scheduler(fleet_info)
    return result


def local_instance_info(worker: Worker) -> InstanceInfo:
    """Worker side: this worker's `InstanceInfo` (from `InstanceMetadata`, else the defaults)."""
    plugin = worker.plugins.get(EXTRA_KEY)
    if isinstance(plugin, InstanceMetadata):
        return plugin.info
    return _default_info(worker.name, worker.memory_manager.memory_limit)


def info_from_env(default_id: str, environ: Mapping[str, str] | None = None) -> InstanceInfo:
    """Build an `InstanceInfo` from ``ELASTIC_LLM_INSTANCE_ID``, ``_MARKET``, ``_PRICE_PER_HOUR``,
    ``_MEMORY_BYTES`` and ``_GRACE_S`` (each optional; ``default_id`` names the instance otherwise)."""
    env = os.environ if environ is None else environ

    def get(key: str) -> str | None:
        value = env.get(ENV_PREFIX + key)
        return value if value not in (None, "") else None

    try:
        return InstanceInfo(
            instance_id=get("INSTANCE_ID") or default_id,
            market=parse_market(get("MARKET") or "on-demand"),
            price_per_hour=float(get("PRICE_PER_HOUR") or 0.0),
            memory_bytes=int(get("MEMORY_BYTES") or UNBOUNDED_MEMORY),
            grace_s=float(get("GRACE_S") or DEFAULT_GRACE_S),
        )
    except ValueError as exc:
        raise ClusterConfigError(f"invalid {ENV_PREFIX}* instance metadata: {exc}") from exc


def dask_setup(worker: Worker) -> None:
    """Preload hook: ``dask worker --preload elastic_llm.cluster.instance`` (info from env vars).

    Preloads run before the worker registers, like constructor plugins.
    """
    info = info_from_env(str(worker.name) if worker.name is not None else worker.address)
    plugin = InstanceMetadata(info)
    plugin.setup(worker)
    worker.plugins[EXTRA_KEY] = plugin


def instance_metadata_options(info: InstanceInfo, options: Mapping[str, Any]) -> dict[str, Any]:
    """Worker/Nanny constructor options that add `InstanceMetadata(info)` and name the worker
    after the instance, keeping every other option (and plugin) of ``options``."""
    merged = dict(options)
    merged["name"] = info.instance_id
    merged["plugins"] = (*tuple(options.get("plugins", ())), InstanceMetadata(info))
    return merged
