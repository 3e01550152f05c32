#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and starts the detector's command line:
#   bash scripts/run.sh predict --base photo.jpg
# With no arguments it prints the command line's help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --help; fi
exec .venv/bin/python -m model "$@"
