#!/usr/bin/env bash
# Set up (first run only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$root/scripts/setup.sh" | tail -n 1)
cd "$root"
# pytest exits 5 when it collects no tests: that is a failure here too (set -e).
exec "$py" -m pytest -q -rs "$@"  # -rs: every skip is listed with its reason
