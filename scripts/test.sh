#!/usr/bin/env bash
# Set up (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/scripts/setup.sh" | tail -n 1)
cd "$root"
# Three Dask tests pass alone but time out after the rest of the suite in one process (a
# cross-test interaction not yet found, see docs/benchmarks.md): they run in a fresh pytest.
isolated=(
  "tests/cluster/test_dask_sharded.py::test_a_noticed_leader_hands_every_request_with_its_kv_to_a_successor_replica"
  "tests/cluster/test_dask_sharded.py::test_reroute_dissolves_a_sharded_replica_that_loses_a_worker_and_its_requests_restart"
  "tests/cluster/test_peer_weights.py::test_complete_peer_weights_are_used_and_incomplete_ones_fall_back_to_the_checkpoint"
)
deselect=()
for test in "${isolated[@]}"; do deselect+=(--deselect "$test"); done
# pytest exits 5 when it collects no tests: that is a failure here too (set -e).
"$py" -m pytest -q -rs "${deselect[@]}" "$@"  # -rs: every skip is listed with its reason
exec "$py" -m pytest -q -rs "${isolated[@]}"
