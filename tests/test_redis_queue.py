"""The Redis + RQ training queue's bookkeeping against a real redis-server, as several processes see it.

Training itself through RQ workers is in tests/test_scale_out.py.
"""

import json
import time

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from backend.redis_queue import QUEUE_NAME, RedisTrainingQueue, debounced_trigger
from backend.settings import Settings


@pytest.fixture
def connection(redis_url):
  client = redis.Redis.from_url(redis_url)
  client.flushdb()
  return client


def _queue(redis_url, **settings) -> RedisTrainingQueue:
  """One serving process's view (each gets its own connection)."""
  return RedisTrainingQueue(Settings(training_queue='redis', redis_url=redis_url, **settings))


def _pending_jobs(connection) -> list[str]:
  return Queue(QUEUE_NAME, connection=connection).get_job_ids()


def test_triggers_from_several_processes_make_one_job(redis_url, connection):
  first, second = _queue(redis_url), _queue(redis_url)
  assert first.trigger(3, 'START_TRAINING') == 'queued'
  assert second.trigger(3, 'START_TRAINING') == 'coalesced'
  assert first.trigger(3, 'START_TRAINING') == 'coalesced'
  assert second.trigger(4, 'START_TRAINING') == 'queued'
  jobs = _pending_jobs(connection)
  assert len(jobs) == 2
  assert second.status_of(3)['state'] == 'queued'


def test_triggers_during_a_run_make_exactly_one_follow_up(redis_url, connection):
  first, second = _queue(redis_url), _queue(redis_url)
  first.trigger(5, 'START_TRAINING')
  # A worker takes the job: it holds the project lock and clears the pending mark.
  connection.set('fewshot:5:lock', 'worker-token', ex=60)
  connection.delete('fewshot:5:pending')
  assert second.trigger(5, 'ANNOTATION_CREATED events') == 'follow-up'
  assert first.trigger(5, 'START_TRAINING') == 'coalesced'
  assert len(_pending_jobs(connection)) == 2  # the running one is still listed until taken
  assert len(set(_pending_jobs(connection))) == 2


def test_a_pending_job_lost_with_its_worker_is_replaced(redis_url, connection):
  queue = _queue(redis_url)
  queue.trigger(6, 'START_TRAINING')
  lost = connection.get('fewshot:6:pending').decode()
  Job.fetch(lost, connection=connection).delete()  # what a killed worker leaves: no live job
  assert queue.trigger(6, 'START_TRAINING') == 'queued'
  replacement = connection.get('fewshot:6:pending').decode()
  assert replacement != lost and _pending_jobs(connection) == [replacement]


def test_a_run_whose_worker_died_shows_as_failed(redis_url, connection):
  queue = _queue(redis_url)
  connection.set('fewshot:8:status', json.dumps({
      'state': 'running', 'step': 40, 'total_steps': 300, 'loss': 0.5, 'eta_s': 9,
      'images_per_s': 30, 'model_version': None, 'last_error': None, 'started_at': 1.0,
      'finished_at': None, 'runs': 0, 'worker': 'host:123'}))
  connection.set('fewshot:8:lock', 'x', ex=60)
  assert queue.status_of(8)['state'] == 'running'
  connection.delete('fewshot:8:lock')  # its TTL ran out: nobody renewed it
  status = queue.status_of(8)
  assert status['state'] == 'failed' and 'host:123' in status['last_error']


def test_annotation_events_are_counted_then_one_delayed_trigger_fires(redis_url, connection,
                                                                      monkeypatch):
  monkeypatch.setenv('REDIS_URL', redis_url)
  queue = _queue(redis_url, train_every_n_annotations=2, train_debounce_s=30)
  assert queue.annotation_event(9, 'ANNOTATION_CREATED') == 'counted 1/2'
  assert 'training in 30 s' in queue.annotation_event(9, 'ANNOTATION_CREATED')
  scheduled = ScheduledJobRegistry(QUEUE_NAME, connection=connection)
  assert len(scheduled.get_job_ids()) == 1
  first_delayed = scheduled.get_job_ids()[0]
  # One event, fewer than N, while the trigger waits: it pushes the trigger back.
  assert 'training in 30 s' in queue.annotation_event(9, 'ANNOTATION_UPDATED')
  later_delayed = connection.get('fewshot:9:debounce').decode()
  assert len(scheduled.get_job_ids()) == 2
  assert later_delayed != first_delayed
  # The scheduler runs both when due: the replaced one does nothing, the last one triggers.
  assert debounced_trigger(9, first_delayed, 'events') == 'replaced by a later event'
  assert _pending_jobs(connection) == []
  assert debounced_trigger(9, later_delayed, 'events') == 'queued'
  assert len(_pending_jobs(connection)) == 1


def test_events_after_the_wait_count_afresh(redis_url, connection, monkeypatch):
  monkeypatch.setenv('REDIS_URL', redis_url)
  queue = _queue(redis_url, train_every_n_annotations=2, train_debounce_s=0.2)
  queue.annotation_event(10, 'ANNOTATION_CREATED')
  assert queue.annotation_event(10, 'ANNOTATION_CREATED').startswith('training in 0.2 s')
  delayed = connection.get('fewshot:10:debounce').decode()
  time.sleep(0.4)  # the wait is over; the scheduler may come late: the trigger still fires
  assert connection.get('fewshot:10:debounce') is None
  assert queue.annotation_event(10, 'ANNOTATION_CREATED') == 'counted 1/2'
  assert debounced_trigger(10, delayed, 'events') == 'queued'


def test_a_job_ends_at_once_when_nothing_changed_since_the_last_run_read_the_tasks(
    redis_url, connection, monkeypatch, tmp_path):
  from backend.redis_queue import run_training_job
  monkeypatch.setenv('REDIS_URL', redis_url)
  monkeypatch.setenv('MODEL_DIR', str(tmp_path))
  runs = []
  monkeypatch.setattr('backend.training.train_project',
                      lambda settings, store, fetcher, project, progress, published:
                      runs.append(project) or f'fewshot-ssd-v{len(runs)}')
  queue = _queue(redis_url)
  queue.trigger(6, 'ANNOTATION_CREATED events', changed_at=time.time() - 60)
  assert run_training_job(6, 'job-a') == 'fewshot-ssd-v1'
  # The debounced trigger of edits made before that run read the tasks: nothing to do.
  queue.trigger(6, 'ANNOTATION_CREATED events', changed_at=time.time() - 30)
  assert run_training_job(6, 'job-b') is None and runs == [6]
  # A new press of Start Training, or a later edit, trains again.
  queue.trigger(6, 'START_TRAINING')
  assert run_training_job(6, 'job-c') == 'fewshot-ssd-v2' and runs == [6, 6]


def test_a_project_label_studio_does_not_know_leaves_only_its_error_for_an_hour(redis_url, connection, monkeypatch,
                                                             tmp_path):
  import pytest
  from backend.errors import BackendError
  from backend.redis_queue import run_training_job
  monkeypatch.setenv('REDIS_URL', redis_url)
  monkeypatch.setenv('MODEL_DIR', str(tmp_path))

  def unknown(settings, store, fetcher, project, progress, published):
    raise BackendError(404, f'Label Studio answered HTTP 404 for project {project}')
  monkeypatch.setattr('backend.training.train_project', unknown)
  _queue(redis_url).trigger(99, 'START_TRAINING')
  with pytest.raises(BackendError):
    run_training_job(99, 'job-x')
  assert connection.keys('fewshot:99:*') == [b'fewshot:99:status']
  assert 0 < connection.ttl('fewshot:99:status') <= 3600
  assert 'HTTP 404 for project 99' in _queue(redis_url).status_of(99)['last_error']


def _started_registry_expiries(seconds: float) -> list[float]:
  """An RQ job: how far ahead the started-job registry's expiry of this job lies, at
  its start and after `seconds`."""
  from rq import get_current_job
  from rq.registry import StartedJobRegistry
  job = get_current_job()
  key = StartedJobRegistry(QUEUE_NAME, connection=job.connection).key

  def expiry():
    return max(score for member, score in job.connection.zrange(key, 0, -1, withscores=True)
               if member.decode().startswith(job.id))
  first = expiry()
  time.sleep(seconds)
  return [first - time.time(), expiry() - time.time(), expiry() - first]


def test_a_warm_worker_keeps_its_job_alive_with_short_heartbeats(redis_url, connection):
  """Jobs run in the worker's own process, yet a killed worker's job expires as soon as
  under RQ's forking worker: within a heartbeat's TTL, renewed while the job runs."""
  from backend.redis_queue import WarmWorker
  queue = Queue(QUEUE_NAME, connection=connection)
  job = queue.enqueue(_started_registry_expiries, 2.5, job_timeout=3600)
  worker = WarmWorker([queue], connection=connection, job_monitoring_interval=1)
  worker.work(burst=True)
  ahead_at_start, ahead_later, moved = Job.fetch(job.id, connection=connection).return_value()
  assert ahead_at_start < 90 and ahead_later < 90  # not the job's timeout (3600 s) + 60
  assert moved >= 1.5  # renewed while the job ran
