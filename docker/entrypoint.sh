#!/usr/bin/env bash
# Puts the base SSD baked into the image into MODEL_DIR (a volume, empty on
# first start), then runs the command: `python -m backend` (serve, the
# default) or `python -m backend worker` (RQ training worker).
set -euo pipefail
model_dir=${MODEL_DIR:-/data/models}
if [ ! -f "$model_dir/base/detector.tflite" ]; then
  echo "entrypoint: copying the base SSD into $model_dir/base" >&2
  mkdir -p "$model_dir"
  staging=$(mktemp -d "$model_dir/.base.XXXXXX")
  cp -r /app/base/. "$staging/"
  rm -rf "$model_dir/base"
  mv "$staging" "$model_dir/base"
fi
exec "$@"
