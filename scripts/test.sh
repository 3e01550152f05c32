#!/usr/bin/env bash
# Sets up with the test tools (scripts/setup.sh --test) and runs the whole suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
