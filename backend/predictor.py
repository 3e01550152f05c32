"""Tasks in, Label Studio predictions out, with the project's current .tflite.

No TensorFlow here: detectors are ai-edge-litert interpreters, loaded once per
(project, version) and kept in memory. Images of one batch are fetched
concurrently; a task whose image can't be read gets an empty prediction and a
log line, never a failed batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path

from backend.errors import BackendError
from backend.images import ImageFetcher
from backend.label_config import RectangleTarget
from backend.store import ModelStore, Version
from model.config import ScoreThresholdConfig
from model.images import ImageError
from model.run_folder import read_score_thresholds
from model.tflite_detector import TFLiteDetector

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A version's detector, the lock it runs under, and its score thresholds
  (label -> the score from which its boxes are shown; {} for the base)."""

  detector: TFLiteDetector
  lock: threading.Lock
  thresholds: dict[str, float]


class DetectorCache:
  """One TFLite interpreter per model file, built on first use.

  Interpreters are not thread-safe, so each holds a lock while it runs. A
  project's new version replaces its older one in memory (a request still
  running on the old one finishes with it).
  """

  def __init__(self, num_threads: int = 2):
    self.num_threads = num_threads
    self._detectors: dict[str, Loaded] = {}
    self._lock = threading.Lock()

  def get(self, version: Version) -> Loaded:
    key = str(version.tflite)
    with self._lock:
      if key not in self._detectors:
        thresholds = read_score_thresholds(version.path)
        log.info('Loading %s (%s); score thresholds %s', version.name, version.tflite,
                 ', '.join(f'{label} {value:g}' for label, value in thresholds.items())
                 or f'{DEFAULT_THRESHOLD:g} (the default)')
        # Versions of one project share a parent folder (the base has its own).
        older = [k for k in self._detectors
                 if Path(k).parent.parent == version.tflite.parent.parent]
        for stale in older:
          del self._detectors[stale]
        self._detectors[key] = Loaded(
            TFLiteDetector(version.tflite, list(version.labels), self.num_threads),
            threading.Lock(), thresholds)
      return self._detectors[key]

  def loaded(self) -> list[str]:
    """The model files held in memory now."""
    with self._lock:
      return sorted(self._detectors)


# A label's score threshold where neither SCORE_THRESHOLD nor its version sets one.
DEFAULT_THRESHOLD = ScoreThresholdConfig.default

# Detections this weak count towards a task's certainty (they are not shown):
# an object the model half-sees shows up here before it crosses SCORE_THRESHOLD.
UNCERTAIN_FLOOR = 0.05


def task_certainty(scores: list[float]) -> float:
  """How sure the model is about a whole image, in [0, 1]: its least sure detection.

  A detection scored s is as sure as |2s - 1| (0 at 0.5, 1 at 0 or 1); an image
  with no detection down to UNCERTAIN_FLOOR is sure it holds nothing (1).
  Sorting tasks by this, ascending, puts first the images with a box the
  model cannot decide on, and last those with only confident boxes or none.
  """
  return min((abs(2.0 * s - 1.0) for s in scores), default=1.0)


def to_region(detection, target: RectangleTarget, label: str, width: int, height: int) -> dict:
  """A Detection (pixel box) as a Label Studio rectanglelabels region (percent of the image)."""
  x1, y1, x2, y2 = detection.box
  return {
      'id': uuid.uuid4().hex[:10],
      'from_name': target.from_name,
      'to_name': target.to_name,
      'type': 'rectanglelabels',
      'original_width': width,
      'original_height': height,
      'image_rotation': 0,
      'value': {'x': 100.0 * x1 / width, 'y': 100.0 * y1 / height,
                'width': 100.0 * (x2 - x1) / width, 'height': 100.0 * (y2 - y1) / height,
                'rotation': 0, 'rectanglelabels': [label]},
      'score': round(float(detection.score), 4),
  }


# What `Predictor.predict_tasks` gives a task it has no prediction for.
UNREADABLE = 'unreadable'  # the image could not be read or was refused
LATE = 'late'  # the deadline came first


class Predictor:
  """Predictions for a batch of tasks, within a deadline."""

  def __init__(self, store: ModelStore, fetcher: ImageFetcher, score_threshold: float | None,
               fetch_concurrency: int, deadline_s: float = 60.0):
    """score_threshold: every label's (SCORE_THRESHOLD); None: each version's own
    per label where it chose them, else `DEFAULT_THRESHOLD`."""
    self.store = store
    self.fetcher = fetcher
    self.score_threshold = score_threshold
    self.deadline_s = deadline_s
    self.detectors = DetectorCache()
    self.pool = concurrent.futures.ThreadPoolExecutor(fetch_concurrency,
                                                      thread_name_prefix='fetch')
    # Decoded images waiting for the detector, at most: downloads outpace it, and
    # a batch of 20,000 tasks must not hold 20,000 images.
    self.window = 2 * fetch_concurrency

  def predict(self, project: int, tasks: list[dict], target: RectangleTarget,
              completing: set = frozenset(), at_most: int | None = None) -> list[dict]:
    """Label Studio's /predict answer: exactly one entry per task, in order, by PREDICT_DEADLINE_S.

    An unreadable image gets an empty prediction (Label Studio stores it);
    a task the deadline left out gets an entry without "result", which Label
    Studio skips, storing nothing (`pending` says why), so it is asked again.
    So does a task whose id is in `completing` (a refresh is pushing its
    prediction already: answering too would store two), and every task after
    the first `at_most` (Label Studio saves a /predict's answers one at a
    time, ~30 ms each, in the user's request: thousands keep Retrieve
    Predictions spinning for minutes; the API stores them in bulk).
    """
    todo = [i for i, task in enumerate(tasks)
            if not (isinstance(task.get('id'), int) and task['id'] in completing)][:at_most]
    version, some = self.predict_tasks(project, [tasks[i] for i in todo], target, self.deadline_s)
    outcomes: list = [LATE] * len(tasks)
    for i, outcome in zip(todo, some):
      outcomes[i] = outcome
    return [outcome if isinstance(outcome, dict)
            else {'model_version': version, 'pending': True} if outcome == LATE
            else self._empty(version) for outcome in outcomes]

  def predict_tasks(self, project: int, tasks: list[dict], target: RectangleTarget,
                    deadline_s: float | None = None, pool=None) -> tuple[str, list]:
    """(the version used, per task: its prediction, UNREADABLE or LATE).

    Cached images go first, then downloads (on `pool`, the shared fetch pool
    by default, `window` at a time) as they arrive; whatever is not done
    `deadline_s` after the call is LATE (a download under way goes on, bounded
    by IMAGE_FETCH_TIMEOUT_S, and is cached for the next ask; the others never
    start). No deadline when None.
    """
    deadline = time.monotonic() + (deadline_s if deadline_s is not None else float('inf'))
    version = self.store.current(project)
    if version is None:
      log.warning('Project %s: no model yet (run python -m model fetch-base)', project)
      return 'none', [self._empty('none') for _ in tasks]
    if version.is_base and not any(target.label_for(name) for name in version.labels):
      # The base knows none of this project's labels: nothing useful to say.
      return version.name, [self._empty(version.name) for _ in tasks]
    version, loaded = self._loadable(project, version)
    # Down to the floor for the task's certainty, lower where a label is shown from lower.
    floor = min(UNCERTAIN_FLOOR, *(self.threshold(label, loaded.thresholds)
                                   for label in loaded.detector.labels))
    urls = [_image_url(task, target) for task in tasks]
    outcomes: list = [LATE] * len(tasks)

    def run(i, image):
      if image is None:
        outcomes[i] = UNREADABLE
        return
      with loaded.lock:
        found = loaded.detector.detect(image, min_score=floor)
      outcomes[i] = self._prediction(version.name, found, target, image, loaded.thresholds)

    cached = [i for i, url in enumerate(urls) if url and self.fetcher.cached_path(url)]
    downloads = _Downloads(pool or self.pool, self.window, self._load,
                           [(i, urls[i], tasks[i].get('id'))
                            for i in sorted(set(range(len(tasks))) - set(cached))])
    for i in cached:
      if time.monotonic() >= deadline:
        break
      run(i, self._load(urls[i], tasks[i].get('id')))
    for i, image in downloads.as_they_arrive(deadline):
      run(i, image)
    late = outcomes.count(LATE)
    if late:
      log.warning('Project %s: %d of %d tasks not predicted within the deadline (%g s)', project,
                  late, len(tasks), deadline_s)
    return version.name, outcomes

  def _prediction(self, version: str, found: list, target: RectangleTarget, image,
                  thresholds: dict[str, float]) -> dict:
    found = [d for d in found if target.label_for(d.label) is not None]
    regions = [to_region(d, target, target.label_for(d.label), image.width, image.height)
               for d in found if d.score >= self.threshold(d.label, thresholds)]
    return {'model_version': version, 'score': round(task_certainty([d.score for d in found]), 4),
            'result': regions}

  def threshold(self, label: str, thresholds: dict[str, float]) -> float:
    """The score from which `label`'s boxes are shown, given its version's `thresholds`."""
    if self.score_threshold is not None:
      return self.score_threshold
    return thresholds.get(label, DEFAULT_THRESHOLD)

  def _loadable(self, project: int, version: Version):
    """The newest version whose model file loads, and its detector.

    A damaged file (a disk error, a hand edit) is logged and skipped for the
    version before it, then the base.

    Raises:
      BackendError(503): no version of the project loads.
    """
    candidates = [version, *reversed([v for v in self.store.versions(project)
                                      if v.number < version.number])]
    base = self.store.base_version()
    if base is not None and not version.is_base:
      candidates.append(base)
    for candidate in candidates:
      try:
        return candidate, self.detectors.get(candidate)
      except (ValueError, RuntimeError, OSError) as error:
        log.error('Project %s: %s does not load (%s: %s); trying an older version', project,
                  candidate.name, type(error).__name__, str(error)[:200])
    raise BackendError(503, f'project {project}: no model version loads (damaged model files); '
                            'train again or run python -m model fetch-base --force')

  def _load(self, url, task_id):
    try:
      return self.fetcher.load(url, task_id)
    except ImageError as error:
      log.warning('Task %s: no prediction, image unreadable: %s', task_id, error)
      return None

  @staticmethod
  def _empty(version: str) -> dict:
    return {'model_version': version, 'score': 0.0, 'result': []}


class _Downloads:
  """Images fetched on `pool`, at most `window` started and not yet taken."""

  def __init__(self, pool, window: int, load, todo: list[tuple[int, str, object]]):
    self.pool, self.window, self.load = pool, window, load
    self.todo = iter(todo)
    self.running: dict[concurrent.futures.Future, int] = {}
    self._top_up()

  def _top_up(self) -> None:
    while len(self.running) < self.window:
      item = next(self.todo, None)
      if item is None:
        return
      index, url, task_id = item
      self.running[self.pool.submit(self.load, url, task_id)] = index

  def as_they_arrive(self, deadline: float):
    """(task index, image or None) as downloads finish, until none is left or the deadline."""
    while self.running:
      left = deadline - time.monotonic()
      if left <= 0:
        for future in self.running:  # those not begun leave the pool to other requests
          future.cancel()
        return
      done, _ = concurrent.futures.wait(self.running, timeout=min(left, 3600.0),
                                        return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        index = self.running.pop(future)
        self._top_up()
        yield index, future.result()


def _image_url(task: dict, target: RectangleTarget):
  data = task.get('data')
  return data.get(target.image_key) if isinstance(data, dict) else None
