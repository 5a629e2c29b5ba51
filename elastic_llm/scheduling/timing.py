"""When a job arrived, produced its first token and finished: shared by the live replay and the simulator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobTiming:
    """What happened to one request, in seconds from the workload's start."""

    request_id: str  #: the request
    arrival_s: float  #: when it arrived
    first_token_s: float  #: when its first output token was committed
    finish_s: float  #: when its last output token was committed

    @property
    def completion_time_s(self) -> float:
        """Job completion time: arrival to last token."""
        return self.finish_s - self.arrival_s

    @property
    def time_to_first_token_s(self) -> float:
        """Arrival to first token."""
        return self.first_token_s - self.arrival_s
