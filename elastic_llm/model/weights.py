"""Reading weights lazily from safetensors, whole tensors or slices of them.

A process reads only the tensors (and the rows/columns of them) it holds, never the full model:
this is what lets a pipeline stage or a tensor-parallel rank load its own shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from elastic_llm.errors import ModelLoadError


class SafetensorsWeights:
    """Tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self._handles: dict[Path, Any] = {}
        self._location = self._index()

    def _index(self) -> dict[str, Path]:
        index_file = self.checkpoint_dir / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"corrupt index {index_file}: {exc}") from None
            return {name: self.checkpoint_dir / file for name, file in weight_map.items()}
        files = sorted(self.checkpoint_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no *.safetensors files in {self.checkpoint_dir}")
        location: dict[str, Path] = {}
        for file in files:
            for name in self._open(file).keys():
                location[name] = file
        return location

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read weights file {file}: {exc}") from None
            self._handles[file] = handle
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def names(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return list(self._location)

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read tensor `name`, or only `[start:stop]` along `dim`, converted to `dtype`.

        Raises:
            ModelLoadError: the tensor is missing or its bytes cannot be read (truncated file).
        """
        file = self._location.get(name)
        if file is None:
            raise ModelLoadError(f"weights file lacks tensor {name!r} ({self.checkpoint_dir})")
        try:
            handle = self._open(file)
            if dim is None:
                tensor = handle.get_tensor(name)
            else:
                view = handle.get_slice(name)
                index: list[slice] = [slice(None)] * len(view.get_shape())
                index[dim] = slice(start, stop)
                tensor = view[tuple(index)]
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {exc}") from None
        return tensor.to(dtype)
