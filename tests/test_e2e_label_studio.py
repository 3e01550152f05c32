"""End to end with a real Label Studio 1.23.2, driven through its REST API as a person drives the UI.

Create a project, upload images made here, connect our backend (its
diagnostics pass), label some tasks, press Start Training, wait for the new
model version and for the refresh that stores its predictions on every
unlabeled task, sort the Data Manager by prediction score, then download the
.tflite from the backend and run it. Retrieve Predictions on 1000 tasks
answers by the deadline and the backend completes the rest through the API. And basic auth on both of
Label Studio's paths to the backend: its ML calls and the project webhook.
And a backend killed mid-training that comes back serving its last version;
a second iteration warm-started from the first with a legacy token; and the
errors a user meets (empty or unknown project, a wrong API key) in plain words.
"""

from __future__ import annotations

import base64
import json
import shutil
import time

import pytest
import requests

from backend.label_studio_api import UNANNOTATED_TASKS
from model.boxes import iou_xyxy
from model.tflite_detector import TFLiteDetector
from model.images import load_image
from tests.conftest import SMALL_INPUT, Backend, poll
from tests.label_studio import DISC_CONFIG, annotate, make_disc_project

LABELED, UNLABELED = 8, 4


def _percent_box(value: dict) -> tuple:
  return value['x'], value['y'], value['x'] + value['width'], value['y'] + value['height']


def test_label_train_and_retrieve_predictions_through_label_studio(label_studio, base_paths,
                                                                   tmp_path):
  ls = label_studio
  # Images made here: a red disc on varied textured backgrounds.
  project = make_disc_project(ls, tmp_path, LABELED + UNLABELED, seed=11)
  pid = project.id

  # Our backend, pointed at this Label Studio with the personal access token.
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  # Discs are easy: 200 steps at a small input find them all, though one at
  # the frame's edge may score under the default threshold (0.3-0.5 here).
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    TRAIN_EVERY_N_ANNOTATIONS='0', TRAIN_MAX_STEPS='200',
                    TRAIN_INPUT_SIZE=str(SMALL_INPUT), SCORE_THRESHOLD='0.2')
  try:
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': pid,
                                            'title': 'fewshot-ssd', 'is_interactive': False})
    # Connecting ran the diagnostics in the background; GET /diagnose tells the same.
    report = requests.get(f'{backend.url}/diagnose', params={'project': pid}).json()
    assert [c['name'] for c in report['checks']] == ['settings', 'label_studio', 'api_key',
                                                     'project', 'image'], report
    assert report['ok'], report
    assert 'a personal access token of' in report['checks'][2]['detail']
    assert report['checks'][4]['detail'] == f'task {project.tasks[0]["id"]}: 320x240'
    annotate(ls, project, project.tasks[:LABELED])

    ls.call('POST', f'/api/ml/{ml["id"]}/train')  # the Start Training button
    status = _wait_for_training(backend, pid, lambda s: s['state'] == 'failed' or s[
        'current_version'] == 'fewshot-ssd-v1')
    assert status['current_version'] == 'fewshot-ssd-v1', (status, backend.output())

    # With no further action, every unlabeled task gets a prediction of v1 ...
    status = _wait_for_training(backend, pid, lambda s: s['refresh']['state'] in (
        'done', 'failed') and s['refresh']['model_version'] == 'fewshot-ssd-v1')
    assert status['refresh']['state'] == 'done', (status, backend.output())
    assert status['refresh']['pushed'] == UNLABELED
    scores = {}
    for task in project.tasks[LABELED:]:
      (prediction,) = ls.call('GET', f'/api/predictions/?task={task["id"]}')
      assert prediction['model_version'] == 'fewshot-ssd-v1'
      best = max(prediction['result'], key=lambda r: r['score'])
      assert best['value']['rectanglelabels'] == ['disc']
      expected = project.truth[project.original_name(task)]['value']
      assert iou_xyxy(_percent_box(best['value']), _percent_box(expected)) >= 0.5
      scores[task['id']] = prediction['score']
    # ... the project shows that version, and the Data Manager sorts by its score.
    assert ls.call('GET', f'/api/projects/{pid}')['model_version'] == 'fewshot-ssd-v1'
    ordered = ls.call('GET', '/api/tasks/', params={'project': pid, 'fields': 'all', 'query': json.dumps(
        {'ordering': ['tasks:predictions_score'], 'filters': UNANNOTATED_TASKS['filters']})})['tasks']
    assert [t['predictions_score'] for t in ordered] == pytest.approx(sorted(scores.values())), (
        ordered, scores)
    assert [t['id'] for t in ordered] == sorted(scores, key=lambda t: (scores[t], t))

    # "Retrieve Predictions" on every task now stores nothing twice: v1 is there already.
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={pid}',
            json={'selectedItems': {'all': True, 'excluded': []}})
    for task in project.tasks[LABELED:]:
      assert len(ls.call('GET', f'/api/predictions/?task={task["id"]}')) == 1

    # The artifact a phone would get, downloaded from the backend and run.
    response = requests.get(f'{backend.url}/artifacts/{pid}/latest/model_int8.tflite')
    assert response.status_code == 200
    (tmp_path / 'model_int8.tflite').write_bytes(response.content)
    labels = requests.get(f'{backend.url}/artifacts/{pid}/latest/labels.txt').text.split()
    detector = TFLiteDetector(tmp_path / 'model_int8.tflite', labels)
    found = detector.detect(load_image(project.images / project.original_name(project.tasks[-1])))
    assert found and found[0].label == 'disc'
    metrics = json.loads(requests.get(f'{backend.url}/artifacts/{pid}/latest/metrics.json').text)
    assert metrics['images']['train'] == LABELED
  finally:
    backend.stop()


def test_basic_auth_passes_on_ml_calls_and_on_the_webhook_with_its_header(label_studio, base_paths,
                                                                          tmp_path):
  """Label Studio sends basic auth on its ML calls only; the webhook needs the header added."""
  ls = label_studio
  project = make_disc_project(ls, tmp_path, 3, seed=12, title='auth')
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  user, password = 'ls-backend', 'secret-9'
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password,
                    TRAIN_EVERY_N_ANNOTATIONS='100')

  def webhooks_received():
    return requests.get(backend.url + '/metrics', auth=(user, password)).json()['webhooks']

  def received_after(before, seconds=10):
    return poll(webhooks_received, lambda count: count != before, seconds) - before

  try:
    assert requests.get(backend.url + '/metrics', auth=(user, 'wrong')).status_code == 401
    ml = ls.call('POST', '/api/ml/', json={
        'url': backend.url, 'project': project.id, 'title': 'fewshot-ssd', 'is_interactive': False,
        'auth_method': 'BASIC_AUTH', 'basic_auth_user': user, 'basic_auth_pass': password})
    # Label Studio's ML calls carry the credentials: /setup answered, so it is connected.
    assert ls.call('GET', f'/api/ml/{ml["id"]}')['state'] == 'CO'
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}',
            json={'selectedItems': {'all': True, 'excluded': []}})
    stored = ls.call('GET', f'/api/predictions/?task={project.tasks[0]["id"]}')
    assert stored and stored[-1]['model_version'] == 'fewshot-ssd-base'

    # The project webhook Label Studio made for the backend has no credentials: 401, not counted.
    hooks = [h for h in ls.call('GET', f'/api/webhooks/?project={project.id}')
             if h['url'].startswith(backend.url)]
    assert len(hooks) == 1, hooks
    before = webhooks_received()

    def refused():  # the access log's lines for webhook calls turned away
      return backend.log_path.read_text().count('"POST /webhook HTTP/1.1" 401')
    annotate(ls, project, project.tasks[:1])
    assert poll(refused, bool, 10) == 1 and webhooks_received() == before  # sent, refused, not counted
    # The README's fix: add the Authorization header to that webhook.
    token = base64.b64encode(f'{user}:{password}'.encode()).decode()
    ls.call('PATCH', f'/api/webhooks/{hooks[0]["id"]}/',
            json={'headers': {'Authorization': f'Basic {token}'}})
    annotate(ls, project, project.tasks[1:2])
    assert received_after(before) == 1
    # The whole run's log (access log included) holds neither secret.
    log = backend.log_path.read_text()
    assert 'retrieve' in log.lower() or '/predict' in log
    assert password not in log and ls.token not in log and token not in log
  finally:
    backend.stop()


def test_a_backend_killed_mid_training_restarts_serving_its_last_version(label_studio, base_paths,
                                                                         trained_run, tmp_path):
  ls = label_studio
  project = make_disc_project(ls, tmp_path, 9, seed=13, title='killed')
  annotate(ls, project, project.tasks[:8])
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  versions = model_dir / 'projects' / str(project.id) / 'versions'
  shutil.copytree(trained_run, versions / 'v1')
  env = {'LABEL_STUDIO_URL': ls.url, 'LABEL_STUDIO_API_KEY': ls.token,
         'TRAIN_EVERY_N_ANNOTATIONS': '0'}
  backend = Backend(model_dir, **env)
  try:
    requests.post(backend.url + '/webhook', json={'action': 'START_TRAINING',
                                                  'project': {'id': project.id}})
    status = poll(lambda: requests.get(f'{backend.url}/train/status',
                                       params={'project': project.id}).json(),
                  lambda s: s['state'] == 'running' and s.get('step', 0) >= 1, 300)
    assert status['state'] == 'running', (status, backend.output())
  finally:
    backend.kill()

  assert sorted(p.name for p in versions.iterdir()) == ['v1']
  backend = Backend(model_dir, **env)
  try:
    assert requests.post(backend.url + '/setup', json={'project': project.id}).json() == {
        'model_version': 'fewshot-ssd-v1'}
    response = requests.post(backend.url + '/predict', timeout=60, json={
        'tasks': [project.tasks[-1]], 'project': project.id,
        'label_config': DISC_CONFIG.replace('<Label value="disc"/>',
                                            '<Label value="disc"/><Label value="square"/>')})
    (prediction,) = response.json()['results']
    assert prediction['model_version'] == 'fewshot-ssd-v1'
    assert prediction['result'][0]['value']['rectanglelabels'] == ['disc']
    # The status the killed process left says what happened to that run.
    status = requests.get(f'{backend.url}/train/status', params={'project': project.id}).json()
    assert status['state'] == 'failed' and 'stopped during training' in status['last_error']
  finally:
    backend.stop()


def _wait_for_training(backend, project_id: int, done, timeout: float = 600) -> dict:
  """Polls /train/status until `done(status)` (or the timeout); returns the last status."""
  return poll(lambda: requests.get(f'{backend.url}/train/status',
                                   params={'project': project_id}).json(), done, timeout, every=1)


def test_the_next_iteration_starts_from_the_last_with_a_legacy_token(label_studio, base_paths,
                                                                    trained_run, tmp_path):
  """v1 knows "disc" and "square"; the project labels only discs: v2 keeps disc's weights and
  drops "square". Tasks and uploaded images come through a legacy token this time."""
  ls = label_studio
  # Organization -> API Tokens Settings: legacy tokens on (Label Studio 1.23 has them off).
  ls.call('POST', '/api/jwt/settings', json={'api_tokens_enabled': True,
                                              'legacy_api_tokens_enabled': True})
  legacy_token = ls.call('GET', '/api/current-user/token')['token']
  project = make_disc_project(ls, tmp_path, 9, seed=14, title='second iteration')
  labeled = project.tasks[:6]
  annotate(ls, project, labeled[:5])
  # An annotation with a label the config doesn't have: left out of training, logged.
  foreign = dict(project.region_for(labeled[5]), id='foreign')
  foreign['value'] = dict(foreign['value'], rectanglelabels=['raccoon'])
  ls.call('POST', f'/api/tasks/{labeled[5]["id"]}/annotations/',
          json={'result': [project.region_for(labeled[5]), foreign]})
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  shutil.copytree(trained_run, model_dir / 'projects' / str(project.id) / 'versions' / 'v1')
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=legacy_token,
                    TRAIN_EVERY_N_ANNOTATIONS='0',
                    TRAIN_MAX_STEPS='60')  # v1 knows discs already: a few steps keep them
  try:
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': project.id,
                                            'title': 'fewshot-ssd', 'is_interactive': False})
    ls.call('POST', f'/api/ml/{ml["id"]}/train')
    status = _wait_for_training(backend, project.id, lambda s: s['state'] == 'failed' or s[
        'current_version'] == 'fewshot-ssd-v2')
    assert status['current_version'] == 'fewshot-ssd-v2', (status, backend.output())
    assert requests.get(backend.url + '/versions', json={'project': project.id}).json() == {
        'versions': ['fewshot-ssd-base', 'fewshot-ssd-v1', 'fewshot-ssd-v2']}
    artifact = f'{backend.url}/artifacts/{project.id}/fewshot-ssd-v2'
    assert requests.get(f'{artifact}/labels.txt').text == 'disc\n'
    metrics = requests.get(f'{artifact}/metrics.json').json()
    assert metrics['class_head_init'] == {'disc': 'kept from the previous iteration'}
    assert [h['iteration'] for h in metrics['history']] == [1, 2]
    assert metrics['images']['train'] == 6
    assert '1 boxes with labels not in the config were left out' in backend.log_path.read_text()

    # The refresh after v2, then Retrieve Predictions: both fetch the uploaded images with the
    # legacy token, and every unlabeled task ends with one prediction of v2.
    status = _wait_for_training(backend, project.id, lambda s: s['refresh']['state'] in (
        'done', 'failed') and s['refresh']['model_version'] == 'fewshot-ssd-v2')
    assert status['refresh']['state'] == 'done', (status, backend.output())
    assert ls.call('GET', f'/api/projects/{project.id}')['model_version'] == 'fewshot-ssd-v2'
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}',
            json={'selectedItems': {'all': True, 'excluded': []}})
    for task in project.tasks[6:]:
      (prediction,) = ls.call('GET', f'/api/predictions/?task={task["id"]}')
      assert prediction['model_version'] == 'fewshot-ssd-v2'
      best = max(prediction['result'], key=lambda r: r['score'])
      expected = project.truth[project.original_name(task)]['value']
      assert iou_xyxy(_percent_box(best['value']), _percent_box(expected)) >= 0.5
  finally:
    backend.stop()


def test_training_errors_say_what_is_wrong_and_publish_nothing(label_studio, base_paths, tmp_path):
  ls = label_studio
  empty = make_disc_project(ls, tmp_path, 2, seed=15, title='nothing labeled yet')
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')

  def start_training(backend, project_id):
    response = requests.post(backend.url + '/webhook', json={'action': 'START_TRAINING',
                                                             'project': {'id': project_id}})
    assert response.status_code == 200
    return _wait_for_training(backend, project_id, lambda s: s['state'] == 'failed', 120)

  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token)
  try:
    status = start_training(backend, empty.id)
    assert status['state'] == 'failed'
    assert f'project {empty.id} has no annotated tasks' in status['last_error']
    status = start_training(backend, 987654)
    assert status['state'] == 'failed'
    assert 'Label Studio answered HTTP 404 for project 987654' in status['last_error']
  finally:
    backend.stop()

  annotate(ls, empty, empty.tasks[:1])
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY='not-a-real-token')
  try:
    status = start_training(backend, empty.id)
    assert 'Label Studio answered HTTP 401' in status['last_error']
    report = requests.get(f'{backend.url}/diagnose', params={'project': empty.id}).json()
    assert not report['ok'] and report['checks'][-1]['name'] == 'api_key'
    assert 'the legacy token was refused' in report['checks'][-1]['detail']
    assert 'personal access token' in report['checks'][-1]['fix']
    # Label Studio connecting (its /setup call) runs them in the background, into the log.
    requests.post(backend.url + '/setup', json={'project': empty.id})
    log = poll(backend.log_path.read_text, lambda text: 'api_key FAILED' in text, 30)
    assert 'api_key FAILED: the legacy token was refused' in log
    # Pre-annotations with the wrong key: the image is refused, the task gets an empty
    # prediction, and the log says why.
    config = DISC_CONFIG.replace('<Label value="disc"/>',
                                 '<Label value="disc" predicted_values="Person,Dog,Cat,Car"/>')
    response = requests.post(backend.url + '/predict', timeout=60, json={
        'tasks': [empty.tasks[1]], 'project': empty.id, 'label_config': config})
    assert response.json()['results'] == [{'model_version': 'fewshot-ssd-base', 'score': 0.0,
                                           'result': []}]
    assert 'HTTP 401 (Label Studio needs a valid LABEL_STUDIO_API_KEY' in backend.log_path.read_text()
  finally:
    backend.stop()
  assert not list((model_dir / 'projects' / str(empty.id) / 'versions').glob('*'))


def test_images_from_local_files_storage_are_predicted(label_studio, base_paths, trained_run,
                                                       tmp_path):
  """A folder connected as Local Files storage: tasks point at /data/local-files/?d=..."""
  from tests.synthetic import make_task_set
  ls = label_studio
  folder = ls.files_root / 'discs'
  tasks = make_task_set(folder, 3, ('disc',), split=None, seed=16)
  truth = {t['data']['image'].split('/')[-1]: t['annotations'][0]['result'][0]['value']
           for t in tasks}
  project = ls.call('POST', '/api/projects/', json={'title': 'local files',
                                                     'label_config': DISC_CONFIG})
  storage = ls.call('POST', '/api/storages/localfiles/', json={
      'project': project['id'], 'title': 'discs', 'path': str(folder / 'images'),
      'regex_filter': r'.*\.jpg', 'use_blob_urls': True})
  ls.call('POST', f'/api/storages/localfiles/{storage["id"]}/sync')
  ls_tasks = ls.call('GET', f'/api/tasks/?project={project["id"]}&page_size=100')['tasks']
  assert len(ls_tasks) == 3 and all(t['data']['image'].startswith('/data/local-files/?d=')
                                    for t in ls_tasks), ls_tasks
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  shutil.copytree(trained_run, model_dir / 'projects' / str(project['id']) / 'versions' / 'v1')
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token)
  try:
    response = requests.post(backend.url + '/predict', timeout=60, json={
        'tasks': ls_tasks, 'project': project['id'], 'label_config': DISC_CONFIG})
    for task, prediction in zip(ls_tasks, response.json()['results']):
      assert prediction['model_version'] == 'fewshot-ssd-v1', backend.output()
      best = max(prediction['result'], key=lambda r: r['score'])
      expected = truth[task['data']['image'].split('/')[-1]]
      assert iou_xyxy(_percent_box(best['value']), _percent_box(expected)) >= 0.5
  finally:
    backend.stop()


def test_a_training_job_fetches_the_annotated_tasks_only(label_studio, tmp_path):
  from backend.settings import Settings
  from backend.training import fetch_project
  ls = label_studio
  project = make_disc_project(ls, tmp_path, 5, seed=17, title='mostly unlabeled')
  annotate(ls, project, project.tasks[1:3])
  config, tasks = fetch_project(Settings(label_studio_url=ls.url, label_studio_api_key=ls.token),
                                project.id)
  assert 'RectangleLabels' in config
  assert sorted(t['id'] for t in tasks) == sorted(t['id'] for t in project.tasks[1:3])
  assert all(t['annotations'] for t in tasks)


def test_retrieve_predictions_on_two_thousand_tasks_answers_in_time_and_completes_them_all(
    label_studio, base_paths, tmp_path):
  """Retrieve Predictions on every task of a project too big for one /predict: the answer
  comes by PREDICT_DEADLINE_S with what is done, Label Studio stores nothing for the rest,
  and the backend completes them through the API: each task ends with one real prediction,
  even when the button is pressed twice."""
  import http.server
  import threading
  from tests.synthetic import jpeg_bytes, textured_background
  count, image = 2000, jpeg_bytes(textured_background(64, 48))

  class Images(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_GET(self):  # noqa: N802 (http.server's name)
      self.send_response(200)
      self.send_header('Content-Type', 'image/jpeg')
      self.end_headers()
      self.wfile.write(image)

  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Images)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  ls = label_studio
  config = DISC_CONFIG.replace('<Label value="disc"/>', '<Label value="disc" predicted_values="Person"/>')
  pid = ls.call('POST', '/api/projects/', json={'title': 'big', 'label_config': config})['id']
  ls.call('POST', f'/api/projects/{pid}/import', json=[
      {'image': f'http://127.0.0.1:{httpd.server_address[1]}/{i}.jpg'} for i in range(count)])
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    PREDICT_DEADLINE_S='3')
  try:
    ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': pid, 'title': 'fewshot-ssd',
                                      'is_interactive': False})
    # A person chose what the project shows ("live": the backend's title); late tasks keep it.
    ls.call('PATCH', f'/api/projects/{pid}', json={'model_version': 'fewshot-ssd'})
    started = time.monotonic()
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={pid}',
            json={'selectedItems': {'all': True, 'excluded': []}})
    assert time.monotonic() - started < 30
    stored_at_once = ls.call('GET', f'/api/predictions/?project={pid}')
    assert len(stored_at_once) < count  # the deadline left some out, and nothing was stored for them
    # Pressed again while the backend completes them: still one prediction per task.
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={pid}',
            json={'selectedItems': {'all': True, 'excluded': []}})

    status = _wait_for_training(backend, pid, lambda s: s['refresh']['state'] in ('done', 'failed'),
                                timeout=300)
    assert status['refresh']['state'] == 'done', (status, backend.output()[-3000:])
    assert status['refresh']['kind'] == 'late tasks'
    # one refresh, of the first press's late tasks only, each page read back from Label Studio
    assert status['refresh']['tasks'] == status['refresh']['pushed'] < count, status
    stored = ls.call('GET', f'/api/predictions/?project={pid}')
    per_task = {}
    for prediction in stored:
      per_task.setdefault(prediction['task'], []).append(prediction)
    assert len(per_task) == count and all(len(p) == 1 for p in per_task.values())
    assert {p['model_version'] for p in stored} == {'fewshot-ssd-base'}
    assert all(isinstance(p['result'], list) and p['score'] is not None for p in stored)
    assert ls.call('GET', f'/api/projects/{pid}')['model_version'] == 'fewshot-ssd'
  finally:
    backend.stop()
    httpd.shutdown()
