"""Time from Start Training to a served new version, and /webhook latency while training runs.

Drives a real Label Studio (from `.venv-labelstudio/`, as the end-to-end test
does): a project of images made here with 10 and then 50 labeled tasks, the
backend connected with a personal access token, "Start Training" pressed
through the API. While the job runs, 20 concurrent annotation webhooks hit
the backend.

  .venv/bin/python benchmarks/start_training.py

Writes benchmarks/results/start_training.{json,md}.
"""

from __future__ import annotations

import concurrent.futures
import json
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

from tests.conftest import Backend  # noqa: E402
from tests.synthetic import make_task_set  # noqa: E402
from tests.test_e2e_label_studio import CONFIG, LabelStudio  # noqa: E402


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


def run(ls: LabelStudio, model_dir: Path, work: Path, labeled: int) -> dict:
  tasks = make_task_set(work, labeled, ('disc',), split=None, seed=labeled)
  project = ls.call('POST', '/api/projects/', json={'title': f'bench {labeled}', 'label_config': CONFIG})
  pid = project['id']
  names = [t['data']['image'].split('/')[-1] for t in tasks]
  for start in range(0, len(names), 20):
    files = {f'file{i}': (n, (work / 'images' / n).read_bytes(), 'image/jpeg')
             for i, n in enumerate(names[start:start + 20])}
    ls.call('POST', f'/api/projects/{pid}/import', files=files)
  ls_tasks = ls.call('GET', f'/api/tasks/?project={pid}&page_size=1000')['tasks']
  by_name = {t['data']['image'].split('/')[-1].split('-', 1)[1]: t for t in ls_tasks}
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    TRAIN_EVERY_N_ANNOTATIONS='1000')
  try:
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': pid, 'title': 'bench',
                                            'is_interactive': False})
    for task, name in zip(tasks, names):
      ls.call('POST', f'/api/tasks/{by_name[name]["id"]}/annotations/',
              json={'result': task['annotations'][0]['result']})
    started = time.monotonic()
    ls.call('POST', f'/api/ml/{ml["id"]}/train')
    latencies, status = [], {}
    while time.monotonic() - started < 900:
      status = requests.get(f'{backend.url}/train/status', params={'project': pid}).json()
      if status['state'] == 'running' and not latencies:
        latencies = webhook_latencies(backend.url, pid)
      if status['current_version'] == 'fewshot-ssd-v1' or status['state'] == 'failed':
        break
      time.sleep(0.5)
    seconds = time.monotonic() - started
    assert status['current_version'] == 'fewshot-ssd-v1', (status, backend.output())
    ordered = sorted(latencies)
    return {'labeled_tasks': labeled, 'seconds_to_new_version': round(seconds, 1),
            'webhook_ms_p50': round(1000 * ordered[len(ordered) // 2], 1) if ordered else None,
            'webhook_ms_p99': round(1000 * ordered[math.ceil(0.99 * len(ordered)) - 1], 1)
            if ordered else None}
  finally:
    backend.stop()


def main():
  base = Path(os.environ.get('MODEL_DIR', REPO / 'models')) / 'base'
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / 'ls').mkdir()
    ls = LabelStudio(tmp / 'ls')
    try:
      for labeled in (10, 50):
        model_dir = tmp / f'models-{labeled}'
        shutil.copytree(base, model_dir / 'base')
        results.append(run(ls, model_dir, tmp / f'work-{labeled}', labeled))
        print(results[-1], flush=True)
    finally:
      ls.stop()
  out = REPO / 'benchmarks' / 'results'
  out.mkdir(parents=True, exist_ok=True)
  (out / 'start_training.json').write_text(json.dumps(results, indent=1) + '\n')
  lines = ['# Start Training to a served version (real Label Studio 1.23.2, in-process queue)', '',
           '| labeled tasks | s to new version | /webhook p50 ms | p99 ms (20 concurrent, during training) |',
           '|---|---|---|---|']
  lines += [f'| {r["labeled_tasks"]} | {r["seconds_to_new_version"]} | {r["webhook_ms_p50"]} | '
            f'{r["webhook_ms_p99"]} |' for r in results]
  (out / 'start_training.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
