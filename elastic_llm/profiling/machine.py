"""`MachineInfo`: a description of the machine a profile was measured on."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class MachineInfo:
    """What was profiled on: CPU, memory, software, and the settings that shape every timing."""

    cpu_model: str  #: from /proc/cpuinfo "model name", else `platform.processor()`
    logical_cpus: int  #: `os.cpu_count()`
    memory_bytes: int  #: physical memory
    threads: int  #: torch threads per process during the measurements
    dtype: str  #: weights and activations, e.g. "float32"
    torch_version: str  #: `torch.__version__`
    python_version: str  #: `platform.python_version()`
    platform: str  #: `platform.platform()`
    date: str  #: UTC time the profile started (ISO 8601)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @property
    def summary(self) -> str:
        """One line for tables and logs."""
        return (f"{self.cpu_model}, {self.logical_cpus} logical CPUs, "
                f"{self.memory_bytes / 2**30:.0f} GiB, {self.threads} torch thread(s) per process, "
                f"torch {self.torch_version}, {self.dtype}")


def describe_machine(threads: int, dtype: torch.dtype) -> MachineInfo:
    """The `MachineInfo` of this machine, now."""
    return MachineInfo(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        memory_bytes=physical_memory_bytes(),
        threads=threads,
        dtype=str(dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        platform=platform.platform(),
        date=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def physical_memory_bytes() -> int:
    """Physical memory of this machine (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform.startswith("linux") and cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"
