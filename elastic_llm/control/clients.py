"""Which clients are away: disconnected ones that may still reconnect, and gone ones whose
requests were aborted (their event logs kept a while). Pure: times are parameters."""

from __future__ import annotations


class ClientPresence:
    """Disconnected clients (since when) and gone ones (aborted since when), for `FleetState`."""

    def __init__(self) -> None:
        self.disconnects = 0  #: client sessions that disconnected
        self._disconnected: dict[str, float] = {}  # clients gone -> when (may still reconnect)
        self._gone: dict[str, float] = {}  # clients whose requests were aborted -> when

    def submitted(self, client: str) -> None:
        """`client` submitted a request: it is not gone."""
        self._gone.pop(client, None)

    def disconnected(self, client: str, now: float) -> None:
        """`client`'s session ended at `now` (the first time counts)."""
        self.disconnects += 1
        self._disconnected.setdefault(client, now)

    def back(self, client: str) -> None:
        """`client` reconnected: all its requests carry on."""
        self._disconnected.pop(client, None), self._gone.pop(client, None)

    @property
    def away(self) -> frozenset[str]:
        """Clients disconnected and not yet given up on (their requests still run)."""
        return frozenset(self._disconnected)

    def give_up(self, now: float, reconnect_s: float) -> list[str]:
        """Clients disconnected `reconnect_s` or longer: now gone (their requests are to be aborted)."""
        expired = [c for c, since in self._disconnected.items() if now - since >= reconnect_s]
        for client in expired:
            del self._disconnected[client]
            self._gone[client] = now
        return expired

    def forget(self, now: float, log_ttl_s: float) -> list[str]:
        """Clients gone `log_ttl_s` or longer: no longer tracked (their logs are to be dropped)."""
        expired = [c for c, since in self._gone.items() if now - since >= log_ttl_s]
        for client in expired:
            del self._gone[client]
        return expired

    def give_up_times(self, reconnect_s: float) -> list[float]:
        """When each disconnected client is to be given up on, unless it reconnects."""
        return [since + reconnect_s for since in self._disconnected.values()]
