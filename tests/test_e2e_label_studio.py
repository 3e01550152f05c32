"""End to end with a real Label Studio 1.23.2, driven through its REST API as a person drives the UI.

Create a project, upload images made here, connect our backend, label some
tasks, press Start Training, wait for the new model version, run Retrieve
Predictions on the unlabeled tasks, check what Label Studio stored, then
download the .tflite from the backend and run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import requests

from model.detection import iou_xyxy
from model.detector import TFLiteDetector
from model.images import load_image
from tests.conftest import REPO, Backend, free_port
from tests.synthetic import make_task_set

LABEL_STUDIO = REPO / '.venv-labelstudio' / 'bin' / 'label-studio'
CONFIG = ('<View><Image name="image" value="$image"/>'
          '<RectangleLabels name="label" toName="image"><Label value="disc"/></RectangleLabels></View>')
USER, PASSWORD = 'tester@example.com', 'a-long-test-password-42'
LABELED, UNLABELED = 8, 4


class LabelStudio:
  """A Label Studio server on 127.0.0.1 with an empty data directory."""

  def __init__(self, data_dir):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    env = {k: v for k, v in os.environ.items() if k not in ('HOST', 'PORT', 'USERNAME', 'PASSWORD')}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LABEL_STUDIO_USERNAME=USER,
        LABEL_STUDIO_PASSWORD=PASSWORD, LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK='true',
        LABEL_STUDIO_ML_BLOCK_LOCAL_IP='false', LABEL_STUDIO_SSRF_PROTECTION_ENABLED='false',
        LABEL_STUDIO_LATEST_VERSION_CHECK='false', LABEL_STUDIO_COLLECT_ANALYTICS='false',
        LABEL_STUDIO_SENTRY_DSN='', LABEL_STUDIO_FRONTEND_SENTRY_DSN='')
    self.log = open(data_dir / 'label-studio.log', 'w')  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(
        [str(LABEL_STUDIO), 'start', '--no-browser', '--internal-host', '127.0.0.1',
         '--port', str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
    self.log_path = data_dir / 'label-studio.log'
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f'Label Studio exited: {self.log_path.read_text()[-3000:]}')
      try:
        if requests.get(self.url + '/health', timeout=2).status_code == 200:
          break
      except requests.ConnectionError:
        pass
      time.sleep(1)
    else:
      raise RuntimeError(f'Label Studio did not start: {self.log_path.read_text()[-3000:]}')
    self.token = self._personal_access_token()
    self.api = requests.Session()

  def _personal_access_token(self) -> str:
    """Log in as a person does, then create a personal access token."""
    browser = requests.Session()
    browser.get(self.url + '/user/login/')
    csrf = browser.cookies['csrftoken']
    browser.post(self.url + '/user/login/', data={
        'email': USER, 'password': PASSWORD, 'csrfmiddlewaretoken': csrf},
        headers={'Referer': self.url + '/user/login/'})
    response = browser.post(self.url + '/api/token/', headers={
        'X-CSRFToken': browser.cookies['csrftoken'], 'Referer': self.url + '/'})
    assert response.status_code in (200, 201), response.text
    return response.json()['token']

  def call(self, method: str, path: str, **kwargs):
    """An API call with a fresh access token from the personal access token."""
    access = requests.post(self.url + '/api/token/refresh/', json={'refresh': self.token}).json()
    response = self.api.request(method, self.url + path,
                                headers={'Authorization': f'Bearer {access["access"]}'},
                                timeout=120, **kwargs)
    assert response.status_code < 300, f'{method} {path}: {response.status_code} {response.text[:500]}'
    return response.json() if response.content else None

  def stop(self):
    self.process.terminate()
    try:
      self.process.wait(20)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.log.close()


@pytest.fixture(scope='module')
def label_studio(tmp_path_factory):
  if not LABEL_STUDIO.exists():
    if os.environ.get('CI') == 'true':
      pytest.fail('.venv-labelstudio is missing: scripts/setup.sh --test must install Label Studio')
    pytest.skip('Label Studio is not installed here (bash scripts/setup.sh --test installs it)')
  server = LabelStudio(tmp_path_factory.mktemp('label-studio'))
  yield server
  server.stop()


def test_label_train_and_retrieve_predictions_through_label_studio(label_studio, base_paths,
                                                                   tmp_path):
  ls = label_studio
  # Images made here: a red disc on varied textured backgrounds.
  tasks = make_task_set(tmp_path, LABELED + UNLABELED, ('disc',), split=None, seed=11)
  truth = {t['data']['image'].split('/')[-1]: t['annotations'][0]['result'][0] for t in tasks}

  project = ls.call('POST', '/api/projects/', json={'title': 'ducks', 'label_config': CONFIG})
  pid = project['id']
  files = {f'file{i}': (name, (tmp_path / 'images' / name).read_bytes(), 'image/jpeg')
           for i, name in enumerate(truth)}
  ls.call('POST', f'/api/projects/{pid}/import', files=files)
  ls_tasks = ls.call('GET', f'/api/tasks/?project={pid}&page_size=100')['tasks']
  assert len(ls_tasks) == LABELED + UNLABELED

  def original_name(task):
    return re.sub(r'^[0-9a-f]{8}-', '', task['data']['image'].split('/')[-1])

  # Our backend, pointed at this Label Studio with the personal access token.
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  backend = Backend(model_dir, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token,
                    TRAIN_EVERY_N_ANNOTATIONS='0')
  try:
    ml = ls.call('POST', '/api/ml/', json={'url': backend.url, 'project': pid,
                                            'title': 'fewshot-ssd', 'is_interactive': False})
    for task in ls_tasks[:LABELED]:
      region = dict(truth[original_name(task)], id=f'r{task["id"]}')
      ls.call('POST', f'/api/tasks/{task["id"]}/annotations/', json={'result': [region]})

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
    for task in ls_tasks[LABELED:]:
      predictions = ls.call('GET', f'/api/predictions/?task={task["id"]}')
      assert predictions, f'no prediction stored for task {task["id"]}'
      prediction = predictions[-1]
      assert prediction['model_version'] == 'fewshot-ssd-v1'
      best = max(prediction['result'], key=lambda r: r['score'])
      value, expected = best['value'], truth[original_name(task)]['value']
      assert value['rectanglelabels'] == ['disc']
      assert iou_xyxy(
          (value['x'], value['y'], value['x'] + value['width'], value['y'] + value['height']),
          (expected['x'], expected['y'], expected['x'] + expected['width'],
           expected['y'] + expected['height'])) >= 0.5

    # The artifact a phone would get, downloaded from the backend and run.
    response = requests.get(f'{backend.url}/artifacts/{pid}/latest/model_int8.tflite')
    assert response.status_code == 200
    (tmp_path / 'model_int8.tflite').write_bytes(response.content)
    labels = requests.get(f'{backend.url}/artifacts/{pid}/latest/labels.txt').text.split()
    detector = TFLiteDetector(tmp_path / 'model_int8.tflite', labels)
    name = original_name(ls_tasks[-1])
    found = detector.detect(load_image(tmp_path / 'images' / name))
    assert found and found[0].label == 'disc'
    metrics = json.loads(requests.get(f'{backend.url}/artifacts/{pid}/latest/metrics.json').text)
    assert metrics['images']['train'] == LABELED
  finally:
    backend.stop()
