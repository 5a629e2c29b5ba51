"""`CapacityFulfiller`: carries out the fleet's capacity requests on a `SpotEmulator`.

A capacity-aware policy (``beyond``: `elastic_llm.control.capacity`) decides how many instances the
fleet holds; the controller's enactor publishes each decision on the Dask event topic
`CAPACITY_TOPIC` ("AcquireCapacity": count, market; "ReleaseCapacity": worker). On a cloud an
autoscaler subscribes there and calls the cloud's API. On one machine this class is that
autoscaler: it subscribes with `Client.subscribe_topic` and asks the emulator for real worker
processes (named ``<prefix>-1``, ``<prefix>-2``, ... on the market asked for, at that market's
price) or kills the instance of a worker given back. No decision is made here.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from distributed import Client

from elastic_llm.cluster.emulator import SpotEmulator
from elastic_llm.cluster.enactor import CAPACITY_TOPIC

logger = logging.getLogger(__name__)

#: $/h of a g4dn.12xlarge (the artifact's instance), by market: what an emulated instance costs
DEFAULT_PRICES: Mapping[str, float] = {"spot": 1.9046, "on-demand": 3.912}

CapacityAction = Literal["acquire", "release", "ignored"]


@dataclass(frozen=True)
class CapacityRecord:
    """One capacity request the fulfiller acted on."""

    wall_time: float  #: ``time.time()`` when the request arrived
    action: CapacityAction  #: what it did ("ignored": a message it does not understand)
    instance_id: str = ""  #: the instance started or given back
    market: str = ""  #: its market
    detail: str = ""  #: the message, for "ignored"


class CapacityFulfiller:
    """Fulfils `CAPACITY_TOPIC` messages with the emulator's instances.

    Args:
        client: a Dask client of the emulator's cluster (the subscription runs on it).
        emulator: starts and kills the worker processes.
        prices: $/h by market of the instances it starts.
        prefix: name prefix of the instances it starts (must not clash with the trace's ids).
    """

    def __init__(self, client: Client, emulator: SpotEmulator, *,
                 prices: Mapping[str, float] = DEFAULT_PRICES, prefix: str = "acquired") -> None:
        self.client = client
        self.emulator = emulator
        self.prices = dict(prices)
        self.prefix = prefix
        self._numbers = itertools.count(1)
        self._records: list[CapacityRecord] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Subscribe to the capacity topic (before the controller can ask)."""
        self.client.subscribe_topic(CAPACITY_TOPIC, self._on_event)

    def stop(self) -> None:
        """Unsubscribe; instances already started stay up."""
        self.client.unsubscribe_topic(CAPACITY_TOPIC)

    @property
    def records(self) -> tuple[CapacityRecord, ...]:
        """What it did so far, oldest first."""
        with self._lock:
            return tuple(self._records)

    def _on_event(self, event: tuple[float, Any]) -> None:
        """One topic message (`(timestamp, msg)`): start or give back instances, without waiting."""
        message = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        kind = message.get("instruction") if isinstance(message, dict) else None
        if kind == "AcquireCapacity" and isinstance(message.get("count"), int) and message["count"] > 0:
            market = str(message.get("market", "on-demand"))
            for _ in range(message["count"]):
                name = f"{self.prefix}-{next(self._numbers)}"
                self._record("acquire", name, market)
                self.emulator.acquire_soon(name, market=market,  # type: ignore[arg-type]
                                           price_per_hour=self.prices.get(market, 0.0))
        elif kind == "ReleaseCapacity" and isinstance(message.get("worker"), str):
            name = self.emulator.instance_at(message["worker"]) or ""
            self._record("release", name, detail=message["worker"])
            self.emulator.release_soon(message["worker"])
        else:
            logger.warning("capacity fulfiller: ignored %r", message)
            self._record("ignored", detail=repr(message))

    def _record(self, action: CapacityAction, instance_id: str = "", market: str = "", detail: str = "") -> None:
        record = CapacityRecord(time.time(), action, instance_id, market, detail)
        logger.info("capacity fulfiller: %s", record)
        with self._lock:
            self._records.append(record)
