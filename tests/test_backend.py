"""The ML backend over real HTTP (gunicorn), as Label Studio calls it."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import requests

from backend.settings import Settings, SettingsError
from model.boxes import iou_xyxy
from tests.conftest import REPO, Backend, free_port, poll

CONFIG = ('<View><Image name="img" value="$photo"/>'
          '<RectangleLabels name="box" toName="img">'
          '<Label value="disc"/><Label value="square"/></RectangleLabels></View>')
BASE_CONFIG = ('<View><Image name="image" value="$image"/>'
               '<RectangleLabels name="label" toName="image">'
               '<Label value="hound" predicted_values="Dog"/><Label value="car"/>'
               '</RectangleLabels></View>')


@pytest.fixture(scope='module')
def model_dir(base_paths, trained_run, tmp_path_factory):
  """A model directory with the base and, for project 7, one published version."""
  directory = tmp_path_factory.mktemp('backend-models')
  shutil.copytree(base_paths.base_dir, directory / 'base')
  shutil.copytree(trained_run, directory / 'projects' / '7' / 'versions' / 'v1')
  return directory


@pytest.fixture(scope='module')
def backend(model_dir, shapes_dataset):
  server = Backend(model_dir, LOCAL_FILES_DOCUMENT_ROOT=str(shapes_dataset))
  yield server
  server.stop()


@pytest.fixture(scope='module')
def image_server(shapes_dataset):
  """A plain HTTP server for the test images (tasks with http:// URLs)."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_dataset))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f'http://127.0.0.1:{server.server_address[1]}'
  server.shutdown()


def test_health_and_root_answer_instantly(backend):
  for path in ('/health', '/'):
    started = time.monotonic()
    response = requests.get(backend.url + path, timeout=5)
    assert response.status_code == 200
    assert response.json() == {'status': 'UP', 'model_class': 'FewShotSSD'}
    assert time.monotonic() - started < 1.0


def test_setup_returns_the_project_version(backend):
  body = {'project': '7.1700000000', 'schema': CONFIG, 'hostname': 'http://localhost:8080',
          'access_token': 'x', 'extra_params': None}
  assert requests.post(backend.url + '/setup', json=body).json() == {'model_version': 'fewshot-ssd-v1'}
  body['project'] = '8.1700000000'
  assert requests.post(backend.url + '/setup', json=body).json() == {'model_version': 'fewshot-ssd-base'}


def test_predict_returns_one_prediction_per_task_in_order(backend, shapes_dataset, image_server):
  tasks_file = json.loads((shapes_dataset / 'tasks.json').read_text())
  test_tasks = [t for t in tasks_file if t['meta']['split'] == 'test'][:3]
  tasks = [{'id': t['id'], 'data': {'photo': f'{image_server}/{t["data"]["image"]}'}}
           for t in test_tasks]
  tasks.insert(1, {'id': 999, 'data': {'photo': f'{image_server}/images/missing.jpg'}})
  tasks.append({'id': 1000, 'data': {'photo': str(shapes_dataset / test_tasks[0]['data']['image'])}})
  response = requests.post(backend.url + '/predict', json={
      'tasks': tasks, 'project': '7.1700000000', 'label_config': CONFIG,
      'params': {'login': None, 'password': None, 'context': None}}, timeout=60)
  assert response.status_code == 200, response.text
  results = response.json()['results']
  assert len(results) == len(tasks)
  assert results[1] == {'model_version': 'fewshot-ssd-v1', 'score': 0.0, 'result': []}
  for prediction, task in zip([results[0], results[2], results[3], results[4]],
                              test_tasks + [test_tasks[0]]):
    assert prediction['model_version'] == 'fewshot-ssd-v1'
    best = max(prediction['result'], key=lambda r: r['score'])
    truth = task['annotations'][0]['result'][0]['value']
    assert (best['from_name'], best['to_name'], best['type']) == ('box', 'img', 'rectanglelabels')
    assert (best['original_width'], best['original_height']) == (320, 240)
    value = best['value']
    assert value['rectanglelabels'] == truth['rectanglelabels']
    assert iou_xyxy((value['x'], value['y'], value['x'] + value['width'], value['y'] + value['height']),
                    (truth['x'], truth['y'], truth['x'] + truth['width'],
                     truth['y'] + truth['height'])) >= 0.5
    assert 0 < prediction['score'] <= 1


def test_before_training_the_base_predicts_labels_it_knows(model_dir, image_server, shapes_dataset):
  """Base classes reach the project's labels by name or `predicted_values`; others are dropped.

  At a low score threshold the base finds something in any textured image;
  its own detections, mapped by hand, are what the backend must send.
  """
  from model.run_folder import read_labels_file
  from model.tflite_detector import TFLiteDetector
  from model.images import load_image
  base = model_dir / 'base'
  detector = TFLiteDetector(base / 'detector.tflite', read_labels_file(base / 'detector_labels.txt'))
  found = detector.detect(load_image(shapes_dataset / 'images' / 'test-2-0.jpg'), min_score=0.02)
  classes = sorted({d.label for d in found})
  assert len(classes) >= 2, found
  # The first class the base found maps by predicted_values, the second by its own name;
  # any others are not in the config and must not appear.
  mapped = {classes[0]: 'thing', classes[1]: classes[1].lower()}
  config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
            f'<Label value="thing" predicted_values="Unicorn, {classes[0]}"/>'
            f'<Label value="{classes[1].lower()}"/></RectangleLabels></View>')
  expected = sorted((mapped[d.label], round(d.score, 4)) for d in found if d.label in mapped)
  server = Backend(model_dir, SCORE_THRESHOLD='0.02')
  try:
    tasks = [{'id': 1, 'data': {'image': f'{image_server}/images/test-2-0.jpg'}}]
    response = requests.post(server.url + '/predict', json={
        'tasks': tasks, 'project': 8, 'label_config': config})
    (prediction,) = response.json()['results']
    assert prediction['model_version'] == 'fewshot-ssd-base'
    assert sorted((r['value']['rectanglelabels'][0], r['score'])
                  for r in prediction['result']) == expected
    # A project whose labels the base doesn't know gets empty predictions.
    response = requests.post(server.url + '/predict', json={
        'tasks': tasks, 'project': 8, 'label_config': CONFIG.replace('$photo', '$image')})
    assert response.json()['results'] == [{'model_version': 'fewshot-ssd-base', 'score': 0.0,
                                           'result': []}]
  finally:
    server.stop()


def test_predicted_values_map_model_classes_to_the_projects_labels(backend, shapes_dataset,
                                                                  image_server):
  """The trained model says "disc"; this project calls it "round thing" and has no squares."""
  tasks_file = json.loads((shapes_dataset / 'tasks.json').read_text())
  disc_task = next(t for t in tasks_file if t['meta']['split'] == 'test'
                   and t['annotations'][0]['result'][0]['value']['rectanglelabels'] == ['disc'])
  square_task = next(t for t in tasks_file if t['meta']['split'] == 'test'
                     and t['annotations'][0]['result'][0]['value']['rectanglelabels'] == ['square'])
  tasks = [{'id': t['id'], 'data': {'photo': f'{image_server}/{t["data"]["image"]}'}}
           for t in (disc_task, square_task)]

  def labels_predicted(config):
    response = requests.post(backend.url + '/predict', timeout=60, json={
        'tasks': tasks, 'project': 7, 'label_config': config})
    return [{r['value']['rectanglelabels'][0] for r in p['result']}
            for p in response.json()['results']]

  assert labels_predicted(CONFIG)[1] >= {'square'}
  config = CONFIG.replace('<Label value="disc"/><Label value="square"/>',
                          '<Label value="round thing" predicted_values="disc"/>')
  on_disc, on_square = labels_predicted(config)
  assert on_disc == {'round thing'}
  assert 'square' not in on_square and on_square <= {'round thing'}


def test_the_store_resolves_only_published_artifacts(model_dir):
  from backend.errors import BackendError
  from backend.store import ModelStore
  store = ModelStore(model_dir)
  assert store.artifact(7, 'latest', 'labels.txt') == model_dir / 'projects/7/versions/v1/labels.txt'
  for version, filename in (('latest', '../../../base/labels.txt'), ('latest', 'ckpt.index'),
                            ('../../../base', 'labels.txt'), ('v1', 'labels.txt'),
                            ('fewshot-ssd-v1/..', 'labels.txt')):
    with pytest.raises(BackendError) as raised:
      store.artifact(7, version, filename)
    assert raised.value.status == 404


def test_links_planted_in_the_model_dir_are_never_served(model_dir, tmp_path):
  from backend.errors import BackendError
  from backend.store import ModelStore
  secret = tmp_path / 'secret.txt'
  secret.write_text('not for download\n')
  versions = model_dir / 'projects/8/versions'
  shutil.copytree(model_dir / 'projects/7/versions/v1', versions / 'v1')
  (versions / 'v1' / 'report.png').unlink(missing_ok=True)
  (versions / 'v1' / 'report.png').symlink_to(secret)
  (versions / 'v2').symlink_to(versions / 'v1', target_is_directory=True)
  store = ModelStore(model_dir)
  assert [v.name for v in store.versions(8)] == ['fewshot-ssd-v1']  # the linked v2 is no version
  with pytest.raises(BackendError) as raised:
    store.artifact(8, 'latest', 'report.png')
  assert raised.value.status == 404
  assert store.artifact(8, 'latest', 'labels.txt').read_text() == 'disc\nsquare\n'


def test_exif_rotated_images_get_boxes_in_the_upright_image(backend, shapes_dataset, image_server):
  """A phone photo stored sideways with an EXIF orientation: percent of the image as shown."""
  import numpy as np
  from PIL import Image
  from tests.synthetic import save_jpeg
  tasks_file = json.loads((shapes_dataset / 'tasks.json').read_text())
  task = next(t for t in tasks_file if t['meta']['split'] == 'test')
  upright = np.asarray(Image.open(shapes_dataset / task['data']['image']))
  (shapes_dataset / 'rotated').mkdir(exist_ok=True)
  # Stored turned 90° counter-clockwise; orientation 6 says "turn clockwise to view".
  save_jpeg(np.ascontiguousarray(np.rot90(upright)), shapes_dataset / 'rotated' / 'phone.jpg',
            orientation=6)
  response = requests.post(backend.url + '/predict', timeout=60, json={
      'tasks': [{'id': 5, 'data': {'photo': f'{image_server}/rotated/phone.jpg'}}],
      'project': 7, 'label_config': CONFIG})
  (prediction,) = response.json()['results']
  best = max(prediction['result'], key=lambda r: r['score'])
  assert (best['original_width'], best['original_height']) == (320, 240)
  value, truth = best['value'], task['annotations'][0]['result'][0]['value']
  assert iou_xyxy((value['x'], value['y'], value['x'] + value['width'], value['y'] + value['height']),
                  (truth['x'], truth['y'], truth['x'] + truth['width'],
                   truth['y'] + truth['height'])) >= 0.5


def test_bombs_and_broken_images_get_empty_predictions_and_a_logged_reason(backend, shapes_dataset,
                                                                          image_server):
  from PIL import Image
  bad = shapes_dataset / 'bad'
  bad.mkdir(exist_ok=True)
  # 225 megapixels decoded from a few kilobytes: refused before decoding.
  Image.new('1', (15000, 15000)).save(bad / 'bomb.png')
  good = (shapes_dataset / 'images' / 'test-2-0.jpg').read_bytes()
  (bad / 'truncated.jpg').write_bytes(good[:len(good) // 3])
  (bad / 'text.jpg').write_text('not an image')
  tasks = [{'id': 50 + i, 'data': {'photo': f'{image_server}/bad/{name}'}}
           for i, name in enumerate(('bomb.png', 'truncated.jpg', 'text.jpg'))]
  # Nothing listens on this port: connection refused.
  tasks.append({'id': 58, 'data': {'photo': f'http://127.0.0.1:{free_port()}/gone.jpg'}})
  tasks.append({'id': 59, 'data': {'photo': 's3://bucket/photo.jpg'}})  # no LABEL_STUDIO_URL
  tasks.append({'id': 60, 'data': {'photo': f'{image_server}/images/test-2-0.jpg'}})
  response = requests.post(backend.url + '/predict', timeout=60, json={
      'tasks': tasks, 'project': 7, 'label_config': CONFIG})
  assert response.status_code == 200, response.text
  results = response.json()['results']
  assert [r['result'] for r in results[:5]] == [[], [], [], [], []]
  assert results[5]['result'], 'the good image in the same batch is still predicted'
  log = backend.output()
  assert 'bomb.png: too large to decode safely' in log
  assert 'text.jpg: not a readable image' in log
  assert 'Task 58: no prediction, image unreadable' in log and 'gone.jpg: unreachable' in log
  assert 'Task 59: no prediction' in log and 'LABEL_STUDIO_URL is not set' in log


@pytest.mark.parametrize('method, path, body, status, message', [
    ('post', '/predict', b'{"tasks": [', 400, 'JSON object'),
    ('post', '/predict', {'tasks': 'x', 'project': 7, 'label_config': CONFIG}, 400, 'list of task'),
    ('post', '/predict', {'tasks': [], 'label_config': CONFIG}, 400, 'project'),
    ('post', '/predict', {'tasks': [], 'project': 'abc', 'label_config': CONFIG}, 400, 'project id'),
    ('post', '/predict', {'tasks': [{'id': 1, 'data': {}}], 'project': 7,
                          'label_config': '<View><Text name="t" value="$t"/></View>'}, 422,
     'RectangleLabels'),
    ('post', '/predict', {'tasks': [], 'project': 7, 'label_config': '<View'}, 422, 'parsed'),
    ('post', '/setup', {}, 400, 'project'),
    ('post', '/webhook', {'project': {}}, 400, 'action'),
    ('get', '/nowhere', None, 404, 'Not Found'),
    ('get', '/artifacts/7/latest/ckpt.index', None, 404, 'no artifact'),
    ('get', '/artifacts/7/latest/..%2F..%2F..%2Fbase%2Flabels.txt', None, 404, 'Not Found'),
    ('get', '/artifacts/7/..%2F..%2Fbase/labels.txt', None, 404, 'Not Found'),
    ('get', '/artifacts/7/v1/labels.txt', None, 404, "no published version 'v1'"),
    ('get', '/artifacts/7/..../labels.txt', None, 404, 'no published version'),
    ('get', '/artifacts/7/fewshot-ssd-v9/model.tflite', None, 404, 'no published version'),
    ('get', '/artifacts/x/latest/model.tflite', None, 400, 'project id'),
])
def test_bad_requests_get_json_errors(backend, method, path, body, status, message):
  kwargs = {'data': body} if isinstance(body, bytes) else {'json': body}
  response = getattr(requests, method)(backend.url + path, timeout=10,
                                       headers={'Content-Type': 'application/json'}, **kwargs)
  assert response.status_code == status
  assert response.headers['Content-Type'] == 'application/json'
  assert message in response.json()['error']


def test_a_failed_training_is_visible_and_the_current_version_keeps_serving(backend):
  # This backend has no LABEL_STUDIO_URL: the job must fail, clearly, and change nothing.
  response = requests.post(backend.url + '/webhook', json={'action': 'START_TRAINING',
                                                           'project': {'id': 7, 'title': 'x'}})
  assert response.status_code == 200 and response.json()['training'] == 'queued'
  status = poll(lambda: requests.get(backend.url + '/train/status', params={'project': 7}).json(),
                lambda s: s['state'] == 'failed', 30)
  assert status['state'] == 'failed' and 'LABEL_STUDIO_URL' in status['last_error']
  assert status['current_version'] == 'fewshot-ssd-v1'
  assert requests.post(backend.url + '/setup', json={'project': 7}).json() == {
      'model_version': 'fewshot-ssd-v1'}


def test_annotation_events_are_acknowledged_at_once(backend):
  event = {'action': 'ANNOTATION_CREATED', 'annotation': {'id': 1, 'task': 2, 'project': 9,
                                                          'result': []},
           'task': {'id': 2}, 'project': {'id': 9}}
  response = requests.post(backend.url + '/webhook', json=event, timeout=1)
  assert response.status_code == 200
  assert response.json()['training'].startswith('counted 1/')


def test_versions_list_the_base_and_published_versions(backend):
  response = requests.get(backend.url + '/versions', json={'project': '7.1700000000'})
  assert response.json() == {'versions': ['fewshot-ssd-base', 'fewshot-ssd-v1']}


def test_artifacts_download_with_their_sha256(backend, trained_run):
  listing = requests.get(backend.url + '/artifacts/7').json()
  (version,) = listing['versions']
  assert version['model_version'] == 'fewshot-ssd-v1'
  files = {f['name']: f for f in version['files']}
  assert {'model.tflite', 'model_int8.tflite', 'labels.txt', 'metrics.json'} <= set(files)
  for alias in ('fewshot-ssd-v1', 'latest'):
    response = requests.get(f'{backend.url}/artifacts/7/{alias}/model_int8.tflite')
    assert response.status_code == 200
    assert response.content == (trained_run / 'model_int8.tflite').read_bytes()
    import hashlib
    digest = hashlib.sha256(response.content).hexdigest()
    assert response.headers['X-Content-SHA256'] == digest == files['model_int8.tflite']['sha256']


def test_basic_auth_guards_every_route_but_health_and_logs_no_credential(model_dir):
  import base64
  server = Backend(model_dir, BASIC_AUTH_USER='ls', BASIC_AUTH_PASS='s3cret-pass')
  try:
    # The container's health check has no credentials: /health answers, and says nothing more.
    health = requests.get(server.url + '/health')
    assert health.status_code == 200 and set(health.json()) == {'status', 'model_class'}
    dockerfile = (REPO / 'Dockerfile').read_text()
    check = json.loads(dockerfile.split('HEALTHCHECK', 1)[1].split('CMD', 1)[1].splitlines()[0])
    assert check[0] == 'python'
    ran = subprocess.run([sys.executable, *check[1:]], env=dict(os.environ, PORT=str(server.port)),
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr[-500:]
    event = {'action': 'PROJECT_UPDATED', 'project': {'id': 7}}
    assert requests.post(server.url + '/webhook', json=event).status_code == 401
    assert requests.get(server.url + '/versions?project=7', auth=('ls', 'wrong')).status_code == 401
    assert requests.get(server.url + '/metrics').status_code == 401
    assert requests.post(server.url + '/webhook', json=event,
                         auth=('ls', 's3cret-pass')).status_code == 200
    # A malformed credential (no colon) must not reach the access log whole.
    malformed = base64.b64encode(b'ls s3cret-pass').decode()
    assert requests.get(server.url + '/metrics', headers={
        'Authorization': f'Basic {malformed}'}).status_code == 401
    time.sleep(0.5)  # the access log is written after the response
    log = server.output()
    assert '/metrics' in log and 's3cret-pass' not in log and malformed not in log
  finally:
    server.stop()


def test_hostile_bodies_get_a_4xx(model_dir):
  from backend.app import create_app
  client = create_app(Settings(model_dir=model_dir, max_request_bytes=100_000)).test_client()
  deep = '[' * 100_000 + ']' * 100_000
  for path in ('/setup', '/predict', '/webhook'):
    reply = client.post(path, data='{"project": 7, "tasks": ' + '[' * 20_000 + ']' * 20_000 + '}',
                        content_type='application/json')
    assert reply.status_code == 400 and 'nested too deeply' in reply.get_json()['error']
    assert client.post(path, data=deep, content_type='application/json').status_code == 413
    assert client.post(path, data='{"project": 7,', content_type='application/json'
                       ).status_code == 400
  reply = client.get('/versions', data='[' * 20_000, content_type='application/json')
  assert reply.status_code == 400


@pytest.mark.parametrize('env, name', [({'PORT': 'http'}, 'PORT'), ({'WORKERS': '0'}, 'WORKERS'),
                                       ({'BASIC_AUTH_USER': 'x'}, 'BASIC_AUTH'),
                                       ({'LABEL_STUDIO_URL': 'localhost:8080'}, 'LABEL_STUDIO_URL'),
                                       ({'SCORE_THRESHOLD': '2'}, 'SCORE_THRESHOLD'),
                                       ({'SCORE_THRESHOLD': 'nan'}, 'SCORE_THRESHOLD'),
                                       ({'TRAIN_DEBOUNCE_S': 'nan'}, 'TRAIN_DEBOUNCE_S'),
                                       ({'LABEL_STUDIO_HOST': 'ls:8080'}, 'LABEL_STUDIO_HOST'),
                                       ({'TRAIN_MODE': 'backbone'}, 'TRAIN_MODE'),
                                       ({'TRAIN_MAX_STEPS': '5'}, 'TRAIN_MAX_STEPS'),
                                       ({'TRAIN_INPUT_SIZE': '64'}, 'TRAIN_INPUT_SIZE'),
                                       ({'TRAIN_INPUT_SIZE': '301'}, 'TRAIN_INPUT_SIZE'),
                                       ({'TRAIN_QAT': 'maybe'}, 'TRAIN_QAT'),
                                       ({'TRAIN_ZOOM_OUT': '2'}, 'TRAIN_ZOOM_OUT'),
                                       ({'TRAIN_MOSAIC': '-0.5'}, 'TRAIN_MOSAIC'),
                                       ({'TRAIN_PRUNE': '0.99'}, 'TRAIN_PRUNE'),
                                       ({'TRAIN_MODE': 'heads', 'TRAIN_QAT': 'true'}, 'TRAIN_QAT'),
                                       ({'TRAIN_QAT': '1', 'TRAIN_PRUNE': '0.5'}, 'not both')])
def test_bad_settings_are_named(env, name):
  with pytest.raises(SettingsError, match=name):
    Settings.from_env(env)


def test_label_studio_host_is_an_alias_of_label_studio_url():
  assert Settings.from_env({'LABEL_STUDIO_HOST': 'http://ls:8080/'}).label_studio_url == 'http://ls:8080'
  both = {'LABEL_STUDIO_URL': 'http://url:8080', 'LABEL_STUDIO_HOST': 'http://host:8080'}
  assert Settings.from_env(both).label_studio_url == 'http://url:8080'


def test_training_settings_reach_the_train_config():
  config = Settings.from_env({'TRAIN_MODE': 'Heads', 'TRAIN_MAX_STEPS': '200',
                             'TRAIN_INPUT_SIZE': '448'}).train_config()
  assert (config.trainable, config.budget.max, config.input.size) == ('heads', 200, 448)
  assert config.budget.steps(50) == 200
  assert not config.compression.active
  assert Settings.from_env({'TRAIN_QAT': 'True'}).train_config().compression.quantization_aware
  assert Settings.from_env({'TRAIN_PRUNE': '0.5'}).train_config().compression.prune_sparsity == 0.5
  assert Settings.from_env({'TRAIN_HOLD_OUT_FROM': '30'}).train_config().early_stopping.min_images == 30
  assert Settings.from_env({}).train_config().early_stopping.min_images == 20
  assert Settings.from_env({}).train_config().int8_tune.tolerance == 0.01
  assert Settings.from_env({'TRAIN_INT8_TAIL': 'false'}).train_config().int8_tune.tolerance is None
  assert Settings.from_env({'TRAIN_HOLD_OUT_FROM': '0'}).train_config().early_stopping.min_images is None
  assert config.views.zoom_out == 0.5  # on by default
  assert Settings.from_env({}).train_config().trainable is None  # chosen from the images
  assert Settings.from_env({'TRAIN_MODE': 'auto'}).train_mode is None
  assert Settings.from_env({'TRAIN_ZOOM_OUT': '0'}).train_config().views.zoom_out == 0
  assert config.views.mosaic == 1.0  # the shrunk views are mosaics by default
  assert Settings.from_env({'TRAIN_MOSAIC': '0'}).train_config().views.mosaic == 0
  for auto in ({}, {'TRAIN_INPUT_SIZE': 'auto'}):  # chosen from the boxes by default
    assert Settings.from_env(auto).train_config().input.size is None


def test_backend_refuses_to_start_on_a_bad_setting(tmp_path):
  environ = dict(os.environ, PORT='not-a-port', MODEL_DIR=str(tmp_path))
  result = subprocess.run([sys.executable, '-m', 'backend'], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'PORT' in result.stderr


@pytest.mark.parametrize('problem, env, message', [
    ('locks', {}, 'is not writable'),
    (None, {'TRAINING_QUEUE': 'redis', 'REDIS_URL': 'redis://127.0.0.1:1/0'},
     'REDIS_URL does not answer'),
])
def test_backend_refuses_to_start_where_training_would_fail_later(base_paths, tmp_path, problem,
                                                                  env, message):
  shutil.copytree(base_paths.base_dir, tmp_path / 'base')
  if problem:
    (tmp_path / problem).write_text('a file where a folder must go')
  environ = dict(os.environ, MODEL_DIR=str(tmp_path), **env)
  result = subprocess.run([sys.executable, '-m', 'backend'], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and message in result.stderr


def test_metrics_count_predictions_and_webhooks(backend):
  before = requests.get(backend.url + '/metrics').json()
  requests.post(backend.url + '/webhook', json={'action': 'TASKS_CREATED', 'project': {'id': 7}})
  requests.post(backend.url + '/predict', json={'tasks': [{'id': 1, 'data': {}}], 'project': 7,
                                                'label_config': CONFIG})
  after = requests.get(backend.url + '/metrics').json()
  assert after['webhooks'] == before['webhooks'] + 1
  assert after['predicted_tasks'] == before['predicted_tasks'] + 1


def test_a_new_version_replaces_the_old_one_in_memory(model_dir, trained_run, shapes_dataset,
                                                      image_server):
  """Publishing v2 (a folder renamed into place) is served without a restart; v1 leaves memory."""
  versions = model_dir / 'projects' / '11' / 'versions'
  shutil.copytree(trained_run, versions / 'v1')
  server = Backend(model_dir)
  try:
    task = {'id': 1, 'data': {'photo': f'{image_server}/images/test-2-0.jpg'}}

    def predict_version():
      response = requests.post(server.url + '/predict', timeout=60, json={
          'tasks': [task], 'project': 11, 'label_config': CONFIG})
      return response.json()['results'][0]['model_version']

    assert predict_version() == 'fewshot-ssd-v1'
    shutil.copytree(trained_run, versions / '.v2.staging')
    (versions / '.v2.staging').rename(versions / 'v2')
    assert predict_version() == 'fewshot-ssd-v2'
    loaded = requests.get(server.url + '/metrics').json()['loaded_models']
    assert loaded == [str(versions / 'v2' / 'model_int8.tflite')]
  finally:
    server.stop()


def test_the_serving_app_never_imports_tensorflow(base_paths, tmp_path):
  """create_app and a /predict with the base leave TensorFlow out: a serving
  worker stays small and starts fast (unless its training thread warms up)."""
  from tests.synthetic import save_jpeg, textured_background
  image = save_jpeg(textured_background(64, 48), tmp_path / 'a.jpg')
  code = f'''
import sys
from backend.app import create_app
from backend.settings import Settings
from pathlib import Path
app = create_app(Settings(model_dir=Path({str(base_paths.model_dir)!r}), train_warm_up=False,
                          local_files_document_root=Path({str(tmp_path)!r})))
assert app.extensions['fewshot']['queue'].warm_up is None
client = app.test_client()
assert client.get('/health').status_code == 200
config = '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image"><Label value="Person"/></RectangleLabels></View>'
reply = client.post('/predict', json={{'tasks': [{{'id': 1, 'data': {{'image': {str(image)!r}}}}}],
                                      'label_config': config, 'project': '3.1'}})
assert reply.status_code == 200, reply.get_data(as_text=True)
assert reply.get_json()['results'][0]['model_version'] == 'fewshot-ssd-base'
assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
'''
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_the_in_process_training_thread_warms_up_as_the_app_starts(base_paths, monkeypatch):
  from backend.app import create_app
  from model import pipeline
  calls = []
  monkeypatch.setattr(pipeline, 'warm_up', lambda: calls.append('warmed up'))
  create_app(Settings(model_dir=base_paths.model_dir))  # TRAIN_WARM_UP defaults to true
  assert poll(lambda: list(calls), lambda seen: seen, 10) == ['warmed up']


def test_a_damaged_model_file_falls_back_to_the_version_before(model_dir, shapes_dataset,
                                                               caplog):
  from backend.app import create_app
  versions = model_dir / 'projects/9/versions'
  for name in ('v1', 'v2', 'v3'):
    shutil.copytree(model_dir / 'projects/7/versions/v1', versions / name)
  for name in ('v2', 'v3'):
    (versions / name / 'model_int8.tflite').write_bytes(b'not a model')
  client = create_app(Settings(model_dir=model_dir,
                               local_files_document_root=shapes_dataset)).test_client()
  image = str(sorted((shapes_dataset / 'images').glob('test-*.jpg'))[0])
  body = {'project': 9, 'label_config': CONFIG, 'tasks': [{'id': 1, 'data': {'photo': image}}]}
  reply = client.post('/predict', json=body)
  assert reply.status_code == 200
  (result,) = reply.get_json()['results']
  assert result['model_version'] == 'fewshot-ssd-v1' and result['result']
  assert 'fewshot-ssd-v3 does not load' in caplog.text
  assert 'fewshot-ssd-v2 does not load' in caplog.text


def test_a_tasks_certainty_is_its_least_sure_detection():
  from backend.predictor import task_certainty
  assert task_certainty([]) == 1.0  # nothing there, not even a weak candidate
  assert task_certainty([0.97, 0.99, 0.95]) == pytest.approx(0.9)  # many confident boxes
  assert task_certainty([0.98, 0.5]) == 0.0  # one box it cannot decide on
  assert task_certainty([0.98, 0.3]) == pytest.approx(0.4)
  ranked = sorted({'empty': [], 'sure': [0.97, 0.99], 'torn': [0.99, 0.45], 'weak': [0.1]}.items(),
                  key=lambda item: task_certainty(item[1]))
  assert [name for name, _ in ranked] == ['torn', 'weak', 'sure', 'empty']


def test_a_detection_becomes_a_region_in_percent_of_the_image_with_the_configs_names():
  from backend.label_config import parse_label_config
  from backend.predictor import to_region
  from model.boxes import Detection
  target = parse_label_config('<View><Image name="img" value="$photo"/><RectangleLabels '
                              'name="box" toName="img"><Label value="cat"/></RectangleLabels></View>')
  region = to_region(Detection('Cat', 0.87654, (40.0, 30.0, 120.0, 90.0)), target, 'cat', 400, 300)
  assert (region['from_name'], region['to_name'], region['type']) == ('box', 'img',
                                                                      'rectanglelabels')
  assert (region['original_width'], region['original_height']) == (400, 300)
  assert region['value'] == {'x': 10.0, 'y': 10.0, 'width': 20.0, 'height': 20.0, 'rotation': 0,
                             'rectanglelabels': ['cat']}
  assert region['score'] == 0.8765
  assert region['id'] != to_region(Detection('Cat', 0.5, (0, 0, 1, 1)), target, 'cat', 4, 3)['id']


def test_a_large_batch_holds_a_window_of_decoded_images_not_all_of_them(model_dir, shapes_dataset):
  """Downloads outpace the detector; waiting images are bounded by the window (memory stays
  flat with the batch's size), and every task is still predicted, in order."""
  import weakref
  from backend.images import ImageFetcher
  from backend.label_config import parse_label_config
  from backend.predictor import Predictor
  from backend.store import ModelStore

  settings = Settings(model_dir=model_dir, local_files_document_root=shapes_dataset)
  live, most = set(), [0]

  class CountingFetcher(ImageFetcher):
    def load(self, url, task_id=None):
      image = super().load(url, task_id)
      live.add(id(image))
      most[0] = max(most[0], len(live))
      weakref.finalize(image, live.discard, id(image))
      return image

  predictor = Predictor(ModelStore(model_dir), CountingFetcher(settings), 0.25,
                        fetch_concurrency=2)
  images = sorted(shapes_dataset.glob('images/*.jpg'))
  tasks = [{'id': i, 'data': {'photo': str(images[i % len(images)])}}
           for i in range(80)]
  version, outcomes = predictor.predict_tasks(7, tasks, parse_label_config(CONFIG))
  assert version == 'fewshot-ssd-v1'
  assert all(isinstance(o, dict) for o in outcomes), outcomes
  # Waiting in the window, in a finished wait's set, and in the detector's hands; not 80.
  assert most[0] <= 2 * predictor.window + 2, most[0]


def test_predict_leaves_out_tasks_being_completed_and_those_past_its_cap(model_dir, shapes_dataset):
  """Each left-out task gets an entry without "result" (Label Studio stores nothing for it)."""
  from backend.images import ImageFetcher
  from backend.label_config import parse_label_config
  from backend.predictor import Predictor
  from backend.store import ModelStore

  settings = Settings(model_dir=model_dir, local_files_document_root=shapes_dataset)
  predictor = Predictor(ModelStore(model_dir), ImageFetcher(settings), 0.25, fetch_concurrency=2)
  image = str(sorted(shapes_dataset.glob('images/*.jpg'))[0])
  tasks = [{'id': i, 'data': {'photo': image}} for i in range(8)]
  results = predictor.predict(7, tasks, parse_label_config(CONFIG), completing={1, 2}, at_most=3)
  answered = [i for i, r in enumerate(results) if 'result' in r]
  assert answered == [0, 3, 4]
  assert all(r == {'model_version': 'fewshot-ssd-v1', 'pending': True}
             for i, r in enumerate(results) if i not in answered)


def test_a_version_shows_each_label_from_its_own_threshold_unless_one_is_set(
    model_dir, shapes_dataset, tmp_path):
  """Without SCORE_THRESHOLD each label's boxes show from its version's threshold
  (run.json); with it, from that one for every label."""
  from backend.images import ImageFetcher
  from backend.label_config import parse_label_config
  from backend.predictor import Predictor
  from backend.store import ModelStore
  from model.run_folder import RUN_INFO_FILE, SCORE_THRESHOLDS_KEY

  directory = tmp_path / 'models'
  shutil.copytree(model_dir / 'projects' / '7' / 'versions' / 'v1',
                  directory / 'projects' / '9' / 'versions' / 'v1')
  settings = Settings(model_dir=directory, local_files_document_root=shapes_dataset)
  tasks = [{'id': i, 'data': {'photo': str(path)}}
           for i, path in enumerate(sorted(shapes_dataset.glob('images/test-*.jpg'))[:4])]

  def shown(score_threshold):
    predictor = Predictor(ModelStore(directory), ImageFetcher(settings), score_threshold,
                          fetch_concurrency=2)
    _, outcomes = predictor.predict_tasks(9, tasks, parse_label_config(CONFIG))
    return sorted((r['value']['rectanglelabels'][0], r['score'])
                  for outcome in outcomes for r in outcome['result'])

  everything = shown(0.05)
  discs = sorted({score for label, score in everything if label == 'disc'})
  assert len(discs) >= 2, everything
  middle = len(discs) // 2  # between two (rounded) disc scores: some shown, some not
  cut = (discs[middle - 1] + discs[middle]) / 2
  run_info = directory / 'projects' / '9' / 'versions' / 'v1' / RUN_INFO_FILE
  info = json.loads(run_info.read_text())
  run_info.write_text(json.dumps({**info, SCORE_THRESHOLDS_KEY: {'disc': cut, 'square': 0.05}}))
  assert shown(None) == [(label, score) for label, score in everything
                         if label == 'square' or score >= cut]
  assert shown(0.05) == everything  # SCORE_THRESHOLD set: every label's, the version's ignored
