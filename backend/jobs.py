"""The training queue: in-process, one job per project, triggers coalesced.

A trigger while the project's job is queued or running sets one follow-up run;
any number of triggers during a run give exactly one more. One worker thread
trains one project at a time (training is CPU-bound; predictions keep being
served from the current version meanwhile). A file lock per project keeps two
processes (several gunicorn workers) from training the same project at once.

Annotation events are counted and debounced: after TRAIN_EVERY_N_ANNOTATIONS
events, training starts TRAIN_DEBOUNCE_S seconds after the last one.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from backend.training import TrainingStatus

log = logging.getLogger(__name__)


class ProjectLock:
  """An exclusive, non-blocking file lock: held by one process per project."""

  def __init__(self, path: Path):
    self.path = path
    self.file = None

  def acquire(self) -> bool:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.file = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
  """

  def __init__(self, run_job: Callable, lock_dir: Path, every_n_annotations: int = 1,
               debounce_s: float = 10.0):
    self.run_job = run_job
    self.lock_dir = lock_dir
    self.every_n_annotations = every_n_annotations
    self.debounce_s = debounce_s
    self.status: dict[int, TrainingStatus] = collections.defaultdict(TrainingStatus)
    self._queue: collections.deque[int] = collections.deque()
    self._follow_up: set[int] = set()
    self._running: int | None = None
    self._annotation_events: dict[int, int] = collections.Counter()
    self._timers: dict[int, threading.Timer] = {}
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._thread = threading.Thread(target=self._work, name='training', daemon=True)
    self._thread.start()

  def trigger(self, project: int, reason: str) -> str:
    """Asks for a training run; returns 'queued', 'coalesced' or 'follow-up'."""
    with self._lock:
      if project == self._running:
        self._follow_up.add(project)
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
      if self._annotation_events[project] < self.every_n_annotations:
        return f'counted {self._annotation_events[project]}/{self.every_n_annotations}'
      self._annotation_events[project] = 0
      if project in self._timers:
        self._timers[project].cancel()
      timer = threading.Timer(self.debounce_s, self.trigger, (project, f'{action} events'))
      timer.daemon = True
      self._timers[project] = timer
      timer.start()
    return f'training in {self.debounce_s:g} s unless more events arrive'

  def status_of(self, project: int) -> dict:
    """What /train/status shows for the project."""
    return self.status[project].to_dict()

  def wait_idle(self, timeout: float) -> bool:
    """Blocks until nothing is queued or running (for tests and shutdown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      with self._lock:
        if not self._queue and self._running is None and not any(
            t.is_alive() for t in self._timers.values()):
          return True
      time.sleep(0.1)
    return False

  def _work(self) -> None:
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
          if project in self._follow_up:
            self._follow_up.discard(project)
            self._queue.append(project)
            self.status[project].state = 'queued'

  def _run(self, project: int) -> None:
    status = self.status[project]
    lock = ProjectLock(self.lock_dir / f'{project}.lock')
    if not lock.acquire():
      log.info('Project %s: another process is training it; will try again after', project)
      with self._lock:
        self._follow_up.add(project)
      time.sleep(5)
      return
    status.state, status.started_at, status.step, status.last_error = 'running', time.time(), 0, None

    def progress(p):
      status.step, status.total_steps, status.loss = p.step, p.total_steps, p.loss
      status.eta_s, status.images_per_s = p.eta_s, p.images_per_s

    try:
      status.model_version = self.run_job(project, progress)
      status.state = 'idle'
    except Exception as error:  # pylint: disable=broad-except
      log.exception('Project %s: training failed; the current version keeps serving', project)
      status.state, status.last_error = 'failed', f'{type(error).__name__}: {error}'
    finally:
      status.finished_at = time.time()
      status.runs += 1
      lock.release()
