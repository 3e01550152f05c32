"""Scale-out for real: redis-server, two backend processes, two RQ training workers, a real
Label Studio; a worker is killed mid-job.

Triggers fired at both backends during one run coalesce into one follow-up;
the killed run publishes nothing; the follow-up, on the other worker, waits for
the project's lock to run out and publishes exactly one version, which both
backends serve without a restart; a worker then refreshes the unlabeled tasks'
predictions in Label Studio.
"""

from __future__ import annotations

import shutil

import requests

from backend.store import ARTIFACTS
from model.run_folder import read_labels_file
from model.tflite_detector import TFLiteDetector
from model.images import load_image
from tests.conftest import SMALL_INPUT, Backend, poll
from tests.label_studio import DISC_CONFIG, annotate, make_disc_project
from tests.redis_servers import TrainingWorker

LABELED = 8


def _start_training(backend: Backend, project: int) -> str:
  response = requests.post(backend.url + '/webhook', timeout=5, json={
      'action': 'START_TRAINING', 'project': {'id': project}})
  assert response.status_code == 200, response.text
  return response.json()['training']


def _predict(backend: Backend, project, task: dict) -> dict:
  response = requests.post(backend.url + '/predict', timeout=60, json={
      'tasks': [task], 'project': f'{project.id}.1700000000', 'label_config': DISC_CONFIG})
  assert response.status_code == 200, response.text
  return response.json()['results'][0]


def _wait_for(condition, seconds: float, what: str):
  value = poll(condition, bool, seconds, every=0.5)
  assert value, f'timed out waiting for {what}'
  return value


def test_two_backends_and_two_workers_on_redis_survive_a_killed_worker(
    label_studio, redis_url, base_paths, tmp_path):
  import redis
  redis.Redis.from_url(redis_url).flushdb()
  project = make_disc_project(label_studio, tmp_path, LABELED + 2, seed=21, title='scale-out')
  annotate(label_studio, project, project.tasks[:LABELED])
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  env = {'MODEL_DIR': str(model_dir), 'LABEL_STUDIO_URL': label_studio.url,
         'LABEL_STUDIO_API_KEY': label_studio.token, 'TRAINING_QUEUE': 'redis',
         'REDIS_URL': redis_url, 'TRAINING_LOCK_TTL_S': '4', 'TRAIN_EVERY_N_ANNOTATIONS': '0',
         # a third of the budget, at a small input: discs are easy, the queue is the test
         'TRAIN_MAX_STEPS': '120', 'TRAIN_INPUT_SIZE': str(SMALL_INPUT)}
  backends = [Backend(model_dir, WORKERS='2', **env) for _ in range(2)]
  workers = [TrainingWorker(tmp_path / f'worker-{i}.log', env) for i in range(2)]
  unlabeled = project.tasks[LABELED]
  try:
    assert _start_training(backends[0], project.id) == 'queued'
    assert _start_training(backends[1], project.id) == 'coalesced'

    def running():
      status = requests.get(backends[1].url + '/train/status', params={'project': project.id}).json()
      return status if status['state'] == 'running' and status['step'] >= 1 else None
    status = _wait_for(running, 300, 'the first run to start training')
    # Both backends see one run; triggers during it make exactly one follow-up.
    assert _start_training(backends[0], project.id) == 'follow-up'
    assert _start_training(backends[1], project.id) == 'coalesced'
    assert _predict(backends[0], project, unlabeled)['model_version'] == 'fewshot-ssd-base'

    pid = int(status['worker'].rsplit(':', 1)[1])
    victim = next(w for w in workers if w.runs(pid))
    victim.kill()
    survivor = next(w for w in workers if w is not victim)

    def published():
      setup = [requests.post(b.url + '/setup', json={'project': project.id}).json()['model_version']
               for b in backends]
      assert set(setup) <= {'fewshot-ssd-base', 'fewshot-ssd-v1'}, setup
      return setup == ['fewshot-ssd-v1'] * 2
    _wait_for(published, 400, f'v1 from the follow-up: {survivor.log_path.read_text()[-3000:]}')
    _wait_for(lambda: requests.get(backends[0].url + '/train/status', params={
        'project': project.id}).json()['state'] == 'idle', 60, 'the follow-up to finish')
    # A worker then refreshed the unlabeled tasks' predictions in Label Studio.
    _wait_for(lambda: requests.get(backends[1].url + '/train/status', params={
        'project': project.id}).json()['refresh']['state'] == 'done', 120, 'the refresh')
    for task in project.tasks[LABELED:]:
      (stored,) = label_studio.call('GET', f'/api/predictions/?task={task["id"]}')
      assert stored['model_version'] == 'fewshot-ssd-v1'

    # Exactly one version, complete, and no half-written iteration left behind.
    versions_dir = model_dir / 'projects' / str(project.id) / 'versions'
    assert sorted(p.name for p in versions_dir.iterdir()) == ['v1']
    assert all((versions_dir / 'v1' / name).is_file() for name in ARTIFACTS)
    labels = read_labels_file(versions_dir / 'v1' / 'labels.txt')
    image = load_image(project.images / project.original_name(unlabeled))
    for name in ('model.tflite', 'model_int8.tflite'):
      found = TFLiteDetector(versions_dir / 'v1' / name, labels).detect(image)
      assert found and found[0].label == 'disc', name
    # Both serving processes moved to v1 without a restart.
    for backend in backends:
      prediction = _predict(backend, project, unlabeled)
      assert prediction['model_version'] == 'fewshot-ssd-v1'
      assert prediction['result'] and prediction['result'][0]['value']['rectanglelabels'] == ['disc']
    assert requests.get(backends[1].url + '/versions', params={'project': project.id}).json() == {
        'versions': ['fewshot-ssd-base', 'fewshot-ssd-v1']}
  finally:
    for worker in workers:
      worker.stop()
    for backend in backends:
      backend.stop()
