#!/usr/bin/env bash
# Set up (first run only) and run the main job on the embedded default model:
# serve it on a local Dask cluster of two spot workers, streaming answers while one worker is
# preempted (its requests move with their KV cache) and a new one joins; then print a summary.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/scripts/setup.sh" | tail -n 1)
exec "$py" -m elastic_llm.cli demo "$@"
