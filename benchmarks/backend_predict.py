"""/predict throughput and latency of the backend: float vs int8 at batches of 1, 8 and 64
tasks (1 gunicorn worker), and int8 with 1, 2 and 4 gunicorn workers under 8 concurrent clients.

Runs `python -m backend` over a model directory holding the base and one
published version, with the task images on a local HTTP server, as Label
Studio's "Retrieve Predictions" sends them.

  .venv/bin/python benchmarks/backend_predict.py --run RUN_DIR [--images DIR] [--sections variants workers]

RUN_DIR is a run folder from `python -m model train`; DIR holds .jpg images
(default: ../shared/datasets/raccoon/images). Writes
benchmarks/results/backend_predict.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import http.server
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

import result_files  # noqa: E402
from model import run_folder  # noqa: E402
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


def measure_concurrent(url, tasks, config, clients, batch, total):
  """Tasks per second with `clients` sending `batch`-task requests at once."""
  per_client = max(1, total // (clients * batch))
  began = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(lambda c: measure(url, tasks[c:] + tasks[:c], config, batch, per_client * batch),
                  range(clients)))
  return clients * per_client * batch / (time.perf_counter() - began)


def variants_section(model_dir, tasks, config, total) -> dict:
  results = {}
  for variant in ('float', 'int8'):
    backend = Backend(model_dir, MODEL_VARIANT=variant, THREADS='8')
    try:
      measure(backend.url, tasks, config, 64, len(tasks))  # warm: images cached, model loaded
      rows = {}
      for batch in (1, 8, 64):
        latencies = measure(backend.url, tasks, config, batch, max(total, batch))
        rows[batch] = {
            'tasks_per_s': round(batch * len(latencies) / sum(latencies), 1),
            'p50_ms': round(1000 * statistics.median(latencies), 1),
            'p95_ms': round(1000 * sorted(latencies)[math.ceil(0.95 * len(latencies)) - 1], 1),  # nearest rank
        }
        print(variant, batch, rows[batch], flush=True)
      results[variant] = rows
    finally:
      backend.stop()
  return results


def workers_section(model_dir, tasks, config, total, clients=8, batch=8) -> dict:
  results = {}
  for workers in (1, 2, 4):
    backend = Backend(model_dir, MODEL_VARIANT='int8', WORKERS=str(workers), THREADS='4')
    try:
      # Warm every worker: each loads its interpreter and fills the shared image cache.
      measure_concurrent(backend.url, tasks, config, clients, batch, 4 * len(tasks))
      rate = measure_concurrent(backend.url, tasks, config, clients, batch, total)
      results[workers] = {'tasks_per_s': round(rate, 1), 'clients': clients, 'batch': batch}
      print('workers', workers, results[workers], flush=True)
    finally:
      backend.stop()
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--run', type=Path, required=True)
  parser.add_argument('--images', type=Path, default=REPO.parent / 'shared/datasets/raccoon/images')
  parser.add_argument('--model-dir', type=Path, default=Path(os.environ.get('MODEL_DIR', REPO / 'models')))
  parser.add_argument('--tasks', type=int, default=320, help='tasks per measurement')
  parser.add_argument('--sections', nargs='+', default=['variants', 'workers'],
                      choices=['variants', 'workers'])
  args = parser.parse_args()

  labels = run_folder.read_labels_file(run_folder.RunPaths(args.run).labels)
  config = CONFIG.format(labels=''.join(f'<Label value="{l}"/>' for l in labels))
  images = sorted(p.name for p in args.images.glob('*.jpg'))[:64]
  server, base_url = serve_folder(args.images)
  tasks = [{'id': i + 1, 'data': {'image': f'{base_url}/{name}'}} for i, name in enumerate(images)]
  results = result_files.read_json('backend_predict', {})  # sections not run keep theirs
  results.update({'images': len(images), 'tasks_per_measurement': args.tasks})
  with tempfile.TemporaryDirectory() as work:
    model_dir = Path(work) / 'models'
    shutil.copytree(args.model_dir / 'base', model_dir / 'base')
    shutil.copytree(args.run, model_dir / 'projects' / '1' / 'versions' / 'v1')
    if 'variants' in args.sections:
      results['variants'] = variants_section(model_dir, tasks, config, args.tasks)
    if 'workers' in args.sections:
      results['workers'] = workers_section(model_dir, tasks, config, args.tasks)
  server.shutdown()
  result_files.write_json('backend_predict', results)
  lines = ['# /predict benchmark', '',
           f'{len(images)} raccoon images served over local HTTP (cached by the backend after '
           f'the first pass), {os.cpu_count()} cores.', '',
           '## float vs int8, gunicorn 1 worker × 8 threads, one client', '',
           '| model | tasks per request | tasks/s | p50 ms | p95 ms |', '|---|---|---|---|---|']
  for variant, rows in results.get('variants', {}).items():
    for batch, row in rows.items():
      lines.append(f'| {variant} | {batch} | {row["tasks_per_s"]} | {row["p50_ms"]} | {row["p95_ms"]} |')
  lines += ['', '## gunicorn workers (int8, 4 threads each, 8 concurrent clients × 8 tasks per request)',
            '', '| workers | tasks/s |', '|---|---|']
  lines += [f'| {w} | {row["tasks_per_s"]} |' for w, row in results.get('workers', {}).items()]
  result_files.write_markdown('backend_predict', lines)
  print('\n'.join(lines))

if __name__ == '__main__':
  main()
