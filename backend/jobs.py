"""The training queue: in-process, one job per project, triggers coalesced.

A trigger while the project's job is queued or running sets one follow-up run;
any number of triggers during a run give at most one more, and none when every
change behind them came before the run started (and so was fetched). One
worker thread trains one project at a time (training is CPU-bound;
predictions keep being served from the current version meanwhile). A file lock per project keeps two
processes (several gunicorn workers) from training the same project at once,
and the process that trains writes the project's status beside that lock, so
/train/status reads the same in every worker.

Annotation events are counted and debounced: after TRAIN_EVERY_N_ANNOTATIONS
events, training starts TRAIN_DEBOUNCE_S seconds after the last one (an event
while that wait is on pushes it back, so a burst of edits trains once).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from backend.errors import BackendError
from backend.training import TrainingStatus

log = logging.getLogger(__name__)


def wait_until(condition: Callable[[], bool], timeout: float, every_s: float = 0.1) -> bool:
  """Polls `condition` until it holds (True) or `timeout` seconds pass (False)."""
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() >= deadline:
      return False
    time.sleep(every_s)
  return True


class ProjectLock:
  """An exclusive file lock: held by one process per project (the kernel frees a dead one's)."""

  def __init__(self, path: Path):
    self.path = path
    self.file = None

  def acquire(self, blocking: bool = False) -> bool:
    """Takes the lock; False when another process holds it (waits for it when `blocking`)."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
      return True
    except BlockingIOError:
      self.file.close()
      self.file = None
      return False

  def release(self) -> None:
    if self.file is not None:
      fcntl.flock(self.file, fcntl.LOCK_UN)
      self.file.close()
      self.file = None


class TrainingQueue:
  """Queues training jobs and runs them on one background thread.

  Args:
    run_job: trains one project: (project, progress callback) -> model version.
    lock_dir: where per-project lock files live (under MODEL_DIR).
    every_n_annotations: annotation events that make one training trigger.
    debounce_s: quiet time after the last counted event before training starts.
    warm_up: run once on the training thread before it takes jobs (imports and
      tracing a first job would otherwise wait for); jobs queued meanwhile wait.
  """

  MAX_REMEMBERED = 1000  # projects whose status is kept in memory

  def __init__(self, run_job: Callable, lock_dir: Path, every_n_annotations: int = 1,
               debounce_s: float = 10.0, warm_up: Callable[[], None] | None = None):
    self.run_job = run_job
    self.warm_up = warm_up
    self.lock_dir = lock_dir
    self.every_n_annotations = every_n_annotations
    self.debounce_s = debounce_s
    self.status: dict[int, TrainingStatus] = collections.defaultdict(TrainingStatus)
    self._queue: collections.deque[int] = collections.deque()
    # project -> when the newest change behind a trigger during its run happened
    self._follow_up: dict[int, float] = {}
    self._run_started: dict[int, float] = {}
    self._running: int | None = None
    self._annotation_events: dict[int, int] = collections.Counter()
    self._timers: dict[int, threading.Timer] = {}
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._thread = threading.Thread(target=self._work, name='training', daemon=True)
    self._thread.start()

  def trigger(self, project: int, reason: str, changed_at: float | None = None) -> str:
    """Asks for a training run; returns 'queued', 'coalesced' or 'follow-up'.

    Args:
      changed_at: when the change behind this trigger happened (the last
        annotation event of a debounced burst); now when None. A trigger
        during a run makes a follow-up run only if its change came after
        that run started, and so after it fetched the tasks.
    """
    changed_at = time.time() if changed_at is None else changed_at
    with self._lock:
      if project == self._running:
        self._follow_up[project] = max(changed_at, self._follow_up.get(project, 0.0))
        outcome = 'follow-up'
      elif project in self._queue:
        outcome = 'coalesced'
      else:
        self._queue.append(project)
        self.status[project].state = 'queued'
        outcome = 'queued'
      self._wake.notify()
    log.info('Project %s: training %s (%s)', project, outcome, reason)
    return outcome

  def annotation_event(self, project: int, action: str) -> str:
    """Counts an annotation event; schedules training when enough have arrived."""
    with self._lock:
      self._annotation_events[project] += 1
      waiting = project in self._timers and self._timers[project].is_alive()
      if self._annotation_events[project] < self.every_n_annotations and not waiting:
        return f'counted {self._annotation_events[project]}/{self.every_n_annotations}'
      # Enough events, or one more during the quiet time: (re)start the wait.
      self._annotation_events[project] = 0
      if waiting:
        self._timers[project].cancel()
      timer = threading.Timer(self.debounce_s, self._debounced,
                              (project, f'{action} events', time.time()))
      timer.daemon = True
      self._timers[project] = timer
      timer.start()
    return f'training in {self.debounce_s:g} s unless more events arrive'

  def _debounced(self, project: int, reason: str, changed_at: float) -> None:
    """A timer's trigger; the timer leaves the table (one entry per waiting project only)."""
    with self._lock:
      if self._timers.get(project) is threading.current_thread():
        del self._timers[project]
    self.trigger(project, reason, changed_at)

  def status_of(self, project: int) -> dict:
    """What /train/status shows for the project, whichever worker process trains it."""
    local = self.status.get(project, TrainingStatus())
    if local.state in ('queued', 'running'):
      return local.to_dict()
    shared = self._read_shared_status(project)
    if shared is None or (shared.started_at or 0) <= (local.started_at or 0):
      return local.to_dict()
    return shared.to_dict()

  def _lock_for(self, project: int) -> ProjectLock:
    return ProjectLock(self.lock_dir / f'{project}.lock')

  def _status_path(self, project: int) -> Path:
    return self.lock_dir / f'{project}.status.json'

  def _write_shared_status(self, project: int) -> None:
    """Writes this process's status of a project it trains (atomically) for the others."""
    path = self._status_path(project)
    partial = path.with_name(f'{path.name}.{os.getpid()}')
    partial.write_text(json.dumps({**self.status[project].to_dict(), 'pid': os.getpid()}))
    partial.replace(path)

  def _read_shared_status(self, project: int) -> TrainingStatus | None:
    try:
      data = json.loads(self._status_path(project).read_text())
    except (OSError, ValueError):
      return None
    pid = data.pop('pid', None)
    fields = {f.name for f in dataclasses.fields(TrainingStatus)}
    status = TrainingStatus(**{k: v for k, v in data.items() if k in fields})
    if status.state == 'running' and self._nobody_trains(project):
      status.state = 'failed'
      status.last_error = f'the backend process (pid {pid}) stopped during training'
    return status

  def _nobody_trains(self, project: int) -> bool:
    """True when no process holds the project's lock: the kernel frees a dead one's."""
    probe = self._lock_for(project)
    if not probe.acquire():
      return False
    probe.release()
    return True

  def wait_idle(self, timeout: float) -> bool:
    """Blocks until nothing is queued, waiting or running (for tests and shutdown)."""
    def idle():
      with self._lock:
        return not self._queue and self._running is None and not any(
            t.is_alive() for t in self._timers.values())
    return wait_until(idle, timeout)

  def _work(self) -> None:
    if self.warm_up is not None:
      try:
        self.warm_up()
      except Exception:  # pylint: disable=broad-except
        log.exception('Warming up for training failed; the first job will do it')
    while True:
      with self._lock:
        while not self._queue:
          self._wake.wait()
        project = self._queue.popleft()
        self._running = project
      try:
        self._run(project)
      finally:
        with self._lock:
          self._running = None
          changed_at = self._follow_up.pop(project, None)
          if changed_at is not None and changed_at >= self._run_started.get(project, 0.0):
            self._queue.append(project)
            self.status[project].state = 'queued'
          elif changed_at is not None:
            log.info('Project %s: no follow-up run, nothing changed after this run fetched '
                     'its tasks', project)

  def _run(self, project: int) -> None:
    status = self.status[project]
    lock = self._lock_for(project)
    try:
      acquired = lock.acquire()
    except OSError as error:  # MODEL_DIR became unwritable: say so, keep the thread alive
      log.error('Project %s: cannot take the training lock: %s', project, error)
      status.state, status.last_error = 'failed', f'cannot take the training lock: {error}'
      return
    if not acquired:
      log.info('Project %s: another process is training it; will try again after', project)
      with self._lock:
        self._follow_up[project] = time.time()
        self._run_started[project] = 0.0
      time.sleep(5)
      return
    status.state, status.started_at, status.step, status.last_error = 'running', time.time(), 0, None
    status.stage = None
    with self._lock:
      self._run_started[project] = status.started_at
    self._write_shared_status(project)

    def progress(p):
      status.update(p)
      self._write_shared_status(project)

    unknown = False
    try:
      status.model_version = self.run_job(project, progress)
      status.state, status.stage = 'idle', None  # a failed run keeps the stage it failed in
    except Exception as error:  # pylint: disable=broad-except
      log.exception('Project %s: training failed; the current version keeps serving', project)
      status.state, status.last_error = 'failed', f'{type(error).__name__}: {error}'
      unknown = isinstance(error, BackendError) and error.status == 404
    finally:
      status.finished_at = time.time()
      status.runs += 1
      self._write_shared_status(project)
      if unknown:
        self._forget(project)
      lock.release()

  def _forget(self, project: int) -> None:
    """Drops the files of a project Label Studio does not know (anyone may name any id);
    its failed status stays in memory, among the MAX_REMEMBERED newest."""
    log.info('Project %s: not a Label Studio project; its status and lock files are removed',
             project)
    for path in (self._status_path(project), self._lock_for(project).path):
      path.unlink(missing_ok=True)
    with self._lock:
      self._run_started.pop(project, None)
      finished = sorted((s.finished_at or 0.0, p) for p, s in self.status.items()
                        if s.state in ('idle', 'failed'))
      for _, old in finished[:max(0, len(self.status) - self.MAX_REMEMBERED)]:
        del self.status[old]
