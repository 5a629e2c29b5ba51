"""Fused CPU kernels and our packed matrix multiply, compiled from `csrc/` on first use and cached.

On a CPU, a decode step's small elementwise ops cost more than their arithmetic: RMSNorm alone
is seven passes over each row (square, sum, divide, add, rsqrt, two multiplies). `rms_norm`
does it in one pass per row. It shortened a batch-32 SmolLM2 decode step by about 4%
(docs/benchmarks.md). `rotate_` turns q and k by their positions in one pass instead of four ops,
and `store_rows` writes a decode batch's keys and values into the KV pool as plain copies instead
of an advanced-indexing write; together about 1% of a decode step, bit for bit the same results.

`linear` is ``x W^T (+ b) (+ residual)`` with W packed once by `pack_linear` (AVX2 + FMA; see
`csrc/linear.cpp` for the layout). A decode step is mostly these multiplies; at 32 rows ours ran
them 1.45x faster than oneDNN's packed fp32 path (1.05-1.78x from 1 to 512 rows,
`benchmarks/linear_kernel.py`). `Linear` falls back to oneDNN where the kernels are not built.
Each output row depends only on its own input row, never on the rest of the batch or the thread
count.

The extension is built with the machine's C++ compiler for its own CPU (``-march=native``, and
OpenMP, so that the kernels run on torch's own intra-op threads) into
``<cache_dir>/kernels/<key>``. The key covers the sources, torch, Python and the CPU, so other
machines and versions build their own. The first build takes about 30 s; later processes
import the built library directly (0.15 s), without running a build tool. Where it cannot be
built (no compiler, no headers), one warning is logged and the eager PyTorch ops run instead.
``ELASTIC_LLM_CPU_KERNELS=0`` turns the kernels off.

The fused RMSNorm sums the squares in another order than PyTorch, so its results can differ from
the eager ops in the last bit. The rotation is built without FMA contraction
(``-ffp-contract=off``): the same roundings as the eager multiply-then-add.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

from elastic_llm.model.checkpoint import cache_dir
from elastic_llm.progress import progress

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("cpu_ops.cpp", "linear.cpp"))
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")  # OpenMP: torch's own threads
_UNSET = object()
_module: object = _UNSET
_lock = threading.Lock()


def enabled() -> bool:
    """Whether the kernels may be used (``ELASTIC_LLM_CPU_KERNELS`` is not "0")."""
    return os.environ.get("ELASTIC_LLM_CPU_KERNELS", "1") != "0"


def kernels() -> ModuleType | None:
    """The compiled extension (built once per machine, imported by every later process), or None
    where it is turned off or cannot be built."""
    global _module
    if _module is _UNSET:
        with _lock:
            if _module is _UNSET:
                _module = _load() if enabled() else None
    return _module  # type: ignore[return-value]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """One-pass RMSNorm of the rows of `x` [T, H], or None where the kernel does not apply (not an
    fp32 CPU tensor pair, or the kernels are unavailable): the caller then runs the eager ops."""
    if not _fp32_cpu(x, weight) or x.dim() != 2:
        return None
    module = kernels()
    if module is None:
        return None
    return module.rms_norm(x.contiguous(), weight.contiguous(), float(eps))


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate `x` [T, H, D] in place by per-row `cos` / signed `sin` ([T, 1, D] or [T, D]) as
    `Rotary.rotate_` does, bit for bit; False (nothing done) where the kernel does not apply."""
    if (not _fp32_cpu(x, cos, sin) or x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]
            or cos.numel() != x.shape[0] * x.shape[2] or sin.numel() != cos.numel()):
        return False
    module = kernels()
    if module is None:
        return False
    rows, dim = x.shape[0], x.shape[2]
    module.rotate_(x, cos.reshape(rows, dim).contiguous(), sin.reshape(rows, dim).contiguous())
    return True


def store_rows(pool: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> bool:
    """``pool[:, slots, :, positions] = rows`` for pool [2, S, Hkv, C, D] and rows [n, 2, Hkv, D],
    as one copy loop; False (nothing done) where the kernel does not apply."""
    contiguous_rows = (rows.dim() == 4 and rows.stride(3) == 1 and rows.stride(2) == rows.shape[3]
                       and rows.stride(1) == rows.shape[2] * rows.shape[3])  # each row: keys, values
    if (not _fp32_cpu(pool, rows) or pool.dim() != 5 or pool.stride(4) != 1 or not contiguous_rows
            or slots.device.type != "cpu" or positions.device.type != "cpu"):
        return False
    module = kernels()
    if module is None:
        return False
    module.store_rows(pool, slots.contiguous(), positions.contiguous(), rows)
    return True


def pack_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [N, K] packed into the panels `linear` reads, or None where the packed multiply
    is unavailable (not an fp32 CPU matrix, no kernels, or a CPU without AVX2 and FMA)."""
    if not _fp32_cpu(weight) or weight.dim() != 2 or weight.numel() == 0:
        return None
    module = kernels()
    if module is None or not module.packed_linear_available():
        return None
    return module.pack_linear(weight.detach())


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ W.T (+ bias) (+ residual)`` for x [M, K] with W packed by `pack_linear`; None where
    the kernel does not apply (then the caller multiplies another way). Each output row is the
    same whatever the other rows of `x` are (see csrc/linear.cpp)."""
    extras = [t for t in (bias, residual) if t is not None]
    if not _fp32_cpu(x, panels, *extras) or x.dim() != 2:
        return None
    module = kernels()
    if module is None:
        return None
    return module.packed_linear(x, panels, out_features,  # any strides: the kernel reads x once
                                None if bias is None else bias.contiguous(),
                                None if residual is None else residual.contiguous())


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build_key() -> str:
    """What a build depends on: the source, the flags, torch, Python and the CPU."""
    digest = hashlib.sha256()
    for part in (*(source.read_bytes() for source in SOURCES), " ".join(FLAGS).encode(),
                 torch.__version__.encode(), sys.version.encode(), _cpu_identity().encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


def _load() -> ModuleType | None:
    try:
        return _load_or_build()
    except Exception as exc:  # no compiler, no headers, a failed build: the eager ops still work
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning("fused CPU kernels unavailable, using the eager ops: %s", reason)
        return None


def _load_or_build() -> ModuleType:
    """Import the built library, building it first if this machine has none (one process builds,
    under a file lock, in a scratch directory; the finished library is then renamed into place,
    so no process ever loads a half-written file, and a built library is never rebuilt: loading
    runs no build tool)."""
    key = build_key()
    name = f"elastic_llm_cpu_ops_{key}"
    directory = cache_dir() / "kernels" / key
    library = directory / f"{name}.so"
    if library.exists():
        return _import(name, library)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():  # another process built it while this one waited
            return _import(name, library)
        from torch.utils.cpp_extension import load

        with progress(log, f"building fused CPU kernels (once per machine, about 30 s) in {directory}"), \
                tempfile.TemporaryDirectory(dir=directory) as scratch:
            module = load(name=name, sources=[str(source) for source in SOURCES], extra_cflags=list(FLAGS),
                          extra_ldflags=["-fopenmp"], build_directory=scratch, verbose=False)
            os.replace(Path(scratch) / library.name, library)
        return module


def _import(name: str, library: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
