"""`Linear`: the model's matrix layer, with a packed copy of its weight for fp32 CPU inference.

The packed copy is our own panel layout (`cpu_ops.pack_linear` / `cpu_ops.linear`) where the
kernels are built, else oneDNN's blocked layout; without either, `F.linear` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic_llm.model import cpu_ops


def _weight_key(weight: torch.Tensor) -> tuple[object, ...]:
    """What identifies a weight's current contents: its storage, in-place version, dtype, shape."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor keeps no version counter
        version = -1
    return weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are allocated empty and filled by a loader, never initialised.

    `pack()` keeps, next to the parameter, a copy of the weight laid out for fp32 CPU inference:
    the panels of our own AVX2 multiply (`cpu_ops.linear`, csrc/linear.cpp) where the kernels are
    built, else oneDNN's blocked layout. Inputs of at least `PACKED_MIN_ROWS` rows then use it.
    The copy stops being used as soon as the parameter changes: new data (``weight.data = ...``)
    or an in-place write to the parameter. An in-place write through ``weight.data`` bypasses the
    version counter: call `pack()` again after one.
    """

    PACKED_MIN_ROWS = 1  #: rows from which the packed copy is used (measured no slower at 1 row)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self._packed: _Packed | None = None

    @property
    def packed_kind(self) -> str | None:
        """Which packed copy is kept: "panels" (ours), "onednn", or None."""
        return None if self._packed is None else self._packed.kind

    def pack(self, batch_hint: int = 32) -> bool:
        """Prepare the packed copy of the weight; False (and nothing kept) where unsupported.
        `batch_hint` tunes oneDNN's layout; our panels serve every batch size alike."""
        self._packed = None
        weight = self.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.numel() == 0:
            return False
        panels = cpu_ops.pack_linear(weight)
        if panels is not None:
            self._packed = _Packed(_weight_key(weight), "panels", panels)
            return True
        if not torch.backends.mkldnn.is_available():
            return False
        try:
            blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
            probe = torch.zeros(Linear.PACKED_MIN_ROWS, weight.shape[1])
            torch.ops.mkldnn._linear_pointwise(probe, blocked, None, "none", [], "")
        except (RuntimeError, AttributeError):
            return False
        self._packed = _Packed(_weight_key(weight), "onednn", blocked)
        return True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` when given (added inside the packed kernel: one pass, the
        same sums as adding afterwards)."""
        if residual is not None and residual.shape != (*x.shape[:-1], self.weight.shape[0]):
            raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of "
                             f"{(*x.shape[:-1], self.weight.shape[0])}")
        out = self._packed_forward(x, residual)
        if out is not None:
            return out
        out = F.linear(x, self.weight, self.bias)
        return out if residual is None else residual + out

    def _packed_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        packed, bias = self._packed, self.bias
        if (packed is None or x.dim() != 2 or x.shape[0] < Linear.PACKED_MIN_ROWS
                or x.dtype != torch.float32 or packed.key != _weight_key(self.weight)
                or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"))
                or (residual is not None and residual.dtype != torch.float32)):
            return None
        if packed.kind == "panels":
            return cpu_ops.linear(x, packed.tensor, self.weight.shape[0], bias, residual)
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.tensor, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(
            x.contiguous(), residual.contiguous(), packed.tensor, bias, "add")


@dataclass(frozen=True)
class _Packed:
    """A packed copy of a Linear's weight: for which weight contents, of which kind."""

    key: tuple[object, ...]
    kind: str  #: "panels" (cpu_ops.linear) or "onednn"
    tensor: torch.Tensor
