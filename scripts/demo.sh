#!/usr/bin/env bash
# Set up (first run only) and run the main job on the embedded default model:
# stream answers to a few prompts, batched together by the continuous-batching engine.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/scripts/setup.sh" | tail -n 1)
exec "$py" -m elastic_llm.cli demo "$@"
