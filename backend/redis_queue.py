"""The training queue on Redis + RQ (TRAINING_QUEUE=redis): the in-process queue's guarantees
across processes and machines.

Serving processes (any number of gunicorn workers and replicas) only write to
Redis; `python -m backend worker` processes run the jobs, with MODEL_DIR on a
volume they all share. Per project, Redis holds:

  fewshot:<project>:pending   the id of the job that will train next. A trigger
                              enqueues a job only when no live job is pending, so
                              any number of triggers, from any process, make one.
                              The job clears it once it holds the lock: triggers
                              during a run make exactly one follow-up.
  fewshot:<project>:lock      held by the worker that trains the project, with a
                              TTL its heartbeat renews: one training per project
                              at a time, and a killed worker's hold runs out.
  fewshot:<project>:status    /train/status as JSON, readable by every process.
  fewshot:<project>:events    annotation events counted towards the next trigger.
  fewshot:<project>:debounce  the id of the delayed trigger that may fire, for as
                              long as it waits; an older one finds itself replaced
                              and does nothing.
  fewshot:<project>:changed   when the newest change behind any trigger happened
                              (the last event of a debounced burst, or the trigger).
  fewshot:<project>:fetched   when the last job started, and so read the tasks: a
                              job finding no change after it ends at once.

Publishing stays the rename of a finished run folder (`model.run_folder`), so
every replica serves the newest version from the shared disk without a restart.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import redis
from rq import Queue, SimpleWorker
from rq.worker import BaseWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.errors import BackendError
from backend.settings import Settings
from backend.training import TrainingStatus

log = logging.getLogger(__name__)
QUEUE_NAME = 'fewshot-training'
UNKNOWN_PROJECT_TTL_S = 3600
_LIVE = (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED,
         JobStatus.CREATED)

# Raise a time stamp, never lower it.
_RAISE = '''
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
return 0'''

# Replace the pending job id only if it is still the one we found dead.
_REPLACE_PENDING = '''
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2]) return 1
end
return 0'''


def _key(project: int, name: str) -> str:
  return f'fewshot:{project}:{name}'


class RedisTrainingQueue:
  """What serving processes use: trigger, count events, read status (no training here)."""

  def __init__(self, settings: Settings, connection: redis.Redis | None = None):
    self.settings = settings
    self.redis = connection or redis.Redis.from_url(settings.redis_url)
    self.queue = Queue(QUEUE_NAME, connection=self.redis)
    self._replace_pending = self.redis.register_script(_REPLACE_PENDING)
    self._raise = self.redis.register_script(_RAISE)

  def trigger(self, project: int, reason: str, changed_at: float | None = None) -> str:
    """Asks for a training run; returns 'queued', 'follow-up' or 'coalesced'.

    `changed_at`: when the change behind it happened (now when None); a job
    runs only if some change came after the last job started.
    """
    self._raise(keys=[_key(project, 'changed')],
                args=[repr(time.time() if changed_at is None else changed_at)])
    outcome = self._request_run(project)
    log.info('Project %s: training %s (%s)', project, outcome, reason)
    return outcome

  def _request_run(self, project: int) -> str:
    """Enqueues a training job unless a live one is pending; safe from any process."""
    pending_key = _key(project, 'pending')
    job_id = f'train-{project}-{uuid.uuid4().hex[:12]}'
    running = bool(self.redis.exists(_key(project, 'lock')))
    if self.redis.set(pending_key, job_id, nx=True):
      self._enqueue(project, job_id)
      return 'follow-up' if running else 'queued'
    found = self.redis.get(pending_key)
    if found is not None and _job_is_live(self.redis, found.decode()):
      return 'coalesced'
    # The pending job died before it started (its worker was killed): replace it.
    if self._replace_pending(keys=[pending_key], args=[found or b'', job_id]):
      self._enqueue(project, job_id)
      return 'queued'
    return 'coalesced'

  def _enqueue(self, project: int, job_id: str) -> None:
    self.queue.enqueue_call(run_training_job, args=(project, job_id), job_id=job_id,
                            timeout=self.settings.training_timeout_s, result_ttl=3600,
                            failure_ttl=24 * 3600, description=f'train project {project}')

  def annotation_event(self, project: int, action: str) -> str:
    """Counts an event; every N of them schedule a trigger after the debounce time.

    An event while a delayed trigger waits replaces it with a later one.
    """
    every = max(1, self.settings.train_every_n_annotations)
    count = self.redis.incr(_key(project, 'events'))
    waiting = self.redis.exists(_key(project, 'debounce'))
    if count < every and not waiting:
      return f'counted {count}/{every}'
    self.redis.decrby(_key(project, 'events'), count)
    delayed_id = f'debounce-{project}-{uuid.uuid4().hex[:12]}'
    # Setting the id first makes any delayed trigger still waiting a no-op. The
    # key lives as long as the wait: once it is gone, events count afresh.
    self.redis.set(_key(project, 'debounce'), delayed_id,
                   px=max(1, int(self.settings.train_debounce_s * 1000)))
    self.queue.enqueue_in(datetime.timedelta(seconds=self.settings.train_debounce_s),
                          debounced_trigger, project, delayed_id, f'{action} events',
                          time.time(), job_id=delayed_id, result_ttl=0)
    return f'training in {self.settings.train_debounce_s:g} s unless more events arrive'

  def status_of(self, project: int) -> dict:
    raw = self.redis.get(_key(project, 'status'))
    status = json.loads(raw) if raw else TrainingStatus().to_dict()
    if status['state'] == 'running' and not self.redis.exists(_key(project, 'lock')):
      # The worker died without a word: its lock ran out.
      status['state'] = 'failed'
      status['last_error'] = f'the worker ({status.get("worker")}) stopped during training'
    if status['state'] in ('idle', 'failed') and self.redis.exists(_key(project, 'pending')):
      status['state'] = 'queued'
    return status


def _job_is_live(connection: redis.Redis, job_id: str) -> bool:
  try:
    return Job.fetch(job_id, connection=connection).get_status(refresh=True) in _LIVE
  except NoSuchJobError:
    return False


def debounced_trigger(project: int, delayed_id: str, reason: str,
                      changed_at: float | None = None) -> str:
  """RQ job: the trigger after the debounce time, unless newer events replaced it."""
  queue = RedisTrainingQueue(Settings.from_env())
  current = queue.redis.get(_key(project, 'debounce'))
  # None: the wait ran out before the scheduler got here, and no event came since.
  if current is not None and current.decode() != delayed_id:
    return 'replaced by a later event'
  return queue.trigger(project, reason, changed_at)


class _Heartbeat(threading.Thread):
  """Renews the project lock while the job runs; a dead process stops renewing it."""

  def __init__(self, lock, ttl_s: float):
    super().__init__(name='lock-heartbeat', daemon=True)
    self.lock, self.ttl_s = lock, ttl_s
    self.stopped = threading.Event()

  def run(self):
    while not self.stopped.wait(self.ttl_s / 3):
      try:
        self.lock.reacquire()
      except redis.exceptions.LockError:
        log.error('Lost the project lock while training')
        return


class _JobStatus:
  """A training job's /train/status in Redis, readable by every process; steps at most once a second."""

  def __init__(self, connection, project: int, job_id: str):
    self.connection, self.key, self.job_id = connection, _key(project, 'status'), job_id
    previous = connection.get(self.key)
    self.status = TrainingStatus(state='running', started_at=time.time(),
                                 runs=json.loads(previous)['runs'] if previous else 0)
    self.worker = f'{socket.gethostname()}:{os.getpid()}'
    self._saved_at = 0.0

  def save(self) -> None:
    self._saved_at = time.monotonic()
    self.connection.set(self.key, json.dumps({**self.status.to_dict(), 'worker': self.worker,
                                              'job': self.job_id}))

  def progress(self, progress) -> None:
    self.status.update(progress)
    if isinstance(progress, str) or time.monotonic() - self._saved_at >= 1.0:
      self.save()


def _hold_project(connection, project: int, settings: Settings):
  """(the project's lock, its heartbeat), once this job holds it.

  Raises:
    TimeoutError: another job held it for TRAINING_TIMEOUT_S.
  """
  lock = connection.lock(_key(project, 'lock'), timeout=settings.training_lock_ttl_s,
                         blocking_timeout=settings.training_timeout_s, thread_local=False)
  if not lock.acquire():
    raise TimeoutError(f'project {project} stayed locked for {settings.training_timeout_s} s')
  heartbeat = _Heartbeat(lock, settings.training_lock_ttl_s)
  heartbeat.start()
  return lock, heartbeat


def _let_go(lock, heartbeat: _Heartbeat) -> None:
  heartbeat.stopped.set()
  try:
    lock.release()
  except redis.exceptions.LockError:  # the hold ran out meanwhile
    pass


def _changed_since_last_fetch(connection, project: int) -> bool:
  """Whether anything changed since the last job read the tasks; marks this job's read."""
  changed = float(connection.get(_key(project, 'changed')) or 0)
  fetched = connection.get(_key(project, 'fetched'))
  if fetched is not None and changed < float(fetched):
    return False
  connection.set(_key(project, 'fetched'), repr(time.time()))
  return True


def run_training_job(project: int, job_id: str) -> str | None:
  """RQ job: waits for the project's lock, then trains and publishes one version."""
  from backend.images import ImageFetcher
  from backend.store import ModelStore
  from backend.training import train_project
  settings = Settings.from_env()
  connection = redis.Redis.from_url(settings.redis_url)
  lock, heartbeat = _hold_project(connection, project, settings)
  # From here on, triggers make a new job: this one has not read the tasks yet.
  connection.delete(_key(project, 'pending'))
  if not _changed_since_last_fetch(connection, project):
    log.info('Project %s: nothing changed since the last run read the tasks; job %s ends',
             project, job_id)
    _let_go(lock, heartbeat)
    return None
  job = _JobStatus(connection, project, job_id)
  status = job.status
  job.save()
  log.info('Project %s: training on %s (job %s)', project, job.worker, job_id)
  unknown = False

  def published(version):  # the served file is there: another worker may refresh meanwhile
    if settings.refreshes:
      Queue(QUEUE_NAME, connection=connection).enqueue_call(
          run_refresh_job, args=(project,), timeout=settings.training_timeout_s,
          result_ttl=3600, description=f'refresh predictions of project {project}')
  try:
    status.model_version = train_project(
        settings, ModelStore(settings.model_dir, settings.model_variant), ImageFetcher(settings),
        project, job.progress, published)
    status.state, status.stage = 'idle', None  # a failed run keeps the stage it failed in
    return status.model_version
  except Exception as error:
    log.exception('Project %s: training failed; the current version keeps serving', project)
    status.state, status.last_error = 'failed', f'{type(error).__name__}: {error}'
    unknown = isinstance(error, BackendError) and error.status == 404
    raise
  finally:
    status.finished_at, status.runs = time.time(), status.runs + 1
    job.save()
    if unknown:
      # Anyone may name any project id: of one Label Studio does not know, keep only the
      # error, for an hour.
      connection.delete(*(_key(project, name) for name in ('changed', 'fetched', 'events')))
      connection.expire(job.key, UNKNOWN_PROJECT_TTL_S)
    _let_go(lock, heartbeat)


def run_refresh_job(project: int) -> str:
  """RQ job: the project's unannotated tasks get predictions of its current version."""
  from backend.images import ImageFetcher
  from backend.predictor import Predictor
  from backend.refresh import Refresher
  from backend.store import ModelStore
  settings = Settings.from_env()
  store = ModelStore(settings.model_dir, settings.model_variant)
  predictor = Predictor(store, ImageFetcher(settings), settings.score_threshold,
                        settings.fetch_concurrency, settings.predict_deadline_s)
  return Refresher(settings, store, predictor).run(project).state


class WarmWorker(SimpleWorker):
  """Runs each job in this process, not in a child forked per job (RQ's
  SimpleWorker), so TensorFlow and the training code stay loaded between jobs
  (forking after TensorFlow is imported is unsafe: it has threads by then).

  As RQ's forking worker does from its parent, a thread renews the worker's and
  the job's heartbeats every `job_monitoring_interval` while a job runs: a
  killed worker's job is known dead within ~90 s, not after its whole timeout.
  """

  def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
    return BaseWorker.get_heartbeat_ttl(self, job, working_time)  # the forking worker's

  def perform_job(self, job: Job, queue: Queue, execution) -> bool:
    done = threading.Event()

    def beat():
      while not done.wait(self.job_monitoring_interval):
        try:
          self.maintain_heartbeats(job, execution)
        except redis.exceptions.RedisError as error:  # try again at the next beat
          log.warning('Job %s: heartbeat failed: %s', job.id, error)

    beating = threading.Thread(target=beat, name='job-heartbeat', daemon=True)
    beating.start()
    try:
      return super().perform_job(job, queue, execution)
    finally:
      done.set()
      beating.join()


def run_worker(settings: Settings) -> None:
  """`python -m backend worker`: runs training jobs (and delayed triggers) until stopped,
  warmed up (`pipeline.warm_up`) before the first one."""
  from model import pipeline
  connection = redis.Redis.from_url(settings.redis_url)
  connection.ping()
  pipeline.warm_up()
  worker = WarmWorker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
  worker.work(with_scheduler=True, logging_level=settings.log_level)
