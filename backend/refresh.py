"""Fresh pre-annotations in Label Studio after each iteration, and /predict of any size.

A refresh predicts tasks in the background and pushes the predictions to
Label Studio through its API, a page at a time, stamped with the version
that made them. Two kinds:
  new version   after a version is published: every unannotated task of the
                project without a prediction of that version (fetched page by
                page, so memory stays flat with project size); then the
                project is made to show that version. A newer version stops
                it: that version's own refresh follows.
  late tasks    the tasks a /predict left out at its deadline (Retrieve
                Predictions on thousands of tasks): predicted with the
                current version, so none is left without a prediction.
One refresh per project runs at a time, across processes (a file lock); its
status is a file beside the training lock, shown by /train/status.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable

from backend.errors import BackendError
from backend.jobs import ProjectLock, wait_until
from backend.label_config import parse_label_config
from backend.label_studio_api import PAGE_SIZE, UNANNOTATED_TASKS, LabelStudioAPI, tasks_with_ids
from backend.predictor import Predictor
from backend.settings import Settings
from backend.store import ModelStore

log = logging.getLogger(__name__)

NEW_VERSION = 'new version'
LATE_TASKS = 'late tasks'


@dataclasses.dataclass
class RefreshStatus:
  """What /train/status shows under "refresh"."""

  state: str = 'idle'  # idle | queued | running | done | superseded | failed
  kind: str | None = None  # NEW_VERSION or LATE_TASKS
  model_version: str | None = None
  tasks: int = 0  # looked at so far
  pushed: int = 0  # predictions stored in Label Studio
  already_current: int = 0  # had a prediction of the version already
  unreadable: int = 0  # image unreadable or refused: no prediction
  shown_version: str | None = None  # what the project shows afterwards
  last_error: str | None = None
  started_at: float | None = None
  finished_at: float | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


class StatusFile:
  """A project's refresh status as a JSON file, written atomically, read by any process."""

  def __init__(self, folder: Path, project: int):
    self.path = folder / f'{project}.refresh.json'

  def write(self, status: RefreshStatus) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    partial = self.path.with_name(f'{self.path.name}.{os.getpid()}.{threading.get_ident()}')
    partial.write_text(json.dumps(status.to_dict()))
    partial.replace(self.path)

  def read(self) -> RefreshStatus:
    try:
      data = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return RefreshStatus()
    fields = {f.name for f in dataclasses.fields(RefreshStatus)}
    return RefreshStatus(**{k: v for k, v in data.items() if k in fields})


def _has_version(task: dict, version: str) -> bool:
  """Whether the task (as the tasks API gives it) holds a prediction of `version`."""
  versions = task.get('predictions_model_versions')
  if isinstance(versions, str):  # SQLite's Label Studio joins them with commas
    versions = versions.split(',')
  if versions is None:
    versions = [p.get('model_version') for p in task.get('predictions') or []
                if isinstance(p, dict)]
  return version in versions


def _task_id(task: dict) -> int | None:
  task_id = task.get('id')
  return task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None


def _pages(tasks: Iterable[dict]):
  iterator = iter(tasks)
  while page := list(itertools.islice(iterator, PAGE_SIZE)):
    yield page


class Refresher:
  """Runs one refresh of a project: predict, push, show."""

  def __init__(self, settings: Settings, store: ModelStore, predictor: Predictor):
    self.settings = settings
    self.store = store
    self.predictor = predictor
    self.status_dir = settings.model_dir / 'locks'
    # Its own downloads: a refresh never queues ahead of a live /predict's.
    self.pool = concurrent.futures.ThreadPoolExecutor(
        max(1, settings.fetch_concurrency // 2), thread_name_prefix='refresh-fetch')

  def status_of(self, project: int) -> RefreshStatus:
    return StatusFile(self.status_dir, project).read()

  def run(self, project: int, tasks: list[dict] | None = None) -> RefreshStatus:
    """Refreshes the project's unannotated tasks (tasks None) or the given ones.

    Waits for a refresh of the project in another process to end first.
    Every failure ends in the status, never in an exception.
    """
    file = StatusFile(self.status_dir, project)
    status = RefreshStatus(state='running', kind=NEW_VERSION if tasks is None else LATE_TASKS,
                           started_at=time.time())
    lock = ProjectLock(self.status_dir / f'{project}.refresh.lock')
    unknown = False
    try:
      lock.acquire(blocking=True)
      file.write(status)
      self._refresh(project, tasks, status, file)
    except Exception as error:  # pylint: disable=broad-except
      log.exception('Project %s: refreshing predictions failed', project)
      status.state, status.last_error = 'failed', f'{type(error).__name__}: {error}'
      unknown = isinstance(error, BackendError) and error.status == 404
    finally:
      status.finished_at = time.time()
      try:
        file.write(status)
        if unknown:  # anyone may name any project id: keep no files for one that isn't there
          file.path.unlink(missing_ok=True)
          lock.path.unlink(missing_ok=True)
      except OSError as error:
        log.error('Project %s: cannot write the refresh status: %s', project, error)
      lock.release()
    log.info('Project %s: refresh (%s) %s: %d tasks, %d predictions pushed, %d had %s already, '
             '%d unreadable', project, status.kind, status.state, status.tasks, status.pushed,
             status.already_current, status.model_version, status.unreadable)
    return status

  def _refresh(self, project: int, tasks, status: RefreshStatus, file: StatusFile) -> None:
    version = self.store.current(project)
    if version is None or (version.is_base and tasks is None):
      status.state = 'done'  # nothing trained yet: the base's predictions come on request
      return
    status.model_version = version.name
    api = LabelStudioAPI(self.settings)
    target = parse_label_config(api.label_config(project))
    source = api.tasks(project, UNANNOTATED_TASKS) if tasks is None else tasks
    for page in _pages(source):
      if tasks is not None:  # as Label Studio has them now: another process may have done some
        page = list(api.tasks(project, tasks_with_ids(t['id'] for t in page)))
      current = self.store.current(project).name
      if tasks is None and current != status.model_version:
        status.state = 'superseded'
        log.info('Project %s: %s is out; its refresh takes over from %s', project, current,
                 status.model_version)
        return
      status.model_version = current
      todo = [t for t in page if not _has_version(t, current)]
      status.tasks += len(page)
      status.already_current += len(page) - len(todo)
      self._predict_and_push(api, project, todo, target, status)
      file.write(status)
    if status.pushed and tasks is None:  # late tasks leave the version a person chose alone
      api.show_version(project, status.model_version)
      status.shown_version = status.model_version
    status.state = 'done'

  def _predict_and_push(self, api, project, tasks, target, status: RefreshStatus) -> None:
    if not tasks:
      return
    used, outcomes = self.predictor.predict_tasks(project, tasks, target, pool=self.pool)
    predictions = [{'task': task['id'], 'result': outcome['result'], 'score': outcome['score'],
                    'model_version': used}
                   for task, outcome in zip(tasks, outcomes) if isinstance(outcome, dict)]
    status.unreadable += len(tasks) - len(predictions)
    status.model_version = used
    api.push_predictions(project, predictions)
    status.pushed += len(predictions)


class RefreshQueue:
  """Refreshes in a background thread of this process, one at a time.

  Requests for a project's new version coalesce while one waits; late tasks
  queue as they come, less those already queued or being completed (pressing
  Retrieve Predictions twice must not store two predictions on a task).
  `run` is `Refresher.run`.
  """

  def __init__(self, refresher: Refresher):
    self.refresher = refresher
    self._queue: collections.deque[tuple[int, list | None]] = collections.deque()
    self._late: dict[int, set] = {}  # task ids queued or running, per project
    self._busy = False
    self._lock = threading.Condition()
    self._thread = threading.Thread(target=self._work, name='refresh', daemon=True)
    self._thread.start()

  def request(self, project: int, tasks: list[dict] | None = None) -> str:
    """Asks for a refresh; returns 'queued' or 'coalesced'."""
    with self._lock:
      if tasks is None and (project, None) in self._queue:
        return 'coalesced'
      if tasks is not None:  # only tasks Label Studio can name can be completed through it
        pending = self._late.get(project, set())
        tasks = [t for t in tasks if _task_id(t) is not None and t['id'] not in pending]
        if not tasks:  # (no entry made: any caller may name any project)
          return 'coalesced'
        self._late.setdefault(project, set()).update(t['id'] for t in tasks)
      self._queue.append((project, tasks))
      self._lock.notify()
    if tasks is None:
      self.refresher.status_dir.mkdir(parents=True, exist_ok=True)
      StatusFile(self.refresher.status_dir, project).write(
          RefreshStatus(state='queued', kind=NEW_VERSION))
    log.info('Project %s: refresh queued (%s)', project,
             NEW_VERSION if tasks is None else f'{len(tasks)} late tasks')
    return 'queued'

  def completing(self, project: int) -> set:
    """Ids of the project's late tasks queued or being predicted: a /predict leaves them out."""
    with self._lock:
      return set(self._late.get(project, ()))

  def wait_idle(self, timeout: float) -> bool:
    """Blocks until nothing is queued or running (for tests and shutdown)."""
    def idle():
      with self._lock:
        return not self._queue and not self._busy
    return wait_until(idle, timeout)

  def _work(self) -> None:
    while True:
      with self._lock:
        while not self._queue:
          self._lock.wait()
        project, tasks = self._queue.popleft()
        self._busy = True
      try:
        self.refresher.run(project, tasks)
      finally:
        with self._lock:
          self._busy = False
          if tasks is not None:
            self._late[project].difference_update(t['id'] for t in tasks)
            if not self._late[project]:
              del self._late[project]
