"""Time from Start Training to a served new version, and /webhook latency while training runs.

Drives a real Label Studio (from `.venv-labelstudio/`, as the end-to-end test
does): a project of images made here with 10 and then 50 labeled tasks, the
backend connected with a personal access token, "Start Training" pressed
through the API. While the job runs, 20 concurrent annotation webhooks hit
the backend. Each size runs with the in-process queue and with Redis + one RQ
worker (`python -m backend worker`), side by side on the same images. With
`--then N`, N more tasks are labeled once the first version serves and
Start Training is pressed again: the labeling loop's next iteration, a warm
start in the same backend (or worker) process.

  .venv/bin/python benchmarks/start_training.py [--labeled 10 50] [--queue inprocess redis] [--then 2]

Writes benchmarks/results/start_training.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import result_files  # noqa: E402
from tests.conftest import Backend  # noqa: E402
from tests.label_studio import LabelStudio, annotate, make_disc_project  # noqa: E402
from tests.redis_servers import RedisServer, TrainingWorker  # noqa: E402


def webhook_latencies(url: str, project: int, count: int = 20) -> list[float]:
  event = {'action': 'ANNOTATION_UPDATED', 'project': {'id': project},
           'annotation': {'id': 1, 'project': project, 'result': []}}

  def one(_):
    started = time.perf_counter()
    response = requests.post(url + '/webhook', json=event, timeout=5)
    assert response.status_code == 200
    return time.perf_counter() - started

  with concurrent.futures.ThreadPoolExecutor(count) as pool:
    return list(pool.map(one, range(count)))


def wait_for_rq_worker(redis_url: str, seconds: float = 120) -> None:
  """Until an RQ worker has registered in Redis, which it does when it starts taking jobs."""
  import redis
  from rq import Worker
  connection = redis.Redis.from_url(redis_url)
  deadline = time.monotonic() + seconds
  while not Worker.all(connection=connection):
    if time.monotonic() > deadline:
      raise TimeoutError(f'no RQ worker registered in {seconds:.0f} s')
    time.sleep(0.2)


def wait_for_warm_backend(backend: Backend, seconds: float = 120) -> None:
  """Until the in-process training thread has warmed up (`pipeline.warm_up` logs it)."""
  deadline = time.monotonic() + seconds
  while 'Warmed up for training' not in backend.log_path.read_text():
    if time.monotonic() > deadline:
      raise TimeoutError(f'the backend did not warm up in {seconds:.0f} s')
    time.sleep(0.2)


def train_until(ls: LabelStudio, backend: Backend, ml: dict, project, version: str,
                latencies: list | None = None) -> float:
  """Presses Start Training; seconds until `version` serves. Fills `latencies` with
  /webhook's while the job runs, if given."""
  started = time.monotonic()
  ls.call('POST', f'/api/ml/{ml["id"]}/train')
  status = {}
  while time.monotonic() - started < 900:
    status = requests.get(f'{backend.url}/train/status', params={'project': project.id}).json()
    if latencies is not None and status['state'] == 'running' and not latencies:
      latencies.extend(webhook_latencies(backend.url, project.id))
    if status['current_version'] == version or status['state'] == 'failed':
      break
    time.sleep(0.5)
  assert status['current_version'] == version, (status, backend.output())
  return time.monotonic() - started


def run(ls: LabelStudio, model_dir: Path, work: Path, labeled: int, queue: str,
        redis_url: str | None, then: int = 0) -> dict:
  project = make_disc_project(ls, work, labeled + then, seed=labeled,
                              title=f'bench {labeled} {queue}')
  annotate(ls, project, project.tasks[:labeled])
  env = {'LABEL_STUDIO_URL': ls.url, 'LABEL_STUDIO_API_KEY': ls.token,
         'TRAIN_EVERY_N_ANNOTATIONS': '1000', 'TRAINING_QUEUE': queue}
  if redis_url:
    env['REDIS_URL'] = redis_url
  backend = Backend(model_dir, **env)
  worker = (TrainingWorker(work / 'worker.log', {**env, 'MODEL_DIR': str(model_dir)})
            if queue == 'redis' else None)
  try:
    # As deployed: the training worker has started (and warmed up) before anyone trains.
    if worker:
      wait_for_rq_worker(redis_url)
    else:
      wait_for_warm_backend(backend)
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': project.id,
                                            'title': 'bench', 'is_interactive': False})
    latencies = []
    seconds = train_until(ls, backend, ml, project, 'fewshot-ssd-v1', latencies)
    ordered = sorted(latencies)
    result = {'labeled_tasks': labeled, 'queue': queue, 'seconds_to_new_version': round(seconds, 1),
              'webhook_ms_p50': round(1000 * ordered[len(ordered) // 2], 1) if ordered else None,
              'webhook_ms_p99': round(1000 * ordered[math.ceil(0.99 * len(ordered)) - 1], 1)
              if ordered else None}
    if then:
      annotate(ls, project, project.tasks[labeled:])
      result.update(then=then, seconds_to_next_version=round(
          train_until(ls, backend, ml, project, 'fewshot-ssd-v2'), 1))
    return result
  finally:
    if worker:
      worker.stop()
    backend.stop()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--labeled', type=int, nargs='+', default=[10, 50])
  parser.add_argument('--queue', nargs='+', default=['inprocess', 'redis'],
                      choices=['inprocess', 'redis'])
  parser.add_argument('--then', type=int, default=0,
                      help='label this many more tasks once v1 serves and train again (v2)')
  args = parser.parse_args()
  base = Path(os.environ.get('MODEL_DIR', REPO / 'models')) / 'base'
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / 'ls').mkdir()
    (tmp / 'redis').mkdir()
    ls = LabelStudio(tmp / 'ls').ready()
    redis_server = RedisServer(tmp / 'redis') if 'redis' in args.queue else None
    try:
      for labeled in args.labeled:
        for queue in args.queue:
          model_dir = tmp / f'models-{labeled}-{queue}'
          shutil.copytree(base, model_dir / 'base')
          results.append(run(ls, model_dir, tmp / f'work-{labeled}-{queue}', labeled, queue,
                             redis_server.url if redis_server else None, args.then))
          print(results[-1], flush=True)
    finally:
      ls.stop()
      if redis_server:
        redis_server.stop()
  result_files.write_json('start_training', results)
  lines = ['# Start Training to a served version (real Label Studio 1.23.2)', '',
           '| labeled tasks | queue | s to new version | /webhook p50 ms | '
           'p99 ms (20 concurrent, during training) | then labeled | s to the next version |',
           '|---|---|---|---|---|---|---|']
  lines += [f'| {r["labeled_tasks"]} | {r["queue"]} | {r["seconds_to_new_version"]} | '
            f'{r["webhook_ms_p50"]} | {r["webhook_ms_p99"]} | {r.get("then", "")} | '
            f'{r.get("seconds_to_next_version", "")} |' for r in results]
  result_files.write_markdown('start_training', lines)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
