"""End to end with a real Label Studio 1.23.2, driven through its REST API as a person drives the UI.

Create a project, upload images made here, connect our backend, label some
tasks, press Start Training, wait for the new model version, run Retrieve
Predictions on the unlabeled tasks, check what Label Studio stored, then
download the .tflite from the backend and run it. And basic auth on both of
Label Studio's paths to the backend: its ML calls and the project webhook.
And a backend killed mid-training that comes back serving its last version.
"""

from __future__ import annotations

import base64
import json
import shutil
import time

import requests

from model.detection import iou_xyxy
from model.detector import TFLiteDetector
from model.images import load_image
from tests.conftest import Backend
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
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    TRAIN_EVERY_N_ANNOTATIONS='0')
  try:
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': pid,
                                            'title': 'fewshot-ssd', 'is_interactive': False})
    annotate(ls, project, project.tasks[:LABELED])

    ls.call('POST', f'/api/ml/{ml["id"]}/train')  # the Start Training button
    deadline = time.monotonic() + 600
    status = {}
    while time.monotonic() < deadline:
      status = requests.get(f'{backend.url}/train/status', params={'project': pid}).json()
      if status['current_version'] == 'fewshot-ssd-v1' or status['state'] == 'failed':
        break
      time.sleep(2)
    assert status['current_version'] == 'fewshot-ssd-v1', (status, backend.output())

    # "Retrieve Predictions" on every task; Label Studio stores what /predict returns.
    ls.call('POST', f'/api/dm/actions?id=retrieve_tasks_predictions&project={pid}',
            json={'selectedItems': {'all': True, 'excluded': []}})
    for task in project.tasks[LABELED:]:
      predictions = ls.call('GET', f'/api/predictions/?task={task["id"]}')
      assert predictions, f'no prediction stored for task {task["id"]}'
      prediction = predictions[-1]
      assert prediction['model_version'] == 'fewshot-ssd-v1'
      best = max(prediction['result'], key=lambda r: r['score'])
      assert best['value']['rectanglelabels'] == ['disc']
      expected = project.truth[project.original_name(task)]['value']
      assert iou_xyxy(_percent_box(best['value']), _percent_box(expected)) >= 0.5

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
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and webhooks_received() == before:
      time.sleep(0.3)
    return webhooks_received() - before

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
    annotate(ls, project, project.tasks[:1])
    assert received_after(before, seconds=3) == 0
    # The README's fix: add the Authorization header to that webhook.
    token = base64.b64encode(f'{user}:{password}'.encode()).decode()
    ls.call('PATCH', f'/api/webhooks/{hooks[0]["id"]}/',
            json={'headers': {'Authorization': f'Basic {token}'}})
    annotate(ls, project, project.tasks[1:2])
    assert received_after(before) == 1
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
    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline and not (status.get('state') == 'running'
                                               and status.get('step', 0) >= 1):
      time.sleep(0.3)
      status = requests.get(f'{backend.url}/train/status', params={'project': project.id}).json()
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
    assert requests.get(f'{backend.url}/train/status', params={'project': project.id}).json()[
        'state'] == 'idle'
  finally:
    backend.stop()
