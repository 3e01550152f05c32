"""Retrieve Predictions on every task of a big project: the answer by the deadline, the rest
through the API, no empty placeholder, and the backend's memory as the project grows.

Drives a real Label Studio (from `.venv-labelstudio/`, as the end-to-end test
does) and `python -m backend` (gunicorn) serving the pretrained base:

1. a few dozen small JPEGs made here are served by a local HTTP server under
   one distinct URL per task (`/img/<k>.jpg`, k mapped onto the images by
   k % count), so the backend downloads every task's image, as it would a
   user's;
2. a project with a RectangleLabels config whose labels the base knows gets
   --tasks tasks (imported as JSON, a few thousand per request), and the
   backend is connected with a personal access token (it pushes the tasks the
   deadline leaves out through the API);
3. "Retrieve Predictions" on all tasks (the Data Manager action), timed, and
   its parts from the logs (Label Studio's 100 s limit is on the /predict
   inside it; the action itself has none, but a person waits on it); then
   Label Studio's prediction
   count and the backend's /train/status refresh section are polled until
   every task has a prediction of the backend's version, or --max-wait;
4. at the end every prediction is read back: tasks with none, with more than
   one, with an empty placeholder (no result and score 0, what the backend
   gives an unreadable image: none is unreadable here), and with the wrong
   version; the gunicorn worker's resident memory (VmRSS sampled each second,
   VmHWM at start and end).

  .venv/bin/python benchmarks/retrieve_predictions.py [--tasks 20000] [--max-wait 1800]

Writes benchmarks/results/retrieve_predictions.{json,md}; a run replaces the
earlier run of the same --tasks and keeps the others, so runs of several sizes
show side by side whether memory stays flat.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import http.server
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import result_files  # noqa: E402
from tests.conftest import Backend  # noqa: E402  (the launchers the tests use)
from tests.label_studio import LabelStudio  # noqa: E402
from tests.synthetic import draw_shape, jpeg_bytes, textured_background  # noqa: E402

# Labels the pretrained base knows by name, so it predicts for this project.
CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Person"/><Label value="Car"/><Label value="Dog"/><Label value="Cat"/>'
          '</RectangleLabels></View>')
RETRIEVE = 'retrieve_tasks_predictions'
LABEL_STUDIO_TIMEOUT_S = 100  # ML_TIMEOUT_PREDICT: Label Studio gives up on a /predict after it


# ----------------------------------------------------------------- the images


def make_images(count: int, seed: int = 0) -> list[bytes]:
  """`count` small JPEGs: textured backgrounds, each with a disc or a square."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(count):
    width, height = (320, 240) if i % 2 else (240, 320)
    pixels = textured_background(width, height, seed=seed * 1000 + i)
    side = int(rng.integers(50, 110))
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    draw_shape(pixels, ('disc', 'square')[i % 2], (x, y, x + side, y + side))
    images.append(jpeg_bytes(pixels))
  return images


class ImageServer:
  """/img/<k>.jpg -> images[k % len(images)], on 127.0.0.1; counts what it serves."""

  def __init__(self, images: list[bytes]):
    self.requests = 0
    self.distinct: set[int] = set()
    lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):  # noqa: N802 (http.server's name)
        match = re.fullmatch(r'/img/(\d+)\.jpg', self.path)
        if not match:
          self.send_error(404)
          return
        k = int(match.group(1))
        body = images[k % len(images)]
        with lock:
          server.requests += 1
          server.distinct.add(k)
        self.send_response(200)
        self.send_header('Content-Type', 'image/jpeg')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def stop(self):
    self.httpd.shutdown()


# ----------------------------------------------------------------- the memory


def _status_kb(pid: int, key: str) -> int | None:
  try:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
      if line.startswith(key + ':'):
        return int(line.split()[1])
  except OSError:
    pass
  return None


def children(pid: int) -> list[int]:
  """The processes whose parent is `pid` (gunicorn's workers, for its master)."""
  found = []
  for entry in Path('/proc').iterdir():
    if not entry.name.isdigit():
      continue
    try:
      stat = (entry / 'stat').read_text()
    except OSError:
      continue
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    if int(stat.rsplit(')', 1)[1].split()[1]) == pid:
      found.append(int(entry.name))
  return sorted(found)


class MemorySampler:
  """Each second: the gunicorn workers' VmRSS (MB, summed), the peak per phase."""

  def __init__(self, master: int):
    self.master = master
    self.phase = 'idle'
    self.peak: dict[str, float] = collections.defaultdict(float)
    self.last = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def workers(self) -> list[int]:
    return children(self.master)

  def rss_mb(self) -> float:
    return sum(_status_kb(p, 'VmRSS') or 0 for p in self.workers()) / 1024

  def hwm_mb(self) -> float:
    """The workers' peak resident memory since they started (VmHWM, summed)."""
    return sum(_status_kb(p, 'VmHWM') or 0 for p in self.workers()) / 1024

  def _run(self):
    while not self._stop.is_set():
      self.last = self.rss_mb()
      self.peak[self.phase] = max(self.peak[self.phase], self.last)
      self._stop.wait(1.0)

  def stop(self):
    self._stop.set()
    self._thread.join(5)


# ----------------------------------------------------------------- Label Studio


def call(ls: LabelStudio, method: str, path: str, timeout: float = 120, **kwargs):
  """`ls.call` with a timeout of our choosing (the Retrieve Predictions action may be long)."""
  access = requests.post(ls.url + '/api/token/refresh/', json={'refresh': ls.token},
                         timeout=60).json()['access']
  response = requests.request(method, ls.url + path, headers={'Authorization': f'Bearer {access}'},
                              timeout=timeout, **kwargs)
  if response.status_code >= 300:
    raise RuntimeError(f'{method} {path}: {response.status_code} {response.text[:500]}')
  return response.json() if response.content else None


def stored_predictions(ls: LabelStudio, project: int) -> int:
  return call(ls, 'GET', f'/api/projects/{project}/')['total_predictions_number']


def task_ids(ls: LabelStudio, project: int) -> list[int]:
  ids, page = [], 1
  while True:
    try:
      body = call(ls, 'GET', f'/api/tasks/?project={project}&page_size=1000&page={page}'
                             '&fields=task_only', timeout=300)
    except RuntimeError as error:  # past the last page: 404
      if ' 404 ' in str(error):
        break
      raise
    ids += [t['id'] for t in body['tasks']]
    if len(body['tasks']) < 1000:
      break
    page += 1
  return ids


def is_placeholder(prediction: dict) -> bool:
  """What the backend answers for a task it has no prediction for: no region, score 0.

  A real prediction without a region scores 1 (sure there is nothing), or
  |2s - 1| for its least sure weak candidate s < SCORE_THRESHOLD, never 0.
  """
  return not prediction.get('result') and not prediction.get('score')


# ----------------------------------------------------------------- the run


def run(args, work: Path) -> dict:
  from model import base_weights
  base = base_weights.ensure_base(args.model_dir)
  model_dir = work / 'models'
  shutil.copytree(base.base_dir, model_dir / 'base')

  images = ImageServer(make_images(args.images))
  (work / 'ls').mkdir()
  started = time.monotonic()
  ls = LabelStudio(work / 'ls').ready()
  result: dict = {'tasks': args.tasks, 'images': args.images,
                  'label_studio_start_s': round(time.monotonic() - started, 1)}
  backend = sampler = None
  try:
    pid = call(ls, 'POST', '/api/projects/', json={'title': f'{args.tasks} tasks',
                                                    'label_config': CONFIG})['id']
    started = time.monotonic()
    for first in range(0, args.tasks, args.chunk):
      call(ls, 'POST', f'/api/projects/{pid}/import', timeout=900, json=[
          {'image': f'{images.url}/img/{k}.jpg'} for k in range(first, min(args.tasks,
                                                                           first + args.chunk))])
      print(f'imported {min(args.tasks, first + args.chunk)} tasks', flush=True)
    result['import_s'] = round(time.monotonic() - started, 1)
    ids = task_ids(ls, pid)
    assert len(ids) == args.tasks, (len(ids), args.tasks)

    env = {'LABEL_STUDIO_URL': ls.url, 'LABEL_STUDIO_API_KEY': ls.token,
           'TRAIN_EVERY_N_ANNOTATIONS': '0', 'WORKERS': str(args.workers),
           'THREADS': str(args.threads)}
    if args.deadline is not None:
      env['PREDICT_DEADLINE_S'] = str(args.deadline)
    backend = Backend(model_dir, **env)
    call(ls, 'POST', '/api/ml/', json={'url': backend.url, 'project': pid,
                                        'title': 'fewshot-ssd', 'is_interactive': False})
    version = requests.post(backend.url + '/setup', json={'project': pid},
                            timeout=30).json()['model_version']
    sampler = MemorySampler(backend.process.pid)
    time.sleep(2)
    result.update(workers=len(sampler.workers()), threads=args.threads,
                  predict_deadline_s=args.deadline, model_version=version,
                  rss_start_mb=round(sampler.rss_mb(), 1), hwm_start_mb=round(sampler.hwm_mb(), 1))

    # Retrieve Predictions: select all, press the action.
    sampler.phase = 'action'
    clock, clock_wall = time.monotonic(), time.time()
    answer = call(ls, 'POST', f'/api/dm/actions?id={RETRIEVE}&project={pid}', timeout=900,
                  json={'selectedItems': {'all': True, 'excluded': []}})
    action_s = time.monotonic() - clock
    sampler.phase = 'background'
    at_answer = stored_predictions(ls, pid)
    result.update(action_s=round(action_s, 1), action_answer=answer,
                  stored_at_answer=at_answer,
                  hwm_after_action_mb=round(sampler.hwm_mb(), 1))
    print(f'action returned in {action_s:.1f} s ({answer}); {at_answer} predictions stored',
          flush=True)

    # Until every task has one, the backend's refresh is over, or --max-wait.
    stored, refresh, last_change, last_stored = at_answer, {}, time.monotonic(), at_answer
    while time.monotonic() - clock < args.max_wait:
      refresh = requests.get(f'{backend.url}/train/status', params={'project': pid},
                             timeout=30).json()['refresh']
      stored = stored_predictions(ls, pid)
      if stored != last_stored:
        last_stored, last_change = stored, time.monotonic()
      ended = (refresh['state'] in ('done', 'failed', 'superseded')
               and (refresh.get('started_at') or 0) >= clock_wall)
      print(f'{time.monotonic() - clock:7.1f} s: {stored}/{args.tasks} stored; refresh '
            f'{refresh["state"]} {refresh.get("kind")} pushed {refresh.get("pushed")}; worker '
            f'RSS {sampler.last:.0f} MB', flush=True)
      if stored >= args.tasks and refresh['state'] not in ('running', 'queued'):
        break
      if ended and time.monotonic() - last_change > 30:
        break  # the refresh is over and nothing more comes
      if refresh['state'] == 'idle' and time.monotonic() - last_change > 120:
        break  # nothing runs and nothing comes
      time.sleep(args.poll)
    all_s = time.monotonic() - clock
    sampler.phase = 'after'
    result.update(seconds_to_all=round(all_s, 1), tasks_per_s=round(args.tasks / all_s, 1),
                  rss_end_mb=round(sampler.rss_mb(), 1), hwm_end_mb=round(sampler.hwm_mb(), 1),
                  rss_peak_mb={k: round(v, 1) for k, v in sampler.peak.items()},
                  refresh=refresh, timed_out=all_s >= args.max_wait)

    # Every prediction, read back.
    predictions = call(ls, 'GET', f'/api/predictions/?project={pid}', timeout=900)
    per_task = collections.defaultdict(list)
    for prediction in predictions:
      per_task[prediction['task']].append(prediction)
    created = [datetime.datetime.fromisoformat(p['created_at'].replace('Z', '+00:00'))
               for p in predictions]
    missing = [t for t in ids if not any(p['model_version'] == version
                                         for p in per_task.get(t, []))]
    result.update(
        predictions=len(predictions),
        tasks_without_prediction=sum(1 for t in ids if t not in per_task),
        tasks_missing_version=len(missing), missing_sample=missing[:20],
        tasks_with_several=sum(1 for p in per_task.values() if len(p) > 1),
        empty_placeholders=sum(1 for p in predictions if is_placeholder(p)),
        placeholder_sample=[p['task'] for p in predictions if is_placeholder(p)][:20],
        predictions_with_regions=sum(1 for p in predictions if p.get('result')),
        versions=sorted({p['model_version'] for p in predictions}),
        first_to_last_prediction_s=round((max(created) - min(created)).total_seconds(), 1)
        if created else None,
        image_requests=images.requests, distinct_image_urls=len(images.distinct))

    # What the logs say.
    log = backend.log_path.read_text()
    answered = re.findall(r'predicted (\d+) tasks in ([\d.]+) s', log)
    late = re.findall(r'(\d+) of (\d+) tasks not predicted within the deadline', log)
    result.update(
        predict_calls=[{'tasks': int(n), 'seconds': float(s)} for n, s in answered],
        late_at_deadline=[int(n) for n, _ in late],
        backend_errors=len(re.findall(r' ERROR |Traceback', log)),
        backend_unreadable=log.count('image unreadable'),
        label_studio_incorrect_prediction=ls.log_path.read_text().count('incorrect prediction'))
    left = re.findall(r'; answered (\d+), (\d+) left for later', log)
    if left:  # the first /predict's: past PREDICT_MAX_ANSWERED or the deadline
      result['answered_by_predict'] = int(left[0][0])
    elif late:
      result['answered_by_predict'] = args.tasks - int(late[-1][0])
    # Where the action's time went: Label Studio before /predict (selecting and serializing the
    # tasks), /predict, Label Studio after it (saving the answered predictions one by one).
    done = re.search(r'^(\S+ \S+) INFO backend.app: Project \d+: predicted \d+ tasks in ([\d.]+) s',
                     log, re.M)
    if done:
      end = datetime.datetime.strptime(done.group(1), '%Y-%m-%d %H:%M:%S,%f').timestamp()
      result['label_studio_before_predict_s'] = round(end - float(done.group(2)) - clock_wall, 1)
      result['label_studio_after_predict_s'] = round(clock_wall + action_s - end, 1)
    return result
  finally:
    if sampler:
      sampler.stop()
    if backend:
      backend.stop()
    ls.stop()
    images.stop()


def code_version() -> str:
  """The commit, and a digest of uncommitted changes to backend/ and model/ (what ran)."""
  import hashlib
  import subprocess
  def git(*args):
    return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True).stdout
  commit = git('rev-parse', '--short', 'HEAD').strip() or 'unknown'
  diff = git('diff', 'HEAD', '--', 'backend', 'model')
  return f'{commit}+{hashlib.sha256(diff.encode()).hexdigest()[:8]}' if diff else commit


def write_results(result: dict | None, name: str) -> list[str]:
  runs = result_files.read_json(name, [])
  if result is not None:
    runs = sorted([r for r in runs if r['tasks'] != result['tasks']] + [result],
                  key=lambda r: r['tasks'])
  result_files.write_json(name, runs)
  lines = ['# Retrieve Predictions on every task of a project (real Label Studio 1.23.2)', '',
           'One "Retrieve Predictions" on all tasks (Data Manager, select all): Label Studio sends '
           'them in one `/predict` and gives up on it after 100 s (the action itself has no limit); '
           'the backend (pretrained base, int8, gunicorn: 1 worker × 8 threads unless the command says '
           'otherwise) answers at most `PREDICT_MAX_ANSWERED` tasks (500; runs of code before '
           '72baa2d answered all they could) by `PREDICT_DEADLINE_S` and pushes the rest through '
           'the API. Each '
           "task's image is its own URL on a local HTTP server (a few dozen synthetic JPEGs "
           'behind them), so every image is downloaded once. "stored at answer": predictions '
           'Label Studio held when the action returned; "all predicted": from pressing the '
           'action until every task holds one of the backend\'s version; "placeholders": '
           'predictions with no result and score 0 (none may exist: no image is unreadable); '
           '"missing": tasks without a prediction of the version at the end. RSS: the gunicorn '
           'worker, before the action, peak (VmHWM) after the action returned, and peak at the end.',
           '',
           '| tasks | deadline s | /predict s | answered in /predict | action s | stored at answer '
           '| s to all predicted | tasks/s | placeholders | missing | several | worker RSS start MB '
           '| peak after action MB | peak at end MB | cores |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in runs:
    predict_s = max((c['seconds'] for c in r['predict_calls']), default='-')
    answered = r.get('answered_by_predict', r['tasks'] - sum(r['late_at_deadline']))
    lines.append(
        f'| {r["tasks"]} | {r["predict_deadline_s"] or 60} | {predict_s} | {answered} | '
        f'{r["action_s"]} | {r["stored_at_answer"]} | '
        f'{r["seconds_to_all"]}{" (timed out)" if r["timed_out"] else ""}'
        f' | {r["tasks_per_s"]} | {r["empty_placeholders"]} | {r["tasks_missing_version"]} | '
        f'{r["tasks_with_several"]} | {r["rss_start_mb"]} | {r["hwm_after_action_mb"]} | '
        f'{r["hwm_end_mb"]} | {r["cores"]} |')
  lines += ['', "Where the action's time goes: Label Studio before `/predict` (selecting and "
            'serializing the tasks), `/predict`, Label Studio after it (saving the answered '
            'predictions one at a time, logging each pending entry):', '',
            '| tasks | before s | /predict s | after s | action s |', '|---|---|---|---|---|']
  lines += [f'| {r["tasks"]} | {r.get("label_studio_before_predict_s", "-")} | '
            f'{max((c["seconds"] for c in r["predict_calls"]), default="-")} | '
            f'{r.get("label_studio_after_predict_s", "-")} | {r["action_s"]} |' for r in runs]
  lines += ['', 'Commands (from the repository root):', '']
  lines += [f'- {r["tasks"]} tasks ({r["date"]}, code {r.get("code", "?")}, load average {r["load_avg_before"]} before, '
            f'{r["load_avg_after"]} after): `{r["command"]}`' for r in runs]
  notes = [f'- {r["tasks"]} tasks: {r["note"]}' for r in runs if r.get('note')]
  if notes:
    lines += ['', 'Notes:', '', *notes]
  result_files.write_markdown(name, lines)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tasks', type=int, default=20000)
  parser.add_argument('--images', type=int, default=40, help='distinct images behind the URLs')
  parser.add_argument('--chunk', type=int, default=4000, help='tasks per import request')
  parser.add_argument('--deadline', type=float, default=None,
                      help="PREDICT_DEADLINE_S (default: the backend's, 60)")
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--threads', type=int, default=8)
  parser.add_argument('--max-wait', type=float, default=1800,
                      help='seconds from the action to give up waiting for every prediction')
  parser.add_argument('--poll', type=float, default=5.0)
  parser.add_argument('--model-dir', type=Path,
                      default=Path(os.environ.get('MODEL_DIR', REPO / 'models')),
                      help='holds the converted base (converted there first if missing)')
  parser.add_argument('--name', default='retrieve_predictions', help='results file name')
  parser.add_argument('--note', default='', help='a remark for the table (e.g. machine load)')
  parser.add_argument('--keep', action='store_true', help='keep the work folder and the logs')
  parser.add_argument('--render', action='store_true',
                      help='only rewrite the .md from the .json (no run)')
  args = parser.parse_args()
  if args.render:
    print('\n'.join(write_results(None, args.name)))
    return
  work = Path(tempfile.mkdtemp(prefix='retrieve-predictions-'))
  try:
    load_before = os.getloadavg()[0]
    code = code_version()
    result = run(args, work)
    result.update(code=code, cores=os.cpu_count(), load_avg_before=round(load_before, 2),
                  load_avg_after=round(os.getloadavg()[0], 2),
                  date=datetime.date.today().isoformat(), note=args.note,
                  command=' '.join(['.venv/bin/python benchmarks/retrieve_predictions.py',
                                    *map(shlex.quote, sys.argv[1:])]))
    print(json.dumps(result, indent=1))
    print('\n'.join(write_results(result, args.name)))
  finally:
    if args.keep:
      print(f'work folder kept: {work}')
    else:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
