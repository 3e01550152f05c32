"""/predict throughput and latency of the backend, float vs int8, batches of 1, 8 and 64 tasks.

Runs `python -m backend` (gunicorn, 1 worker) over a model directory holding
the base and one published version, with the task images on a local HTTP
server, as Label Studio's "Retrieve Predictions" sends them.

  .venv/bin/python benchmarks/backend_predict.py --run RUN_DIR [--images DIR]

RUN_DIR is a run folder from `python -m model train`; DIR holds .jpg images
(default: ../shared/datasets/raccoon/images). Writes
benchmarks/results/backend_predict.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import math
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

from tests.conftest import Backend  # noqa: E402  (the same launcher the tests use)

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '{labels}</RectangleLabels></View>')


def serve_folder(folder: Path):
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, f'http://127.0.0.1:{server.server_address[1]}'


def measure(url, tasks, config, batch, total):
  """Latencies (s) of /predict calls of `batch` tasks until `total` tasks are done."""
  latencies, done, start = [], 0, 0
  while done < total:
    chunk = [tasks[(start + i) % len(tasks)] for i in range(batch)]
    start += batch
    began = time.perf_counter()
    response = requests.post(url + '/predict', json={'tasks': chunk, 'project': 1,
                                                     'label_config': config}, timeout=300)
    latencies.append(time.perf_counter() - began)
    assert response.status_code == 200 and len(response.json()['results']) == batch
    done += batch
  return latencies


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--run', type=Path, required=True)
  parser.add_argument('--images', type=Path, default=REPO.parent / 'shared/datasets/raccoon/images')
  parser.add_argument('--model-dir', type=Path, default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  parser.add_argument('--tasks', type=int, default=320, help='tasks per measurement')
  args = parser.parse_args()

  labels = (args.run / 'labels.txt').read_text().split()
  config = CONFIG.format(labels=''.join(f'<Label value="{l}"/>' for l in labels))
  images = sorted(p.name for p in args.images.glob('*.jpg'))[:64]
  server, base_url = serve_folder(args.images)
  tasks = [{'id': i + 1, 'data': {'image': f'{base_url}/{name}'}} for i, name in enumerate(images)]
  results = {'images': len(images), 'tasks_per_measurement': args.tasks, 'variants': {}}
  with tempfile.TemporaryDirectory() as work:
    model_dir = Path(work) / 'models'
    shutil.copytree(args.model_dir / 'base', model_dir / 'base')
    shutil.copytree(args.run, model_dir / 'projects' / '1' / 'versions' / 'v1')
    for variant in ('float', 'int8'):
      backend = Backend(model_dir, MODEL_VARIANT=variant, THREADS='8')
      try:
        measure(backend.url, tasks, config, 64, len(tasks))  # warm: images cached, model loaded
        rows = {}
        for batch in (1, 8, 64):
          latencies = measure(backend.url, tasks, config, batch, max(args.tasks, batch))
          rows[batch] = {
              'tasks_per_s': round(batch * len(latencies) / sum(latencies), 1),
              'p50_ms': round(1000 * statistics.median(latencies), 1),
              'p95_ms': round(1000 * sorted(latencies)[math.ceil(0.95 * len(latencies)) - 1], 1),  # nearest rank
          }
          print(variant, batch, rows[batch], flush=True)
        results['variants'][variant] = rows
      finally:
        backend.stop()
  server.shutdown()
  out = REPO / 'benchmarks' / 'results'
  out.mkdir(parents=True, exist_ok=True)
  (out / 'backend_predict.json').write_text(json.dumps(results, indent=1) + '\n')
  lines = ['# /predict benchmark', '',
           f'{len(images)} raccoon images served over local HTTP (cached by the backend after '
           f'the first pass), gunicorn 1 worker × 8 threads, {os.cpu_count()} cores.', '',
           '| model | tasks per request | tasks/s | p50 ms | p95 ms |', '|---|---|---|---|---|']
  for variant, rows in results['variants'].items():
    for batch, row in rows.items():
      lines.append(f'| {variant} | {batch} | {row["tasks_per_s"]} | {row["p50_ms"]} | {row["p95_ms"]} |')
  (out / 'backend_predict.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
