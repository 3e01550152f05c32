"""/predict latency for a cached image, idle and while slow sources are being fetched.

A real backend (gunicorn, the base model) and a local image server. The
"busy" phase keeps one /predict open with 8 images that arrive at a byte a
second (a slow or hostile source) while cached /predicts and /health are timed.

  .venv/bin/python benchmarks/slow_sources.py [--requests 50]

Results: benchmarks/results/slow_sources.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import result_files  # noqa: E402
from model.config import BasePaths  # noqa: E402
from tests.conftest import Backend  # noqa: E402
from tests.test_image_sources import _Handler  # noqa: E402

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" '
          'toName="image"><Label value="Person"/></RectangleLabels></View>')


def timed(fn) -> float:
  started = time.perf_counter()
  fn()
  return (time.perf_counter() - started) * 1000


def p99(values: list[float]) -> float:
  return round(statistics.quantiles(values, n=100)[98], 1) if len(values) > 2 else max(values)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--requests', type=int, default=50)
  parser.add_argument('--model-dir', type=Path,
                      default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  args = parser.parse_args()
  images = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  threading.Thread(target=images.serve_forever, daemon=True).start()
  source = f'http://127.0.0.1:{images.server_address[1]}'
  with tempfile.TemporaryDirectory() as work:
    model_dir = Path(work) / 'models'
    shutil.copytree(BasePaths(args.model_dir).base_dir, model_dir / 'base')
    backend = Backend(model_dir, THREADS='8', PREDICT_DEADLINE_S='20')

    def predict(urls):
      reply = requests.post(f'{backend.url}/predict', timeout=120, json={
          'project': 1, 'label_config': CONFIG,
          'tasks': [{'id': i, 'data': {'image': u}} for i, u in enumerate(urls)]})
      reply.raise_for_status()

    try:
      predict([f'{source}/image'])
      idle = [timed(lambda: predict([f'{source}/image'])) for _ in range(args.requests)]
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(timed, lambda: predict([f'{source}/slow?{i}' for i in range(8)]))
        time.sleep(0.5)
        busy = [timed(lambda: predict([f'{source}/image'])) for _ in range(args.requests)]
        health = [timed(lambda: requests.get(f'{backend.url}/health', timeout=10))
                  for _ in range(20)]
        slow_ms = slow.result()
    finally:
      backend.stop()
      images.shutdown()
  result = {'requests': args.requests, 'cached_idle_p99_ms': p99(idle),
            'cached_busy_p99_ms': p99(busy), 'ratio': round(p99(busy) / p99(idle), 2),
            'health_busy_p99_ms': p99(health), 'slow_predict_ms': round(slow_ms),
            'predict_deadline_s': 20, 'cores': os.cpu_count()}
  result_files.write_json('slow_sources', result)
  print(result_files.write_markdown('slow_sources', [
      '# /predict of a cached image while 8 images arrive at a byte a second', '',
      '| cached p99 idle | cached p99 busy | ratio | /health p99 busy | slow /predict answered after |',
      '|---|---|---|---|---|',
      f'| {result["cached_idle_p99_ms"]} ms | {result["cached_busy_p99_ms"]} ms | '
      f'{result["ratio"]}× | {result["health_busy_p99_ms"]} ms | '
      f'{result["slow_predict_ms"] / 1000:.1f} s (PREDICT_DEADLINE_S=20) |']))


if __name__ == '__main__':
  main()
