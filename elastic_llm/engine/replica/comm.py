"""The data plane of one process: its `torch.distributed` group of the current configuration epoch.

Each epoch is a fresh default process group that rendezvouses on the driver's TCPStore under the
prefix ``epoch-<n>``; joining a new epoch destroys the previous group first, inside the same live
process. Tensor-parallel groups (one per stage) are created by every member, as `new_group`
requires. Every operation times out after the group's timeout, so a dead peer raises instead of
hanging. Point-to-point messages travel as raw bytes, which makes them dtype-agnostic on gloo.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from elastic_llm.engine.replica.messages import GroupSpec


class Collectives:
    """Membership in one epoch's process group plus the operations a shard needs."""

    def __init__(self) -> None:
        self.spec: GroupSpec | None = None
        self._client: dist.TCPStore | None = None
        self._tensor_group: dist.ProcessGroup | None = None
        self.tensor_size = 1  #: ranks in this process's tensor-parallel group

    @property
    def joined(self) -> bool:
        """Whether this process is a member of a live group."""
        return self.spec is not None

    def join(self, spec: GroupSpec) -> None:
        """Leave the current group (if any) and join `spec`'s."""
        self.leave()
        timeout = timedelta(seconds=spec.timeout_s)
        if self._client is None or (self._client.host, self._client.port) != (spec.host, spec.port):
            self._client = dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout,
                                         wait_for_workers=False)
        store = dist.PrefixStore(f"epoch-{spec.epoch}", self._client)
        dist.init_process_group(spec.backend, store=store, rank=spec.rank,
                                world_size=spec.world_size, timeout=timeout)
        for ranks in spec.tensor_groups:  # every member creates every group
            group = dist.new_group(list(ranks), timeout=timeout)
            if spec.rank in ranks:
                self._tensor_group, self.tensor_size = group, len(ranks)
        self.spec = spec

    def leave(self) -> None:
        """Destroy this epoch's groups (no-op when not joined)."""
        if self.spec is not None:
            dist.destroy_process_group()
        self.spec, self._tensor_group, self.tensor_size = None, None, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the tensor-parallel group, in place (the row-parallel `reduce`)."""
        if self.tensor_size > 1:
            dist.all_reduce(tensor, group=self._tensor_group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> PendingSend:
        """Start sending `tensor` to group rank `dst`; `wait()` on the result before reusing it."""
        raw = _raw(tensor)
        return PendingSend(dist.isend(raw, dst) if raw.numel() else None, raw)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int
             ) -> torch.Tensor:
        """Receive a `shape` x `dtype` tensor from group rank `src` (times out with the group)."""
        out = torch.empty(shape, dtype=dtype, device=device)
        if out.numel():
            dist.recv(_raw(out), src)
        return out


class PendingSend:
    """A send in flight; keeps its buffer alive until `wait` returns."""

    def __init__(self, work: dist.Work | None, buffer: torch.Tensor) -> None:
        self._work, self._buffer = work, buffer

    def wait(self) -> None:
        """Block until the receiver has the data (or the group times out)."""
        if self._work is not None:
            self._work.wait()
        self._work = None


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (same storage)."""
    return tensor.reshape(-1).view(torch.uint8)
